"""The fused RoPE (models/kernels/rope.py) against the eager formula (``models.layers.apply_rope``), and the rules
that decide where ``RotaryEmbedding.rotate`` takes it.

The kernel runs on CUDA where there is one, else in Triton's interpreter on the CPU (conftest sets
TRITON_INTERPRET=1 on a machine without a GPU). On the CPU the model-level tests add "cpu" to
``RotaryEmbedding.kernel_devices`` (and switch ``fused_inference`` on: it is off by default) so the model runs
through the interpreted kernel. Everything here skips when triton is not importable: it is an optional
accelerator.

"The same function" is meant bit for bit here: RoPE is element-wise, the kernel rounds where the formula rounds
(cos/sin to x's dtype, each product, the difference and the sum), so every comparison is ``torch.equal``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import (
    assert_generate_equals, engine_greedy_tokens, kernel_test_model, kernel_test_prompts, sm90_compile_report,
    triton_kernels)

from moeflow.models import ModelConfig
from moeflow.models.layers import RotaryEmbedding, apply_rope

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# magnitudes of x: tiny (fp16 products go subnormal), ordinary, large (past fp16's range: bf16/fp32 only)
SCALES = {torch.bfloat16: (1e-30, 1.0, 3e33), torch.float16: (1e-3, 1.0, 200.0),
          torch.float32: (1e-30, 1.0, 3e33)}


@pytest.fixture(scope="module")
def rk():
    """kernels.rope with a runnable kernel: compiled on CUDA, interpreted on the CPU (else skip)."""
    return triton_kernels("rope", "_rope_kernel")


@pytest.fixture(scope="module")
def device(rk):
    return "cuda" if torch.cuda.is_available() else "cpu"


def _tables(B, T, P, g, device, scale=1.0):
    """cos/sin (B, T, P/2) in fp32 of random angles, times ``scale`` (YaRN's attention factor may exceed 1)."""
    angles = torch.rand(B, T, P // 2, generator=g) * 2000.0
    return (angles.cos() * scale).to(device), (angles.sin() * scale).to(device)


def _views(B, T, H, P, dtype, scale, g, device):
    """The x's attention passes: the queries' rope part (a split of (B, T, H, N + P)), the key's (a split of
    (B, T, R + P)), heads-major data transposed to (B, T, H, P), and plain contiguous 3-D / 4-D tensors."""
    def rand(*shape):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    yield rand(B, T, H, 8 + P).split([8, P], dim=-1)[1]
    yield rand(B, T, 24 + P).split([24, P], dim=-1)[1]
    yield rand(B, H, T, P).transpose(1, 2)
    yield rand(B, T, P)
    yield rand(B, T, H, P)
    yield rand(B, T, H, 2 * P)[..., ::2]  # a stride of 2 within the rope dim


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_equal_to_the_formula(rk, device, dtype):
    """Every shape, view and magnitude: ``torch.equal`` with ``apply_rope`` (the output contiguous, x's dtype)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 1, 1, 2), (2, 3, 3, 8), (1, 2, 16, 32), (3, 2, 1, 64), (2, 1, 5, 2)]  # (B, T, H, P)
    checked = 0
    for (B, T, H, P), scale in itertools.product(shapes, SCALES[dtype]):
        cos, sin = _tables(B, T, P, g, device, scale=1.3 if scale == 1.0 else 1.0)
        for x in _views(B, T, H, P, dtype, scale, g, device):
            got, want = rk.apply_rope(x, cos, sin), apply_rope(x, cos, sin)
            assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
            assert torch.equal(got, want), (B, T, H, P, scale, tuple(x.stride()))
            checked += 1
    assert checked == len(shapes) * len(SCALES[dtype]) * 6


def test_many_rounding_ties_and_wide_heads(rk, device):
    """bf16 products tie (their low 8 bits 0x80) about once in 256 elements: a larger call, heads past one
    tile (two head blocks), so ties-to-even and the head-block grid are both exercised."""
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        B, T, H, P = 2, 3, rk.MAX_TILE // 16 + 3, 32
        cos, sin = _tables(B, T, P, g, device)
        x = (torch.randn(B, T, H, P, generator=g)).to(device=device, dtype=dtype)
        assert torch.equal(rk.apply_rope(x, cos, sin), apply_rope(x, cos, sin))


def test_strided_and_low_precision_tables(rk, device):
    """cos/sin read through their strides (every stride of its own: batch and tokens that do not flatten, pairs
    two apart; a batch broadcast by ``expand``, stride 0) and in bf16/fp16 (the formula casts them to x's dtype;
    so does the kernel)."""
    g = torch.Generator().manual_seed(2)
    B, T, H, P = 2, 3, 4, 16
    wide_cos, wide_sin = _tables(T, B, 2 * P, g, device)  # (T, B, P) of (P/2)-pair tables, interleaved
    strided = (wide_cos.transpose(0, 1)[..., ::2], wide_sin.transpose(0, 1)[..., 1::2])
    one_cos, one_sin = _tables(1, T, P, g, device)
    tables = [strided, (one_cos.expand(B, T, P // 2), one_sin.expand(B, T, P // 2))]
    for (cos, sin), dtype in itertools.product(tables, DTYPES):
        assert cos.shape == sin.shape == (B, T, P // 2)
        x = torch.randn(B, T, H, P, generator=g).to(device=device, dtype=dtype)
        assert torch.equal(rk.apply_rope(x, cos, sin), apply_rope(x, cos, sin))
        assert torch.equal(rk.apply_rope(x[:, :, 1], cos, sin), apply_rope(x[:, :, 1], cos, sin))
        for table_dtype in (torch.bfloat16, torch.float16):
            c, s = cos.to(table_dtype), sin.to(table_dtype)
            assert torch.equal(rk.apply_rope(x, c, s), apply_rope(x, c, s))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_model_tables_and_non_finite_values(rk, device):
    """The model's own cos/sin (positions up to 2,047) and inf / NaN in x propagate as in the formula."""
    cfg = ModelConfig.preset("tiny")
    B, T, P = 2, 4, cfg.qk_rope_head_dim
    cos, sin = RotaryEmbedding(cfg).to(device)(torch.tensor([[0, 1, 2, 3], [2044, 2045, 2046, 2047]], device=device))
    g = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        x = torch.randn(B, T, 3, P, generator=g).to(device=device, dtype=dtype)
        x[0, 0, 0, 0], x[1, 1, 2, 5], x[1, 3, 1, 2] = float("inf"), float("nan"), -float("inf")
        got, want = rk.apply_rope(x, cos, sin), apply_rope(x, cos, sin)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


def test_kernel_applies_table(rk):
    x, cos = torch.zeros(2, 3, 4, 8), torch.zeros(2, 3, 4)
    assert rk.kernel_applies(x, cos, cos) and rk.kernel_applies(x[:, :, 0], cos, cos)
    assert rk.kernel_applies(x.bfloat16(), cos, cos.half())
    with torch.no_grad():
        assert rk.kernel_applies(x.clone().requires_grad_(True), cos, cos)
    refused = [(x.double(), cos, cos), (x, cos.double(), cos), (x[..., :7], cos[..., :3], cos[..., :3]),
               (x[0], cos[0], cos[0]), (x[None], cos, cos), (torch.zeros(0, 3, 4, 8), cos[:0], cos[:0]),
               (x, cos[:1], cos[:1]), (x, cos[:, :1], cos), (x, cos, cos[..., :2]),
               (x.clone().requires_grad_(True), cos, cos), (x, cos, cos.clone().requires_grad_(True)),
               (torch.zeros(1, 1, rk.MAX_P + 2), torch.zeros(1, 1, rk.MAX_P // 2 + 1),
                torch.zeros(1, 1, rk.MAX_P // 2 + 1))]
    for args in refused:
        assert not rk.kernel_applies(*args), [tuple(t.shape) for t in args]
    if torch.cuda.is_available():
        assert not rk.kernel_applies(x.cuda(), cos, cos)  # tables on another device


# --------------------------------------------------------------------------- where RotaryEmbedding.rotate takes it
class _Counted:
    """Replaces the kernel entry with a counting wrapper (``raise_on_call``: fail instead)."""

    def __init__(self, rk, monkeypatch, raise_on_call=False):
        self.calls = 0
        real = rk.apply_rope

        def wrapper(*args, **kw):
            if raise_on_call:
                raise AssertionError("the RoPE kernel was called where the formula was expected")
            self.calls += 1
            return real(*args, **kw)

        monkeypatch.setattr(rk, "apply_rope", wrapper)


def _inputs(device, B=2, T=3, H=4, P=8, seed=4):
    g = torch.Generator().manual_seed(seed)
    cos, sin = _tables(B, T, P, g, device)
    return torch.randn(B, T, H, P, generator=g).to(device), cos, sin


def test_cpu_tensors_take_the_formula_by_default(rk, monkeypatch):
    _Counted(rk, monkeypatch, raise_on_call=True)
    assert RotaryEmbedding.fused_inference is True and RotaryEmbedding.kernel_devices == ("cuda",)  # on, CUDA only
    x, cos, sin = _inputs("cpu")
    with torch.no_grad():
        assert torch.equal(RotaryEmbedding.rotate(x, cos, sin), apply_rope(x, cos, sin))
        monkeypatch.setattr(RotaryEmbedding, "fused_inference", True)  # on, but the CPU is no kernel device
        assert torch.equal(RotaryEmbedding.rotate(x, cos, sin), apply_rope(x, cos, sin))


def test_the_kernel_only_without_autograd_and_with_the_switch_on(rk, device, monkeypatch):
    monkeypatch.setattr(RotaryEmbedding, "kernel_devices", ("cuda", "cpu"))
    monkeypatch.setattr(RotaryEmbedding, "fused_inference", True)
    counted = _Counted(rk, monkeypatch)
    x, cos, sin = _inputs(device)
    with torch.no_grad():
        assert torch.equal(RotaryEmbedding.rotate(x, cos, sin), apply_rope(x, cos, sin))
    with torch.inference_mode():
        RotaryEmbedding.rotate(x[:, :, 0], cos, sin)
    assert counted.calls == 2
    # autograd on, nothing requires grad (a frozen model): no graph to record, the kernel
    RotaryEmbedding.rotate(x, cos, sin)
    assert counted.calls == 3
    # training: x requires grad -> the formula, and the gradient flows
    x_grad = x.clone().requires_grad_(True)
    RotaryEmbedding.rotate(x_grad, cos, sin).square().sum().backward()
    assert counted.calls == 3 and x_grad.grad is not None and x_grad.grad.abs().sum() > 0
    x_ref = x.clone().requires_grad_(True)
    apply_rope(x_ref, cos, sin).square().sum().backward()
    assert torch.equal(x_grad.grad, x_ref.grad)
    # a shape the kernel does not take (tables broadcast over the batch): the formula
    with torch.no_grad():
        assert torch.equal(RotaryEmbedding.rotate(x, cos[:1], sin[:1]), apply_rope(x, cos[:1], sin[:1]))
    assert counted.calls == 3
    monkeypatch.setattr(RotaryEmbedding, "fused_inference", False)
    with torch.no_grad():
        RotaryEmbedding.rotate(x, cos, sin)
    assert counted.calls == 3


def test_torch_compile_traces_the_formula(rk, device, monkeypatch):
    """Under torch.compile the formula is traced (inductor fuses it), never the kernel, even where eager would
    take it: the FX graph holds the cat and the products, the kernel entry is not called."""
    monkeypatch.setattr(RotaryEmbedding, "kernel_devices", ("cuda", "cpu"))
    monkeypatch.setattr(RotaryEmbedding, "fused_inference", True)
    _Counted(rk, monkeypatch, raise_on_call=True)
    x, cos, sin = _inputs(device)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(RotaryEmbedding.rotate, backend=keep_graph, fullgraph=True)(x, cos, sin)
    assert torch.equal(got, apply_rope(x, cos, sin))
    targets = " ".join(str(node.target) for gm in graphs for node in gm.graph.nodes)
    assert "cat" in targets and targets.count("mul") >= 4, targets


def test_model_decodes_through_the_kernel_exactly_as_through_the_formula(rk, device, monkeypatch):
    """The tiny model end to end (prefill + cached decode): every RoPE of a no-grad forward takes the kernel (two
    a layer: the queries' and the shared key's), with the formula's tokens and log-probs exactly (bit-equal
    RoPE, everything else the same kernels); a training forward keeps the formula."""
    from moeflow.models.generation import generate

    monkeypatch.setattr(RotaryEmbedding, "kernel_devices", ("cuda", "cpu"))
    model = kernel_test_model(device)
    L = model.cfg.num_layers
    prompts = [[5, 17, 3, 99, 42], [7, 8]]
    runs = {}
    for fused in (False, True):
        monkeypatch.setattr(RotaryEmbedding, "fused_inference", fused)
        counted = _Counted(rk, monkeypatch)
        runs[fused] = generate(model, prompts, 4, return_logprobs=True)
        assert counted.calls == (4 * 2 * L if fused else 0)  # prefill + 3 decode steps
    assert runs[True].tokens == runs[False].tokens
    assert runs[True].logprobs == runs[False].logprobs
    _Counted(rk, monkeypatch, raise_on_call=True)
    ids = torch.tensor(prompts[:1], device=device)
    model.train()
    model(ids, targets=ids).loss.backward()  # grad on: the formula (the wrapper would raise)


def test_engine_equals_generate_with_the_kernel(rk, device, monkeypatch):
    """The serving engine's bucketed static step (the captured step's code, uncaptured) with the kernel on,
    prompts joining mid-way: each request's greedy tokens equal generate()'s (which takes the kernel too)."""
    from moeflow.models.serving import Engine

    monkeypatch.setattr(RotaryEmbedding, "kernel_devices", ("cuda", "cpu"))
    monkeypatch.setattr(RotaryEmbedding, "fused_inference", True)
    counted = _Counted(rk, monkeypatch)
    model = kernel_test_model(device)
    prompts = kernel_test_prompts((3, 9, 1))
    engine = Engine(model, max_batch=2, prefill_chunk=8, decode_mode="static")
    got = engine_greedy_tokens(engine, prompts, 5)
    assert counted.calls > 0
    assert_generate_equals(model, prompts, got, 5)


# --------------------------------------------------------------------------- compiled for the GPU
_COMPILE_FOR_SM90 = r"""
import json, os, re, subprocess, tempfile
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from moeflow.models.kernels import rope as rk

aligned = [["tt.divisibility", 16]]
cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
report = {}
# bench_ref: the queries' rope part (16 heads x 32, a split of 16 x 96) and the key (1 x 32); DeepSeek-V3's
# queries (128 heads x 64); fp32 (the CPU / fp32 model) for the contraction check too
for name, H, P, ty in [("q", 16, 32, "bf16"), ("k", 1, 32, "bf16"), ("v3_q", 128, 64, "bf16"),
                       ("q_fp32", 16, 32, "fp32"), ("q_fp16", 16, 32, "fp16")]:
    block_p, block_h, warps = rk.launch_config(H, P)
    fn = rk._rope_kernel
    types = {"x_ptr": f"*{ty}", "out_ptr": f"*{ty}", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
    signature = {n: types.get(n, "constexpr" if n in ("HALF", "BLOCK_P", "BLOCK_H") else "i32")
                 for n in fn.arg_names}
    aligned_args = [i for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")]
    src = ASTSource(fn=fn, signature=signature, constexprs={"HALF": P // 2, "BLOCK_P": block_p, "BLOCK_H": block_h},
                    attrs={(i,): aligned for i in aligned_args})
    kernel = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, **rk.COMPILE_OPTIONS})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL):(\d+)", usage))
    ptx = kernel.asm["ptx"]
    # ptxas writes fp16 products, sums and register moves as HFMA2 with a zero addend (a·b − 0), a unit multiplier
    # (a·1 + c) or both: one rounding each, no contraction. Any other FMA (FFMA, DFMA, HFMA2 of three values) is one.
    fmas = [line.split(";")[0] for line in sass.splitlines() if re.search(r"\b[HFD]FMA", line)]
    fused = [f for f in fmas if not (re.search(r"-?RZ\s*$", f) or ", 1, 1," in f or "-RZ, RZ," in f)]
    ops = re.findall(r"\b(?:mul|fma)\.rn\.(?:f32|f16x2|f16|bf16x2|bf16)\b", ptx)
    report[name] = {"fma_ptx": sum(op.startswith("fma") for op in ops), "fused_sass": fused,
                    "mul_ptx": sum(op.startswith("mul") for op in ops), **{k: int(v) for k, v in fields.items()}}
print(json.dumps(report))
"""


def test_kernel_compiles_for_sm90_without_contraction(rk):
    """The interpreter is lenient: compile the kernel for sm_90 (Triton's own ptxas, no GPU needed) at bench_ref's
    and DeepSeek-V3's shapes, bf16, fp16 and fp32. No FMA in the PTX nor the SASS (each product rounds before the
    sub/add, as eager's separate kernels), the four products there, no spills."""
    report = sm90_compile_report(_COMPILE_FOR_SM90)
    assert set(report) == {"q", "k", "v3_q", "q_fp32", "q_fp16"}, report
    # the four products (vectorised as f16x2 in fp16: LLVM narrows fp32 ops on fp16 values to fp16 ops, the same
    # roundings since fp32 holds 2·11 + 2 bits), no FMA in the PTX nor in the SASS
    assert all(r["fma_ptx"] == 0 and r["fused_sass"] == [] and r["mul_ptx"] >= 2 for r in report.values()), report
    assert all(r["LOCAL"] == 0 and r["REG"] <= 128 for r in report.values()), report


# --------------------------------------------------------------------------- on the GPU (the lead runs these)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_equals_eager_cuda_never_syncs_and_captures(rk):
    """bench_ref's two RoPE calls in bf16 on CUDA (1, 32 and 2,048 rows; the queries' split of (B, T, 16, 96), the
    key's split of (B, T, 288)), and fp16 / fp32: bit-equal to eager CUDA's ``apply_rope``; with sync debug mode
    "error" nothing syncs; a CUDA graph's replay gives the eager kernel call's output."""
    g = torch.Generator().manual_seed(5)
    for rows, dtype in [(1, torch.bfloat16), (32, torch.bfloat16), (2048, torch.bfloat16), (32, torch.float16),
                        (32, torch.float32)]:
        cos, sin = _tables(1, rows, 32, g, "cuda")
        q = torch.randn(1, rows, 16, 96, generator=g).to("cuda", dtype).split([64, 32], dim=-1)[1]
        k = torch.randn(1, rows, 288, generator=g).to("cuda", dtype).split([256, 32], dim=-1)[1]
        with torch.inference_mode():
            rk.apply_rope(q, cos, sin), rk.apply_rope(k, cos, sin)  # JIT first
            torch.cuda.set_sync_debug_mode("error")
            try:
                got_q, got_k = rk.apply_rope(q, cos, sin), rk.apply_rope(k, cos, sin)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.equal(got_q, apply_rope(q, cos, sin)), (rows, dtype)
            assert torch.equal(got_k, apply_rope(k, cos, sin)), (rows, dtype)
            static_q = torch.zeros_like(q)  # q is copied in after the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = rk.apply_rope(static_q, cos, sin)
            static_q.copy_(q)
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, got_q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_equals_generate_with_the_fused_rope(rk, monkeypatch):
    """The serving engine's captured decode (bf16) with the fused RoPE on, against generate() (which takes it
    too), token for token; the kernel ran (counted at capture and in generate's eager steps)."""
    from moeflow.models.serving import Engine

    monkeypatch.setattr(RotaryEmbedding, "fused_inference", True)
    counted = _Counted(rk, monkeypatch)
    model = kernel_test_model("cpu").to("cuda", torch.bfloat16)
    prompts = kernel_test_prompts((3, 17, 1, 30, 9, 24))
    engine = Engine(model, max_batch=3, prefill_chunk=8, cache_len=65)
    assert engine.decode_mode == "graph"
    got = engine_greedy_tokens(engine, prompts, 30)
    assert engine.static.num_graphs >= 2 and engine.static.num_replays > 30
    assert counted.calls > 0
    assert_generate_equals(model, prompts, got, 30)
