"""MTP input layout pinned against DeepSeek-V3's, through our Hugging Face export's keys.

DeepSeek-V3's MTP layer (as vLLM loads DeepSeek's released checkpoints, vllm-project/vllm
``vllm/model_executor/models/deepseek_mtp.py``, ``DeepSeekMultiTokenPredictorLayer.forward``):

    h' = eh_proj(concat(enorm(Emb(t_{i+1})), hnorm(h_i)))      -- embedding half FIRST
    then the decoder block (``model.layers.{L+j}.*``), then ``shared_head.norm`` and the shared head,

with the weights at ``model.layers.{L+j}.{enorm, hnorm, eh_proj}.weight`` and
``model.layers.{L+j}.shared_head.norm.weight``. The reference below is written from that
description with the EXPORTED tensors (not our modules), so it catches a swapped concatenation, a
swapped enorm/hnorm, or an export that maps a name to the wrong tensor. (Our own round-trip test
cannot: a consistent swap on both sides survives it.)
"""

from __future__ import annotations

import torch

from moeflow.models import MoETransformer
from moeflow.models.config import ModelConfig
from moeflow.models.hf import to_hf_state_dict


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_mtp_input_is_eh_proj_of_enorm_embedding_then_hnorm_hidden_in_deepseek_v3_keys():
    cfg = ModelConfig.preset("tiny").replace(mtp_depth=1)
    torch.manual_seed(0)
    model = MoETransformer(cfg).double()
    with torch.no_grad():  # distinct norm weights, so swapping enorm/hnorm changes the result too
        model.mtp[0].enorm.weight.uniform_(0.5, 1.5)
        model.mtp[0].hnorm.weight.uniform_(2.0, 3.0)
        model.mtp[0].norm.weight.uniform_(0.5, 1.5)
    captured = {}

    def keep(name, value) -> None:  # a hook that returns a value would replace the output
        captured.setdefault(name, value)

    model.model.layers[-1].register_forward_hook(lambda m, a, out: keep("h", out[0]))
    model.mtp[0].block.register_forward_pre_hook(lambda m, args: keep("x", args[0]))
    model.mtp[0].register_forward_hook(lambda m, a, out: keep("normed", out[1]))
    model.mtp[0].block.register_forward_hook(lambda m, a, out: keep("block_out", out[0]))
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        model(ids, targets=ids)

    hf = to_hf_state_dict(model.state_dict(), cfg)
    L, eps = cfg.num_layers, cfg.rms_norm_eps
    next_ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)  # t_{i+1} (padded tail)
    emb = hf["model.embed_tokens.weight"][next_ids]
    concat = torch.cat([_rms(emb, hf[f"model.layers.{L}.enorm.weight"], eps),
                        _rms(captured["h"], hf[f"model.layers.{L}.hnorm.weight"], eps)], dim=-1)
    expected_x = concat @ hf[f"model.layers.{L}.eh_proj.weight"].T
    torch.testing.assert_close(captured["x"], expected_x, rtol=1e-4, atol=1e-6)  # RMSNorm computes in fp32
    expected_normed = _rms(captured["block_out"], hf[f"model.layers.{L}.shared_head.norm.weight"], eps)
    torch.testing.assert_close(captured["normed"], expected_normed, rtol=1e-4, atol=1e-6)  # RMSNorm computes in fp32
    # the block's own weights sit at model.layers.{L}.* with the decoder layer's names
    torch.testing.assert_close(hf[f"model.layers.{L}.self_attn.o_proj.weight"],
                               model.mtp[0].block.self_attn.o_proj.weight)
