"""Precision the model documents: RoPE frequencies and router maths stay fp32 under bf16.

- ``param_dtype=bf16`` is ``model.to(torch.bfloat16)``: it must not round RoPE's ``inv_freq``
  (evaluation and the HF export rebuild it in fp32, so a bf16 copy makes training see other angles).
- Under autocast, ``F.linear`` runs in bf16 unless told otherwise; the router's logits and scores must
  be fp32 (DeepSeek-V3 computes routing in fp32): tested under CPU autocast, which casts like CUDA's.
"""

from __future__ import annotations

import math

import torch

from moeflow.models import MoETransformer
from moeflow.models.config import ModelConfig
from moeflow.models.layers import rope_inv_freq
from moeflow.models.moe import Router


def _cfg(**kw) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(max_seq_len=2048, **kw)


def _float64_angles(cfg: ModelConfig, position: int) -> torch.Tensor:
    """θ_i = position · base^(−2i/P), computed in float64 straight from the definition."""
    P, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    return torch.tensor([position * base ** (-(2 * i) / P) for i in range(P // 2)], dtype=torch.float64)


def test_rope_inv_freq_stays_fp32_under_bf16_params():
    cfg = _cfg()
    model = MoETransformer(cfg).to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # the parameters did move
    torch.testing.assert_close(model.rotary.inv_freq, rope_inv_freq(cfg)[0], rtol=0, atol=0)
    # the angle at position 2047, as cos/sin: within fp32 rounding of the float64 definition
    cos, sin = model.rotary(torch.tensor([[2047]]))
    ref = _float64_angles(cfg, 2047)
    angle = torch.atan2(sin[0, 0].double(), cos[0, 0].double())
    wrapped_err = torch.remainder(angle - ref + math.pi, 2 * math.pi) - math.pi
    assert wrapped_err.abs().max() < 1e-3  # a bf16 inv_freq is off by up to ~0.36 rad here
    # .to(device) / .float() round trips keep it fp32 too
    assert model.float().rotary.inv_freq.dtype == torch.float32


def test_router_logits_and_scores_fp32_under_autocast():
    cfg = _cfg()
    torch.manual_seed(0)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x)
    assert out.logits_TE.dtype == torch.float32 and out.scores_TE.dtype == torch.float32
    assert out.topk_weight_TK.dtype == torch.float32
    torch.testing.assert_close(out.logits_TE, ref.logits_TE, rtol=0, atol=0)
    torch.testing.assert_close(out.scores_TE, ref.scores_TE, rtol=0, atol=0)
    assert torch.equal(out.topk_idx_TK, ref.topk_idx_TK)


def test_whole_model_routes_in_fp32_under_autocast():
    """Through the full model (bf16 activations under autocast), routing choices match an fp32
    router fed the same bf16-rounded block input: the router itself adds no bf16 rounding."""
    cfg = _cfg()
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    seen = []
    moe = model.model.layers[cfg.first_k_dense].mlp
    moe.gate.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach(), out)))
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    x_TD, out = seen[0]
    ref = Router(cfg)
    ref.load_state_dict(moe.gate.state_dict())
    expected = ref(x_TD.float())
    assert out.logits_TE.dtype == torch.float32
    torch.testing.assert_close(out.logits_TE, expected.logits_TE, rtol=0, atol=0)
