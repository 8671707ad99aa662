"""MLA: absorbed (latent-cache) attention equals the expanded path; padding and cache modes."""

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.attention import MLA, MLACache, prepare_attention
from moeflow.models.layers import RotaryEmbedding


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=97, **kw)
    return MoETransformer(cfg).double().eval()


@pytest.mark.parametrize("bmm_max", [2**25, 0])  # the bmm (decode) and the SDPA (long prefill) branches
@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": 24, "rope_scaling": {
    "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0}}])
def test_absorbed_layer_equals_expanded_layer(kw, bmm_max, monkeypatch):
    monkeypatch.setattr(MLA, "absorbed_bmm_max_scores", bmm_max)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(**kw)
    attn = MLA(cfg, layer_idx=0).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    B, T = 2, 9
    x = torch.randn(B, T, cfg.hidden_size, dtype=torch.float64)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(T).expand(B, T))
    want = attn(x, cos, sin)
    cache = MLACache.for_config(cfg, B, 16, dtype=torch.float64)
    _, _, step = prepare_attention(torch.zeros(B, T, dtype=torch.long), None, None, cache, None)
    got = attn(x, cos, sin, step=step)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert cache.length == T and cache.bytes_per_token() == (32 + 8) * 8 * cfg.num_layers


def test_prefill_and_decode_equal_full_forward():
    m = _model()
    ids = torch.randint(0, 97, (2, 12))
    full = m(ids).logits
    cache = m.new_cache(2, 16)
    pre = m(ids[:, :7], cache=cache).logits
    torch.testing.assert_close(pre, full[:, :7], rtol=1e-9, atol=1e-9)
    for t in range(7, 12):
        step = m(ids[:, t:t + 1], cache=cache).logits
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-9, atol=1e-9)
    assert cache.length == 12
    with pytest.raises(ValueError, match="cache full"):
        m(ids[:, :5], cache=cache)


def test_left_padded_batch_matches_unpadded_rows():
    m = _model()
    a = torch.randint(0, 97, (1, 8))
    b = torch.randint(0, 97, (1, 5))
    pad = 3
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :pad] = 0
    ref_a, ref_b = m(a).logits, m(b).logits
    # no cache: explicit mask path
    out = m(ids, attention_mask_BS=mask).logits
    torch.testing.assert_close(out[0], ref_a[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[1, pad:], ref_b[0], rtol=1e-9, atol=1e-9)
    assert torch.isfinite(out).all()
    # cache: prefill then decode one more token per row
    cache = m.new_cache(2, 12)
    pre = m(ids, attention_mask_BS=mask, cache=cache).logits
    torch.testing.assert_close(pre[1, pad:], ref_b[0], rtol=1e-9, atol=1e-9)
    nxt = torch.tensor([[5], [6]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    step = m(nxt, attention_mask_BS=mask2, cache=cache).logits
    torch.testing.assert_close(step[0, 0], m(torch.cat([a, nxt[:1]], 1)).logits[0, -1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(step[1, 0], m(torch.cat([b, nxt[1:]], 1)).logits[0, -1], rtol=1e-9, atol=1e-9)
    assert cache.num_real_B.tolist() == [9, 6]


def test_static_cache_position_mode_matches_dynamic():
    m = _model()
    ids = torch.randint(0, 97, (2, 6))
    full = m(ids).logits
    cache = m.new_cache(2, 10)
    m(ids[:, :4], cache=cache, cache_position=torch.arange(4))
    for t in range(4, 6):
        out = m(ids[:, t:t + 1], cache=cache, cache_position=torch.tensor([t]))
        torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=1e-9, atol=1e-9)
    assert cache.length == 0  # the caller owns the position in static mode
