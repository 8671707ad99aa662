"""MoETransformer end to end: shapes, causality, gradients, MTP, losses, save/load, HF parity."""

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.mtp import mtp_targets


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=101, **kw))


def test_shapes_aux_and_loss_composition():
    m = _model(z_loss_weight=1e-3, lb_loss_weight=1e-2)
    ids = torch.randint(0, 101, (3, 10))
    out = m(ids, targets=ids)
    assert out.logits.shape == (3, 10, 101)
    a = out.aux
    assert a["tokens_per_expert"].shape == (2, 8) and a["tokens_per_expert"].sum().item() == 2 * 30 * 2
    assert a["maxvio"].shape == (2,) and a["router_entropy"].shape == (2,)
    for k in ("lm_loss", "mtp_loss", "seq_aux_loss", "z_loss", "lb_loss"):
        assert a[k].dim() == 0 and not a[k].requires_grad
    assert a["seq_aux_loss"] > 0 and a["z_loss"] > 0 and a["lb_loss"] > 0 and a["mtp_loss"] == 0
    want = a["lm_loss"] + a["seq_aux_loss"] + a["z_loss"] + a["lb_loss"]
    torch.testing.assert_close(out.loss.detach(), want)
    assert m(ids).loss is None
    assert m(ids, last_logits_only=True).logits.shape == (3, 1, 101)


def test_causality_future_tokens_do_not_change_past_logits():
    m = _model().eval()
    ids = torch.randint(0, 101, (2, 12))
    ids2 = ids.clone()
    ids2[:, 8:] = (ids2[:, 8:] + 1) % 101
    a, b = m(ids).logits, m(ids2).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4


def test_gradients_reach_every_parameter_and_not_the_bias():
    m = _model(mtp_depth=1, q_lora_rank=16)
    ids = torch.randint(0, 101, (4, 16))
    m(ids, targets=ids).loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for r in m.routers():
        assert not r.e_score_correction_bias.requires_grad and r.e_score_correction_bias.grad is None
    assert all("e_score_correction_bias" not in n for n, _ in m.named_parameters())


def test_mtp_targets_respect_document_boundaries():
    t = torch.tensor([[1, 2, -100, 4, 5, 6]])
    assert mtp_targets(t, 1).tolist() == [[2, -100, -100, 5, 6, -100]]
    assert mtp_targets(t, 2).tolist() == [[-100, -100, -100, 6, -100, -100]]


def test_mtp_loss_finite_and_weighted():
    m = _model(mtp_depth=2, mtp_loss_weight=0.3)
    ids = torch.randint(0, 101, (2, 12))
    targets = torch.roll(ids, -1, 1)
    targets[:, 5] = -100  # document boundary
    targets[:, -1] = -100
    out = m(ids, targets=targets)
    a = out.aux
    assert torch.isfinite(a["mtp_loss"]) and a["mtp_loss"] > 0
    assert a["tokens_per_expert"].shape == (4, 8)  # 2 main MoE layers + 2 MTP blocks
    torch.testing.assert_close(out.loss.detach(), a["lm_loss"] + 0.3 * a["mtp_loss"] + a["seq_aux_loss"])
    # all-ignored targets give 0, not NaN
    out2 = m(ids, targets=torch.full_like(ids, -100))
    assert out2.aux["lm_loss"] == 0 and out2.aux["mtp_loss"] == 0


def test_router_bias_update_hook_and_state_dict_round_trip(tmp_path):
    m = _model()
    ids = torch.randint(0, 101, (2, 8))
    counts = m(ids).aux["tokens_per_expert"]
    m.apply_router_bias_update(counts * 4)
    biases = [r.e_score_correction_bias.clone() for r in m.routers()]
    assert all(b.abs().sum() > 0 and abs(b.sum().item()) < 1e-6 for b in biases)
    with pytest.raises(ValueError, match="counts_LE"):
        m.apply_router_bias_update(counts[:1])
    torch.save(m.state_dict(), tmp_path / "m.pt")
    m2 = MoETransformer(m.cfg)
    m2.load_state_dict(torch.load(tmp_path / "m.pt"))
    for a, b in zip(m2.routers(), biases):
        torch.testing.assert_close(a.e_score_correction_bias, b)
    torch.testing.assert_close(m2(ids).logits, m(ids).logits)
    assert ModelConfig.from_dict(m.cfg.to_dict()) == m.cfg


def test_routing_replay_and_choices():
    m = _model().eval()
    ids = torch.randint(0, 101, (2, 7))
    out = m(ids, return_router_choices=True)
    choices = out.aux["router_choices"]
    assert choices.shape == (2, 2, 7, 2)
    replay = m(ids, forced_routing=list(choices))
    torch.testing.assert_close(replay.logits, out.logits)


def test_tied_embeddings_and_dense_twin_model():
    m = _model(tie_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.num_params() == m.cfg.num_params()
    twin = MoETransformer(m.cfg.dense_twin())
    assert twin.routers() == [] and twin.num_params() == twin.cfg.num_params()
    out = twin(torch.randint(0, 101, (1, 5)), targets=torch.randint(0, 101, (1, 5)))
    assert out.aux["tokens_per_expert"].shape[0] == 0 and torch.isfinite(out.loss)


def _hf_config(cfg):
    from transformers import DeepseekV3Config
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **cfg.rope_scaling}
    hc = DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.dense_intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        n_shared_experts=cfg.num_shared_experts, n_routed_experts=cfg.num_routed_experts,
        routed_scaling_factor=cfg.route_scale, kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank or None,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.n_group, topk_group=cfg.topk_group, num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense, norm_topk_prob=cfg.norm_topk_prob,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope, rope_interleave=True, num_mtp_layers=0)
    hc._attn_implementation = "eager"
    return hc


@pytest.mark.parametrize("kw", [
    {},
    {"q_lora_rank": 24, "n_group": 4, "topk_group": 2, "route_scale": 2.5,
     "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                      "mscale": 1.0, "mscale_all_dim": 0.8}},
])
def test_forward_equals_transformers_deepseek_v3(kw):
    """Same weights (same key names: a plain state_dict load) -> same logits as HF DeepseekV3ForCausalLM."""
    transformers = pytest.importorskip("transformers")
    m = _model(seed=1, **kw).eval()
    for r in m.routers():
        r.e_score_correction_bias.normal_(0, 0.05)
    hf = transformers.DeepseekV3ForCausalLM(_hf_config(m.cfg)).eval()
    missing, unexpected = hf.load_state_dict(m.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    ids = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        ours, theirs = m(ids).logits, hf(ids).logits
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-4
