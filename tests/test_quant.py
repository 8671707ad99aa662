"""INT8 weight-only: per-channel maths, every linear and expert stack converted, perplexity and memory.

The perplexity test trains a tiny MoE for a few seconds on a synthetic Markov language (so its
perplexity means something: far below the uniform vocabulary), quantizes a copy, and bounds the
relative perplexity change, in fp32 and bf16; the memory of the quantized model is measured.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.generation import generate
from moeflow.models.moe import RoutedExperts
from moeflow.models.quant import (Int8Linear, Int8RoutedExperts, dequantize_rows, model_bytes, quantize_int8,
                                  quantize_rows)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
VOCAB, SEQ = 96, 48


def test_quantize_rows_error_is_at_most_half_a_step_per_channel():
    torch.manual_seed(0)
    w = torch.randn(6, 40) * torch.logspace(-3, 1, 6)[:, None]  # rows of very different magnitude
    w[2] = 0.0
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (6,)
    assert q.abs().max() == 127
    err = (dequantize_rows(q, s, torch.float32) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-9).all()
    assert torch.equal(dequantize_rows(q, s, torch.float32)[2], torch.zeros(40))


def test_int8_linear_fused_kernel_equals_dequantized_reference():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24, bias=False)
    q = Int8Linear(lin)
    x = torch.randn(2, 5, 32)
    fused = q(x)
    Int8Linear.use_int8pack_mm = False
    try:
        ref = q(x)
    finally:
        Int8Linear.use_int8pack_mm = True
    assert fused.shape == (2, 5, 24)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    assert (fused - lin(x)).abs().max() < 0.05 * lin(x).abs().max()
    torch.testing.assert_close(q.weight, dequantize_rows(q.weight_int8, q.scale, torch.float32))


def _markov_batches(num: int, batch: int, seed: int) -> list[torch.Tensor]:
    """Sequences from a fixed random bigram chain with 3 likely successors per token."""
    g = torch.Generator().manual_seed(1234)  # the language is fixed; ``seed`` picks the samples
    logits = torch.randn(VOCAB, VOCAB, generator=g)
    top = logits.topk(3, dim=-1).indices
    probs = torch.full((VOCAB, VOCAB), 0.02 / VOCAB).scatter_(1, top, 0.98 / 3)
    gs = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        x = torch.empty(batch, SEQ, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (batch,), generator=gs)
        for t in range(1, SEQ):
            x[:, t] = torch.multinomial(probs[x[:, t - 1]], 1, generator=gs)[:, 0]
        out.append(x)
    return out


@pytest.fixture(scope="module")
def trained(one_cpu_thread) -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=VOCAB, max_seq_len=SEQ)
    model = MoETransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3)
    for x in _markov_batches(60, 16, seed=1):
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def _perplexity(model, batches) -> float:
    nll = [model(x[:, :-1], x[:, 1:]).aux["lm_loss"].float() for x in batches]
    return math.exp(float(torch.stack(nll).mean()))


def test_every_linear_and_expert_stack_is_quantized(trained):
    m = copy.deepcopy(trained)
    n_linear = sum(isinstance(x, nn.Linear) for x in m.modules())
    n_stacks = sum(type(x) is RoutedExperts for x in m.modules())
    report = quantize_int8(m)
    assert report.num_linears == n_linear and report.num_expert_stacks == n_stacks == m.cfg.num_moe_layers
    assert not any(isinstance(x, nn.Linear) for x in m.modules())
    assert all(type(x) is Int8RoutedExperts for x in m.modules() if isinstance(x, RoutedExperts))
    # only norms, routers, embeddings and the RoPE table stay floating point
    float_names = [n for n, t in list(m.named_parameters()) + list(m.named_buffers()) if t.is_floating_point()
                   and not n.endswith(("scale", "weight_scale"))]
    assert all(n.endswith(("norm.weight", "layernorm.weight", "gate.weight", "e_score_correction_bias",
                           "embed_tokens.weight", "inv_freq")) for n in float_names), float_names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_perplexity_delta_is_small_and_memory_shrinks(trained, dtype):
    held_out = _markov_batches(6, 16, seed=99)
    base = copy.deepcopy(trained).to(dtype)
    ppl_base = _perplexity(base, held_out)
    assert ppl_base < VOCAB / 8, "the model must have learned the chain, or the delta means nothing"
    q = copy.deepcopy(base)
    report = quantize_int8(q)
    ppl_q = _perplexity(q, held_out)
    delta = ppl_q / ppl_base - 1
    print(f"\n{dtype}: perplexity {ppl_base:.4f} -> int8 {ppl_q:.4f} ({100 * delta:+.3f} %), "
          f"bytes {report.bytes_before} -> {report.bytes_after} ({report.ratio:.3f})")
    assert abs(delta) < 0.01
    # weights of linears + experts shrink 4x (fp32) / 2x (bf16), plus a scale per output channel
    limit = 0.40 if dtype == torch.float32 else 0.62
    assert report.ratio < limit and model_bytes(q) == report.bytes_after


def test_quantized_model_generates_like_the_original_mostly(trained):
    prompt = [[3, 17, 5, 40]]
    q = copy.deepcopy(trained)
    quantize_int8(q)
    a = generate(trained, prompt, 16).tokens[0]
    b = generate(q, prompt, 16).tokens[0]
    assert sum(x == y for x, y in zip(a, b)) >= 12  # greedy on a peaked chain: int8 rarely flips a choice


def test_int8_experts_equal_experts_with_dequantized_weights():
    """Sharp check of the 3-D path: same function as the float experts holding q · s."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    ref = RoutedExperts(cfg)
    with torch.no_grad():
        ref.gate_up_proj.normal_(0, 0.1).mul_(torch.logspace(-1, 1, ref.gate_up_proj.shape[1])[None, :, None])
        ref.down_proj.normal_(0, 0.1)
    q = Int8RoutedExperts(ref)
    with torch.no_grad():
        ref.gate_up_proj.copy_(dequantize_rows(q.gate_up_int8, q.gate_up_scale, torch.float32))
        ref.down_proj.copy_(dequantize_rows(q.down_int8, q.down_scale, torch.float32))
    x = torch.randn(20, cfg.hidden_size)
    idx = torch.randint(0, cfg.num_routed_experts, (20, cfg.num_experts_per_tok))
    w = torch.rand(20, cfg.num_experts_per_tok)
    torch.testing.assert_close(q(x, idx, w), ref(x, idx, w), rtol=1e-5, atol=1e-6)
    assert q.gate_up_scale.shape == (cfg.num_routed_experts, 2 * cfg.moe_intermediate_size)
    assert q.down_scale.shape == (cfg.num_routed_experts, cfg.hidden_size)


def _int8_grouped_model(cfg: ModelConfig, device: str = "cpu") -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(device, torch.bfloat16).eval()
    quantize_int8(model)
    for m in model.modules():
        if isinstance(m, Int8RoutedExperts):
            m.use_grouped_mm = True  # the GPU path (torch._grouped_mm also runs on the CPU in bf16)
    return model


def test_grouped_int8_experts_share_one_dequantized_copy_per_shape_and_compute_the_same():
    """Without autograd every layer dequantizes into the SAME scratch tensors (one per stack shape); the
    logits equal those of fresh per-layer copies (the autograd path) bit for bit."""
    model = _int8_grouped_model(ModelConfig.preset("tiny"))
    layers = [m for m in model.modules() if isinstance(m, Int8RoutedExperts)]
    assert len(layers) >= 2 and all(m.scratch is layers[0].scratch for m in layers)
    x = torch.randint(0, model.cfg.vocab_size, (3, 9))
    fresh = model(x).logits  # grad enabled: fresh copies, the scratch stays unused
    assert layers[0].scratch == {}
    with torch.inference_mode():
        shared = model(x).logits
    assert torch.equal(shared, fresh.detach())
    stacks = {(tuple(m.gate_up_int8.shape), torch.bfloat16, x.device) for m in layers} \
        | {(tuple(m.down_int8.shape), torch.bfloat16, x.device) for m in layers}
    assert set(layers[0].scratch) == stacks  # one copy per shape for the whole model
    with torch.no_grad():  # scratch first made under inference_mode, then written outside it (engine warm-up, then serving)
        assert torch.equal(model(x).logits, fresh.detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_graph_engine_peak_memory_stays_bounded_with_many_buckets():
    """The INT8 engine with CUDA graphs at many (batch, width) buckets: the peak GPU memory past the weights
    is about one layer's dequantized stacks plus the slot cache and activations, not a copy per bucket."""
    from moeflow.models.serving import Engine

    cfg = ModelConfig.preset("bench_ref").replace(num_layers=4, max_seq_len=512)
    model = _int8_grouped_model(cfg, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    layer = next(m for m in model.modules() if isinstance(m, Int8RoutedExperts))
    one_layer_bf16 = 2 * (layer.gate_up_int8.numel() + layer.down_int8.numel())
    torch.cuda.reset_peak_memory_stats()
    engine = Engine(model, max_batch=32, context_len=256, cache_len=512, decode_mode="graph")
    num_graphs = engine.warmup()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert num_graphs >= 12
    assert peak < 2 * one_layer_bf16 + 2 * 2**30, f"{peak / 2**30:.2f} GiB over the weights, {num_graphs} graphs"
