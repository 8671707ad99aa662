"""LoRA: expert adapters learn, merged == unmerged, last-k layers, and PEFT loads our adapter folder."""

from __future__ import annotations

import copy

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.align.lora import (LoRAConfig, LoRALinear, apply_lora, export_peft_adapter,
                                       freeze_except_last_layers, lora_parameters, merge_lora,
                                       merged_copy)
from train_fakes import one_thread, tiny_model_overrides


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _base(**kw) -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(**{**tiny_model_overrides(), **kw}))
    with torch.no_grad():
        for router in model.routers():  # a trained-looking bias: routing is not uniform
            router.e_score_correction_bias.normal_(0.0, 0.05)
    return model


def _ids(B=4, T=16, seed=1):
    return torch.randint(2, 64, (B, T + 1), generator=torch.Generator().manual_seed(seed))


def _train(model, steps=5, lr=5e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ids = _ids()
    for _ in range(steps):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def test_adapters_start_at_zero_and_cover_attention_dense_and_experts():
    base = _base()
    model = copy.deepcopy(base)
    adapted = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert "model.layers.0.self_attn.q_proj" in adapted and "model.layers.0.mlp.down_proj" in adapted
    assert "model.layers.1.mlp.shared_experts.up_proj" in adapted
    assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"} <= set(adapted)
    assert not any(n.endswith("mlp.gate") for n in adapted)  # the router is not a LoRA target
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    ids = _ids()[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base.eval()(ids).logits)


def test_expert_adapters_get_gradients_and_change_while_the_base_stays():
    model = _base()
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    experts = model.model.layers[1].mlp.experts
    base_before = experts.parametrizations.gate_up_proj.original.detach().clone()
    lora = experts.parametrizations.gate_up_proj[0]
    A0, B0 = lora.lora_A.detach().clone(), lora.lora_B.detach().clone()
    ids = _ids()
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    grad_B = lora.lora_B.grad
    assert grad_B is not None and float(grad_B.abs().sum()) > 0
    # every expert that received tokens has a gradient on its own adapter
    counts = model(ids[:, :-1]).aux["tokens_per_expert"][0]
    per_expert = grad_B.abs().sum(dim=(1, 2))
    assert bool(((per_expert > 0) == (counts > 0)).all())
    model.zero_grad()
    _train(model)
    assert not torch.equal(lora.lora_B, B0) and not torch.equal(lora.lora_A, A0)
    assert float(lora.delta_weight().detach().abs().max()) > 1e-4
    assert torch.equal(experts.parametrizations.gate_up_proj.original, base_before)  # frozen base


def test_merged_equals_unmerged_and_training_lowers_the_loss():
    model = _base()
    # a trained-scale LM head: LoRA leaves the head frozen, and a freshly initialised one (rows of norm ~0.1 here)
    # bounds every logit near ±0.6, so no adapter can move the loss far below ln(vocab) = 4.16 (measured: 4.17 ->
    # 4.07 after 10 steps, 4.08 after 25; this test asked for 0.1 and failed on the unchanged code, 2026-12-07)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    ids = _ids()
    with torch.no_grad():
        before = float(model.eval()(ids[:, :-1], targets=ids[:, 1:]).loss)
    _train(model.train(), steps=10)
    model.eval()
    with torch.no_grad():
        unmerged = model(ids[:, :-1], targets=ids[:, 1:])
    assert float(unmerged.loss) < before - 0.1
    copied = merged_copy(model)
    with torch.no_grad():  # the adapted model still works after a merged copy was made from it
        torch.testing.assert_close(model(ids[:, :-1]).logits, unmerged.logits)
        torch.testing.assert_close(copied(ids[:, :-1]).logits, unmerged.logits, rtol=1e-5, atol=1e-5)
    merged = merge_lora(model)  # in place
    assert not lora_parameters(merged) and not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(_base().state_dict())  # a plain model again (HF export as usual)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids[:, :-1]).logits, unmerged.logits, rtol=1e-5, atol=1e-5)


def test_last_k_layers_and_target_selection():
    model = _base(num_layers=3, first_k_dense=1)
    adapted = apply_lora(model, LoRAConfig(rank=2, targets=("experts", "o_proj"), last_k_layers=1))
    assert adapted == ["model.layers.2.self_attn.o_proj", "model.layers.2.mlp.experts.gate_up_proj",
                       "model.layers.2.mlp.experts.down_proj"]
    with pytest.raises(ValueError, match="choose from"):
        LoRAConfig(targets=("q_prj",))
    full = _base(num_layers=3, first_k_dense=1)
    trainable = freeze_except_last_layers(full, 1)
    assert all(n.startswith(("model.layers.2.", "model.norm.", "lm_head.")) for n in trainable)
    ids = _ids()
    full(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    assert full.model.layers[0].self_attn.o_proj.weight.grad is None
    assert full.model.layers[2].mlp.experts.gate_up_proj.grad is not None


def test_peft_loads_our_adapter_folder_onto_our_hf_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from moeflow.models.hf import export_hf

    base = _base()
    export_hf(base, tmp_path / "hf", bos_token_id=1, eos_token_id=0, pad_token_id=63)
    model = copy.deepcopy(base)
    cfg = LoRAConfig(rank=4, alpha=8)
    apply_lora(model, cfg)
    _train(model, steps=5)
    model.eval()
    folder = export_peft_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path=str(tmp_path / "hf"))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_base, str(folder)).eval()
    # every tensor of the folder landed, under the same name (PEFT only warns on missing keys)
    from safetensors.torch import load_file

    written = load_file(str(folder / "adapter_model.safetensors"))
    loaded = peft.get_peft_model_state_dict(peft_model)
    assert set(written) == set(loaded)
    assert any(".mlp.experts.base_layer.lora_B" in k for k in loaded)  # routed experts, both tensors
    assert any(k.endswith("layers.0.mlp.down_proj.weight") for k in loaded)  # dense FFN, merged
    for key, value in written.items():
        torch.testing.assert_close(loaded[key], value)
    ids = _ids()[:, :-1]
    with torch.no_grad():
        ours = model(ids).logits
        theirs = peft_model(input_ids=ids).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)(
            input_ids=ids).logits
    rel = float((ours - theirs).norm() / ours.norm())
    assert rel < 1e-4, rel
    assert float((ours - plain).norm() / ours.norm()) > 1e-3  # the adapter changes the HF model's output
