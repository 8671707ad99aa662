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
    with torch.inference_mode():  # the looped path dequantizes into rows of the shared scratch here
        torch.testing.assert_close(q(x, idx, w), ref(x, idx, w), rtol=1e-5, atol=1e-6)
    assert q.scratch
    assert q.gate_up_scale.shape == (cfg.num_routed_experts, 2 * cfg.moe_intermediate_size)
    assert q.down_scale.shape == (cfg.num_routed_experts, cfg.hidden_size)


def _int8_experts(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Int8RoutedExperts:
    """Int8 experts whose rows differ in magnitude (so a wrong scale row shows) from seeded random weights."""
    torch.manual_seed(0)
    ref = RoutedExperts(cfg)
    with torch.no_grad():
        ref.gate_up_proj.normal_(0, 0.1).mul_(torch.logspace(-1, 1, ref.gate_up_proj.shape[1])[None, :, None])
        ref.down_proj.normal_(0, 0.1).mul_(torch.logspace(1, -1, ref.down_proj.shape[1])[None, :, None])
        ref.gate_up_proj.mul_(torch.linspace(0.5, 2, cfg.num_routed_experts)[:, None, None])  # experts differ in size
    return Int8RoutedExperts(ref.to(device, dtype))


def _routing(T: int, cfg: ModelConfig, seed: int = 0, device: str = "cpu"):
    """x (T, D), idx (T, K) with distinct experts per token (as top-k gives) and every token different, w (T, K)."""
    g = torch.Generator().manual_seed(seed)
    E, K = cfg.num_routed_experts, cfg.num_experts_per_tok
    x = torch.randn(T, cfg.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return x.to(device), idx.to(device), w.to(device)


def _both_paths(q: Int8RoutedExperts, x, idx, w, whole: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-slot gather, whole stack) outputs; whole = "looped" | "grouped" picks the whole-stack path."""
    q.use_grouped_mm = whole == "grouped"
    try:
        q.use_slot_gather = True
        slot = q(x, idx, w)
        q.use_slot_gather = False
        stack = q(x, idx, w)
    finally:
        del q.use_slot_gather  # back to the class default (auto)
    return slot, stack


@pytest.mark.parametrize("mode", ["grad", "inference"])  # fresh tensors / the first rows of the shared scratch
def test_slot_weights_are_the_whole_stack_rows_dequantized_bit_for_bit(mode):
    cfg = ModelConfig.preset("tiny")
    for dtype in (torch.float32, torch.bfloat16):
        q = _int8_experts(cfg, dtype)
        expert_N = torch.tensor([5, 0, 5, 7, 3, 5])  # repeats: slots that share an expert
        with torch.inference_mode(mode == "inference"):
            gu, dn = q.slot_weights(expert_N, dtype)
        assert gu.shape == (6, 2 * cfg.moe_intermediate_size, cfg.hidden_size) and gu.dtype == dtype
        assert dn.shape == (6, cfg.hidden_size, cfg.moe_intermediate_size)
        assert torch.equal(gu, dequantize_rows(q.gate_up_int8, q.gate_up_scale, dtype)[expert_N])
        assert torch.equal(dn, dequantize_rows(q.down_int8, q.down_scale, dtype)[expert_N])
        in_scratch = {t.data_ptr() for t in q.scratch.values()}
        assert (gu.data_ptr() in in_scratch and dn.data_ptr() in in_scratch) == (mode == "inference")


def test_the_path_is_chosen_from_shapes_per_slot_below_e_slots():
    """tiny: E = 8 experts, K = 2: 1..3 tokens (2..6 slots) gather per slot where the whole stack would run
    grouped; 4 tokens = 8 slots = E do not; the CPU's looped path stays the CPU default at every size."""
    cfg = ModelConfig.preset("tiny")
    q = _int8_experts(cfg)
    assert Int8RoutedExperts.use_slot_gather is None  # auto by default
    taken = []
    q._per_slot = lambda *a: taken.append("slot") or torch.zeros(a[0].shape)
    for grouped in (True, False):
        q.use_grouped_mm = grouped
        for T in (1, 3, 4, 9):
            x, idx, w = _routing(T, cfg)
            q(x, idx, w)
            taken.append(f"T={T}")
    assert taken == ["slot", "T=1", "slot", "T=3", "T=4", "T=9", "T=1", "T=3", "T=4", "T=9"]


@pytest.mark.parametrize("T", [1, 3, 4])  # 4 tokens: T·K == E, the boundary (forced here)
@pytest.mark.parametrize("whole", ["looped", "grouped"])
def test_per_slot_path_equals_whole_stack_path_fp32(T, whole):
    cfg = ModelConfig.preset("tiny")
    q = _int8_experts(cfg)
    x, idx, w = _routing(T, cfg, seed=T)
    if T == 3:
        idx[:, 0] = 6  # every token routed to expert 6 (slots sharing an expert)
    slot, stack = _both_paths(q, x, idx, w, whole)
    assert slot.shape == (T, cfg.hidden_size) and slot.abs().max() > 0.1
    torch.testing.assert_close(slot, stack, rtol=1e-5, atol=1e-5)  # fp32: matmul summation order only
    # gradients reach x and the gate weights the same way (the int8 stacks are buffers)
    grads = []
    for flag in (True, False):
        q.use_slot_gather = flag
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (q(xg, idx, wg) * torch.arange(cfg.hidden_size)).sum().backward()
        grads.append((xg.grad, wg.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("whole", ["looped", "grouped"])
def test_per_slot_path_equals_whole_stack_path_bf16_under_inference_mode(whole):
    cfg = ModelConfig.preset("tiny")
    q = _int8_experts(cfg, torch.bfloat16)
    q.scratch.clear()
    for T in (1, 2, 3):
        x, idx, w = _routing(T, cfg, seed=10 + T)
        idx[-1, 1] = idx[0, 0]  # the last token shares the first one's expert
        with torch.inference_mode():
            slot, stack = _both_paths(q, x.bfloat16(), idx, w, whole)
        assert slot.dtype == torch.bfloat16 and slot.is_inference()
        # bf16: both run the same dequantized weights; the matmuls round h and y to bf16 in different orders
        scale = stack.float().abs().max()
        assert (slot.float() - stack.float()).abs().max() <= 0.02 * scale, (T, whole)
        # and both are close to the fp32 maths on the same int8 weights (neither path is the odd one out)
        exact = _fp32_reference(q, x.bfloat16().float(), idx, w)
        assert (slot.float() - exact).abs().max() <= 0.02 * exact.abs().max()


def _fp32_reference(q: Int8RoutedExperts, x, idx, w) -> torch.Tensor:
    """A naive per-(token, slot) loop in fp32 on the int8 weights dequantized in q's dtype."""
    dt = q.gate_up_scale.dtype
    gu = dequantize_rows(q.gate_up_int8, q.gate_up_scale, dt).float()
    dn = dequantize_rows(q.down_int8, q.down_scale, dt).float()
    out = torch.zeros(x.shape)
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            h = gu[idx[t, j]] @ x[t]
            gate, up = h.split(q.width)
            out[t] += w[t, j] * (dn[idx[t, j]] @ (torch.nn.functional.silu(gate) * up))
    return out


def test_per_slot_path_matches_a_naive_fp32_loop():
    cfg = ModelConfig.preset("tiny")
    q = _int8_experts(cfg)
    x, idx, w = _routing(3, cfg, seed=5)
    q.use_slot_gather = True
    torch.testing.assert_close(q(x, idx, w), _fp32_reference(q, x, idx, w), rtol=1e-5, atol=1e-5)


def test_per_slot_path_has_no_host_sync_and_compiles_whole():
    """On the meta device (shapes, no data) any host read (``.item()``, ``.tolist()``, ``nonzero``, ``bool()``)
    raises, as the looped path's ``tolist`` does; the per-slot path runs there. And it compiles whole
    (fullgraph, aot_eager: traced through functionalization, dynamic token count) under inference_mode,
    computing the same."""
    cfg = ModelConfig.preset("tiny")
    q = _int8_experts(cfg)
    q.use_grouped_mm = True
    meta = copy.deepcopy(q).to("meta")
    x, idx, w = (t.to("meta") for t in _routing(3, cfg))
    for mode in (False, True):
        with torch.inference_mode(mode):
            assert meta(x, idx, w).shape == (3, cfg.hidden_size)
    meta.use_slot_gather, meta.use_grouped_mm = False, False
    with pytest.raises(NotImplementedError, match="meta"):  # the detector detects
        meta(x, idx, w)
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager", dynamic=True)
    for T in (1, 2, 3):
        x, idx, w = _routing(T, cfg, seed=T)
        assert q._slot_path(x, idx)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x, idx, w), q(x, idx, w), rtol=0, atol=0)
    torch._dynamo.reset()


def test_int8_model_decodes_the_same_with_and_without_the_slot_path(trained):
    """A whole model: prefill (4 tokens × K = E slots: whole stack) then batch-1 decode (per slot, auto) gives
    the tokens and log-probs of the same model forced onto the whole (grouped) stack, fp32, inference_mode."""
    q = copy.deepcopy(trained)
    quantize_int8(q)
    for m in q.modules():
        if isinstance(m, Int8RoutedExperts):
            m.use_grouped_mm = True  # the GPU's whole-stack path (auto takes the per-slot gather only beside it)
    runs = []
    for flag in (None, False):
        Int8RoutedExperts.use_slot_gather = flag
        try:
            with torch.inference_mode():
                runs.append(generate(q, [[3, 17, 5, 40]], 12, return_logprobs=True))
        finally:
            Int8RoutedExperts.use_slot_gather = None
    assert runs[0].tokens == runs[1].tokens
    torch.testing.assert_close(torch.tensor(runs[0].logprobs), torch.tensor(runs[1].logprobs), rtol=1e-5, atol=1e-5)


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_per_slot_path_on_the_gpu_syncs_never_captures_and_equals_grouped():
    """bench_ref sizes in bf16 on CUDA: the per-slot path (auto at 8 tokens × 6 < 64) runs with the sync
    debug mode at "error", replays inside a CUDA graph, and equals the grouped whole-stack path to bf16
    rounding."""
    cfg = ModelConfig.preset("bench_ref")
    q = _int8_experts(cfg, torch.bfloat16, "cuda")
    x, idx, w = _routing(8, cfg, seed=1, device="cuda")
    x = x.bfloat16()
    with torch.inference_mode():
        assert q._slot_path(x, idx)
        torch.cuda.set_sync_debug_mode("error")
        try:
            slot = q(x, idx, w)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph, static_x = torch.cuda.CUDAGraph(), x.clone()
        with torch.cuda.graph(graph):
            static_y = q(static_x, idx, w)
        static_x.copy_(x)
        graph.replay()
        slot_g, stack = _both_paths(q, x, idx, w, "grouped")
    torch.cuda.synchronize()
    assert torch.equal(static_y, slot)
    scale = stack.float().abs().max()
    assert (slot.float() - stack.float()).abs().max() <= 0.02 * scale
    assert torch.equal(slot_g, slot)


def test_bench_int8_experts_runs_and_its_int8_rows_agree(tmp_path):
    """benchmarks/bench_int8_experts.py on the tiny preset (its GPU run is for the lead): every row runs, the
    int8 rows compute the same function, and the auto column follows the rule (CPU fp32: the looped path)."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_int8_experts.py"
    spec = importlib.util.spec_from_file_location("bench_int8_experts", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.jsonl"
    assert bench.main(["--preset", "tiny", "--tokens", "1", "4", "--rounds", "1", "--reps", "1", "--warmup", "0",
                       "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and {r["auto"] for r in rows} == {"whole stack, looped"}
    assert all(r["max_rel_diff"] < 1e-5 for r in rows if r["row"].startswith("int8"))
    # the quantization shows, and is small
    assert all(0 < r["max_rel_diff"] < 0.1 for r in rows if r["row"] in ("float", "shared expert, int8"))
    assert Int8RoutedExperts.use_slot_gather is None and Int8RoutedExperts.use_grouped_mm is None
