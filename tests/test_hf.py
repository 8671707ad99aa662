"""HF interop: our export loads in transformers as DeepseekV3ForCausalLM with equal logits; round trips are exact.

transformers is a test extra; these tests skip without it. Everything runs offline, CPU, fp32.
"""

from __future__ import annotations

import json

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.checkpoint_io import INDEX_FILE, SINGLE_FILE, load_state_dict
from moeflow.models.hf import HFConversionError, config_to_hf, export_hf, import_hf

transformers = pytest.importorskip("transformers")

YARN = {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))


def _model(cfg: ModelConfig, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():  # a trained-looking routing bias, so the test sees whether HF uses it to choose
        for router in model.routers():
            router.e_score_correction_bias.normal_(0.0, 0.05)
    return model


def _hf_load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ids(cfg: ModelConfig, B: int = 2, T: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


VARIANT = ModelConfig.preset("tiny").replace(
    q_lora_rank=24, n_group=4, topk_group=2, num_experts_per_tok=3, route_scale=2.5, norm_topk_prob=False,
    tie_embeddings=True, mtp_depth=1, rope_scaling=YARN, rope_theta=50000.0)


@pytest.mark.parametrize("cfg", [ModelConfig.preset("tiny"), VARIANT], ids=["tiny", "qlora-groups-yarn-tied-mtp"])
def test_transformers_loads_export_with_equal_logits(tmp_path, cfg):
    model = _model(cfg)
    export_hf(model, tmp_path / "hf", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf_model = _hf_load(tmp_path / "hf")
    assert type(hf_model).__name__ == "DeepseekV3ForCausalLM"
    # the export really contains MLA and MoE layers, and the HF model built them
    assert hf_model.config.first_k_dense_replace == cfg.first_k_dense < cfg.num_layers
    assert type(hf_model.model.layers[-1].mlp).__name__ == "DeepseekV3MoE"
    assert hf_model.config.kv_lora_rank == cfg.kv_lora_rank
    assert hf_model.config.eos_token_id == 2 and hf_model.config.pad_token_id == 0
    ids = _ids(cfg, T=128 if cfg.rope_scaling else 48)
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf_model(ids).logits
    assert ours.shape == theirs.shape
    assert _rel_err(ours, theirs) <= 1e-4
    # the routing bias is used by HF to choose experts: a different bias changes HF's logits
    with torch.no_grad():
        hf_model.model.layers[-1].mlp.gate.e_score_correction_bias.mul_(-40.0)
        assert _rel_err(ours, hf_model(ids).logits) > 1e-3


def test_export_import_round_trip_is_exact(tmp_path):
    model = _model(VARIANT)
    export_hf(model, tmp_path / "hf")
    back = import_hf(tmp_path / "hf")
    assert back.cfg == model.cfg
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert back.lm_head.weight is back.model.embed_tokens.weight  # tie restored
    ids = _ids(VARIANT)
    with torch.no_grad():
        a, b = model(ids, targets=ids), back(ids, targets=ids)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.aux["mtp_loss"], b.aux["mtp_loss"]) and a.aux["mtp_loss"] > 0


def test_mtp_layer_keys_follow_deepseek_v3(tmp_path):
    """Each MTP layer carries DeepSeek-V3's full key set (as in the released checkpoints' layer 61):
    its own copies of the embedding and the output head besides enorm/hnorm/eh_proj/shared_head.norm and
    the block; an untied model's head copy is the LM head, not the embedding."""
    from safetensors.torch import load_file
    cfg = ModelConfig.preset("tiny").replace(mtp_depth=2)
    model = _model(cfg)
    export_hf(model, tmp_path / "hf")
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    L = cfg.num_layers
    for j in range(2):
        layer = f"model.layers.{L + j}"
        for name in ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
                     "shared_head.norm.weight", "shared_head.head.weight", "input_layernorm.weight",
                     "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.weight"):
            assert f"{layer}.{name}" in hf, f"{layer}.{name}"
        assert torch.equal(hf[f"{layer}.embed_tokens.weight"], hf["model.embed_tokens.weight"])
        assert torch.equal(hf[f"{layer}.shared_head.head.weight"], hf["lm_head.weight"])
        assert not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"])
    assert f"model.layers.{L + 2}.embed_tokens.weight" not in hf
    back = import_hf(tmp_path / "hf")
    assert set(back.state_dict()) == set(model.state_dict())


def test_sharded_bf16_export(tmp_path):
    cfg = ModelConfig.preset("tiny")
    model = _model(cfg)
    export_hf(model, tmp_path / "hf", dtype=torch.bfloat16, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "hf" / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "hf" / SINGLE_FILE).exists()
    tensors = load_state_dict(tmp_path / "hf")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in tensors
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf_model = _hf_load(tmp_path / "hf")  # transformers reads the index and upcasts to fp32
    back = import_hf(tmp_path / "hf", dtype=torch.float32)
    ids = _ids(cfg)
    with torch.no_grad():
        assert _rel_err(back(ids).logits, hf_model(ids).logits) <= 1e-4


def test_import_directory_saved_by_transformers(tmp_path):
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=1.5)
    torch.manual_seed(0)
    hf_model = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for layer in hf_model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    hf_model.save_pretrained(str(tmp_path / "saved"))
    ours = import_hf(tmp_path / "saved")
    assert ours.cfg.mtp_depth == 0  # config says 1 MTP layer (HF default) but no weights exist
    assert ours.cfg.q_lora_rank == 12 and ours.cfg.n_group == 2 and ours.cfg.route_scale == 1.5
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        assert _rel_err(ours(ids).logits, hf_model(ids).logits) <= 1e-4


def test_export_refuses_features_without_hf_equivalent(tmp_path):
    softmax = MoETransformer(ModelConfig.preset("tiny").replace(score_func="softmax"))
    with pytest.raises(HFConversionError, match="softmax"):
        export_hf(softmax, tmp_path / "a")
    assert not (tmp_path / "a" / "config.json").exists()
    with pytest.raises(HFConversionError, match="force_balanced"):
        config_to_hf(ModelConfig.preset("tiny").replace(force_balanced_routing=True))
    with pytest.raises(HFConversionError, match="widths"):
        config_to_hf(ModelConfig.preset("tiny").dense_twin())


def test_import_refuses_bad_checkpoints(tmp_path):
    model = _model(ModelConfig.preset("tiny"))
    export_hf(model, tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["n_routed_experts"] = 16  # the file has 8 experts per layer
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(HFConversionError, match="experts"):
        import_hf(tmp_path / "hf")
    cfg["n_routed_experts"], cfg["hidden_act"] = 8, "gelu"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(HFConversionError, match="hidden_act"):
        import_hf(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(tmp_path / "nowhere")
