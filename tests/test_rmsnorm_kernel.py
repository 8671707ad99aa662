"""The fused RMSNorm (models/kernels/rmsnorm.py) against the eager formula (``models.layers.rms_norm``), and the
rules that decide where ``RMSNorm`` takes it.

The kernel runs on CUDA where there is one, else in Triton's interpreter on the CPU (this module sets
TRITON_INTERPRET=1 at collection on a machine without a GPU, as tests/test_moe_decode_kernel.py does). On the
CPU the model-level tests add "cpu" to ``RMSNorm.kernel_devices`` so the model runs through the interpreted
kernel. Everything here skips when triton is not importable: it is an optional accelerator.

What "the same function" means, measured here: the kernel sums a row in another order than eager (and its
mean multiplies by fl32(1/D) as CUDA's does, where the CPU's divides by D), so fp32 outputs are a few ulps
apart; bf16/fp16 outputs are rounded at the same points and equal in ≥ 99 % of the elements, one ulp apart
elsewhere; the fused add's residual output equals ``residual + delta`` bit for bit.
"""

from __future__ import annotations


import pytest
import torch

from conftest import (
    assert_generate_equals, engine_greedy_tokens, kernel_test_model, kernel_test_prompts, sm90_compile_report,
    triton_kernels)

from moeflow.models.layers import RMSNorm, rms_norm

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

HALF = (torch.bfloat16, torch.float16)
# (rows, D): one row, odd D, D not a power of two, bench_ref's kv_lora_rank (256) and hidden (1024), a wide one
SHAPES = [(1, 1), (1, 7), (3, 100), (2, 255), (4, 256), (3, 1000), (5, 1024), (2, 3000)]
# (scale of x, eps): eps dominating mean(x²) (1e-4²), ordinary, large (bf16/fp32 only: past fp16's range)
SCALES = [(1e-4, 1e-6), (1e-4, 1e-2), (1.0, 1e-6), (1.0, 0.5), (300.0, 1e-6)]
BIG = {torch.bfloat16: 1e15, torch.float32: 1e15, torch.float16: 3e3}


@pytest.fixture(scope="module")
def rk():
    """kernels.rmsnorm with a runnable kernel: compiled on CUDA, interpreted on the CPU (else skip)."""
    return triton_kernels("rmsnorm", "_rms_norm_kernel")


@pytest.fixture(scope="module")
def device(rk):
    return "cuda" if torch.cuda.is_available() else "cpu"


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in units in the last place of their (common) dtype: the distance of their bit patterns."""
    assert a.dtype == b.dtype
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    sign_free = (1 << (8 * a.element_size() - 1)) - 1

    def ordered(t):
        i = t.contiguous().view(bits).long()
        return torch.where(i < 0, -(i & sign_free), i)

    return (ordered(a) - ordered(b)).abs()


def _inputs(rows, D, x_dtype, w_dtype, scale, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, D, generator=g) * scale).to(device=device, dtype=x_dtype)
    w = (torch.randn(D, generator=g) * 0.5 + 1.0).to(device=device, dtype=w_dtype)  # not ones: its rounding counts
    return x, w


def _cases(x_dtype, w_dtype, device):
    """(x, w, eps) over SHAPES × SCALES, plus one large-magnitude case per shape."""
    seed = 0
    for rows, D in SHAPES:
        for scale, eps in SCALES + [(BIG[x_dtype], 1e-6)]:
            seed += 1
            x, w = _inputs(rows, D, x_dtype, w_dtype, scale, device, seed)
            yield x, w, eps


def _agreement(pairs):
    """(fraction of bit-equal elements, largest ulp distance) over (got, want) pairs."""
    equal = total = worst = 0
    for got, want in pairs:
        assert got.dtype == want.dtype and got.shape == want.shape
        u = ulps(got, want)
        equal, total, worst = equal + int((u == 0).sum()), total + u.numel(), max(worst, int(u.max()))
    return equal / total, worst


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_equals_the_formula_but_for_rare_one_ulp_steps(rk, device, dtype):
    pairs = [(rk.rms_norm(x, w, eps), rms_norm(x, w, eps)) for x, w, eps in _cases(dtype, dtype, device)]
    equal, worst = _agreement(pairs)
    assert equal >= 0.99 and worst <= 1, (equal, worst)


def test_fp32_is_the_formula_up_to_the_order_of_its_sum(rk, device):
    pairs = [(rk.rms_norm(x, w, eps), rms_norm(x, w, eps)) for x, w, eps in _cases(torch.float32, torch.float32,
                                                                                      device)]
    _, worst = _agreement(pairs)
    assert worst <= 8, worst  # a few ulps: the mean's sum order (and division vs fl32(1/D)) on the CPU
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_mixed_dtypes_promote_and_round_where_torch_does(rk, device, x_dtype, w_dtype):
    """x's normalised value rounds to x.dtype, then the product rounds to the promoted dtype (fp32 here): equal
    in ≥ 99 % of the elements, else one rounding step of x.dtype apart (what a near-tie of n's rounding gives)."""
    pairs = [(rk.rms_norm(x, w, eps), rms_norm(x, w, eps)) for x, w, eps in _cases(x_dtype, w_dtype, device)]
    assert all(got.dtype == torch.promote_types(x_dtype, w_dtype) for got, _ in pairs)
    equal, _ = _agreement(pairs)
    assert equal >= (0.99 if x_dtype in HALF else 0.2), equal  # fp32 x: whole rows 1-4 ulps apart (sum order)
    rtol = 1.01 * torch.finfo(x_dtype).eps if x_dtype in HALF else 1e-6  # one step of x.dtype's rounding; fp32: sums
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=rtol, atol=0)


def test_weight_ones_checks_the_normalised_value_alone(rk, device):
    """With a weight of fp32 ones the output is the rounded normalised value itself, in fp32: one ulp of x.dtype
    at most (a rare rounding near-tie moved by the sum order), bf16 and fp16."""
    for dtype in HALF:
        pairs = []
        for x, _, eps in _cases(dtype, torch.float32, device):
            ones = torch.ones(x.shape[-1], device=device)
            pairs.append((rk.rms_norm(x, ones, eps).to(dtype), rms_norm(x, ones, eps).to(dtype)))
        equal, worst = _agreement(pairs)
        assert equal >= 0.99 and worst <= 1, (dtype, equal, worst)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_add_returns_the_exact_sum_and_its_norm(rk, device, dtype):
    pairs = []
    for i, (x, w, eps) in enumerate(_cases(dtype, dtype, device)):
        g = torch.Generator().manual_seed(100 + i)
        delta = (torch.randn(x.shape, generator=g) * x.float().abs().mean()).to(device=device, dtype=dtype)
        total, normed = rk.add_rms_norm(x, delta, w, eps)
        assert torch.equal(total, x + delta) and total.dtype == dtype
        pairs.append((normed, rms_norm(x + delta, w, eps)))
    equal, worst = _agreement(pairs)
    if dtype in HALF:
        assert equal >= 0.99 and worst <= 1, (equal, worst)
    else:
        assert worst <= 8, worst


def test_strided_rows_and_leading_dims(rk, device):
    """The MLA latent is a view (the first R of each row of R + P values): read in place, any leading dims."""
    g = torch.Generator().manual_seed(7)
    B, T, R, P = 2, 3, 40, 8
    kv_BTX = torch.randn(B, T, R + P, generator=g).to(device=device, dtype=torch.bfloat16)
    lat_BTR = kv_BTX[..., :R]
    assert not lat_BTR.is_contiguous()
    w = (torch.rand(R, generator=g) + 0.5).to(device=device, dtype=torch.bfloat16)
    got = rk.rms_norm(lat_BTR, w, 1e-6)
    assert got.shape == (B, T, R) and got.is_contiguous()
    assert _agreement([(got, rms_norm(lat_BTR, w, 1e-6))])[1] <= 1
    x_BTD = torch.randn(B, T, 2 * R, generator=g).to(device=device, dtype=torch.bfloat16)
    d_TBD = torch.randn(T, B, 2 * R, generator=g).to(device=device, dtype=torch.bfloat16)
    d_BTD = d_TBD.transpose(0, 1)  # leading dims that cannot flatten with one stride: copied, still right
    w2 = (torch.rand(2 * R, generator=g) + 0.5).to(device=device, dtype=torch.bfloat16)
    total, normed = rk.add_rms_norm(x_BTD, d_BTD, w2, 1e-6)
    assert torch.equal(total, x_BTD + d_BTD) and normed.shape == (B, T, 2 * R)
    assert _agreement([(normed, rms_norm(x_BTD + d_BTD, w2, 1e-6))])[1] <= 1
    one_D = rk.rms_norm(x_BTD[0, 0], w2, 1e-6)  # a 1-D input
    assert one_D.shape == (2 * R,) and _agreement([(one_D, rms_norm(x_BTD[0, 0], w2, 1e-6))])[1] <= 1


def test_kernel_applies_table(rk):
    x = torch.zeros(2, 8)
    w = torch.ones(8)
    assert rk.kernel_applies(x, w) and rk.kernel_applies(x, w, torch.zeros(2, 8))
    assert rk.kernel_applies(x.bfloat16(), w) and rk.kernel_applies(x.half(), w.bfloat16())
    with torch.no_grad():
        assert rk.kernel_applies(x, w.clone().requires_grad_(True))
    refused = [(x.double(), w, None), (x, w.double(), None), (x, torch.ones(9), None), (x, torch.ones(2, 8), None),
               (torch.zeros(0, 8), w, None), (torch.zeros(2, rk.MAX_D + 1), torch.ones(rk.MAX_D + 1), None),
               (x, w, torch.zeros(1, 8)), (x, w, torch.zeros(2, 8).bfloat16()),
               (x, w.clone().requires_grad_(True), None), (x.clone().requires_grad_(True), w, None),
               (x, w, torch.zeros(2, 8).requires_grad_(True))]
    for args in refused:
        assert not rk.kernel_applies(*args), [tuple(t.shape) if t is not None else None for t in args]
    if torch.cuda.is_available():
        assert not rk.kernel_applies(x.cuda(), w)  # weight on another device


# --------------------------------------------------------------------------- where RMSNorm takes the kernel
class _Counted:
    """Replaces the kernel entries with counting wrappers (``raise_on_call``: fail instead)."""

    def __init__(self, rk, monkeypatch, raise_on_call=False):
        self.calls = {"rms_norm": 0, "add_rms_norm": 0}
        for name in self.calls:
            real = getattr(rk, name)

            def wrapper(*args, _name=name, _real=real, **kw):
                if raise_on_call:
                    raise AssertionError(f"{_name} called where the formula was expected")
                self.calls[_name] += 1
                return _real(*args, **kw)

            monkeypatch.setattr(rk, name, wrapper)


def _norm(D=16, device="cpu"):
    norm = RMSNorm(D, 1e-6).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


def test_cpu_tensors_take_the_formula_by_default(rk, monkeypatch):
    _Counted(rk, monkeypatch, raise_on_call=True)
    norm = _norm()
    x = torch.randn(3, 16)
    assert RMSNorm.kernel_devices == ("cuda",) and RMSNorm.fused_inference is True
    with torch.no_grad():
        assert torch.equal(norm(x), rms_norm(x, norm.weight, 1e-6))
        total, normed = norm.add_forward(x, x)
        assert torch.equal(total, x + x) and torch.equal(normed, rms_norm(x + x, norm.weight, 1e-6))


def test_the_kernel_only_without_autograd_and_with_the_switch_on(rk, device, monkeypatch):
    monkeypatch.setattr(RMSNorm, "kernel_devices", ("cuda", "cpu"))
    counted = _Counted(rk, monkeypatch)
    norm = _norm(device=device)
    x = torch.randn(3, 16, device=device)
    with torch.no_grad():
        norm(x)
        norm.add_forward(x, x)
    with torch.inference_mode():
        norm(x)
    assert counted.calls == {"rms_norm": 2, "add_rms_norm": 1}
    # training: the weight requires grad and autograd is on -> the formula (and a gradient flows)
    y = norm(x)
    total, h = norm.add_forward(x, x.clone().requires_grad_(True))
    (y.sum() + h.sum()).backward()
    assert norm.weight.grad is not None and counted.calls == {"rms_norm": 2, "add_rms_norm": 1}
    # autograd on but nothing requires grad (a frozen model): no graph to record, the kernel
    norm.weight.requires_grad_(False)
    norm(x)
    assert counted.calls["rms_norm"] == 3
    monkeypatch.setattr(RMSNorm, "fused_inference", False)
    with torch.no_grad():
        norm(x)
        norm.add_forward(x, x)
    assert counted.calls == {"rms_norm": 3, "add_rms_norm": 1}


def test_torch_compile_traces_the_formula(rk, device, monkeypatch):
    """Under torch.compile the formula is traced (inductor fuses it), never the kernel, even where eager would
    take it: the FX graph holds rsqrt and mean, the kernel entries are not called."""
    monkeypatch.setattr(RMSNorm, "kernel_devices", ("cuda", "cpu"))
    _Counted(rk, monkeypatch, raise_on_call=True)
    norm = _norm(device=device)
    x = torch.randn(3, 16, device=device)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()

    class AddNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = norm

        def forward(self, a, b):
            total, h = self.norm.add_forward(a, b)
            return total, h, self.norm(h)

    with torch.no_grad():
        total, h, hh = torch.compile(AddNorm(), backend=keep_graph, fullgraph=True)(x, x)
    assert torch.equal(total, x + x) and torch.equal(h, rms_norm(x + x, norm.weight, 1e-6))
    targets = " ".join(str(node.target) for gm in graphs for node in gm.graph.nodes)
    assert targets.count("rsqrt") == 2 and "mean" in targets, targets


def test_model_decodes_through_the_kernel_as_through_the_formula(rk, device, monkeypatch):
    """The tiny model end to end (prefill + cached decode): every norm of a no-grad forward takes the kernel
    (per layer: the MLA latent and the fused residual add + FFN input; the first layer's attention input alone,
    each later one's fused with the block boundary's residual add, and so is the final norm), with the same
    greedy tokens as the formula and log-probs to fp32 rounding; a training forward keeps the formula."""
    from moeflow.models.generation import generate

    monkeypatch.setattr(RMSNorm, "kernel_devices", ("cuda", "cpu"))
    model = kernel_test_model(device, norm_weights=True)
    L = model.cfg.num_layers
    prompts = [[5, 17, 3, 99, 42], [7, 8]]
    runs = {}
    for fused in (False, True):
        monkeypatch.setattr(RMSNorm, "fused_inference", fused)
        counted = _Counted(rk, monkeypatch)
        runs[fused] = generate(model, prompts, 4, return_logprobs=True)
        forwards = 4  # prefill + 3 decode steps
        want = {"rms_norm": forwards * (L + 1), "add_rms_norm": forwards * 2 * L} if fused else {
            "rms_norm": 0, "add_rms_norm": 0}
        assert counted.calls == want
    assert runs[True].tokens == runs[False].tokens
    torch.testing.assert_close(torch.tensor(runs[True].logprobs), torch.tensor(runs[False].logprobs),
                               rtol=1e-4, atol=1e-5)
    counted = _Counted(rk, monkeypatch, raise_on_call=True)
    ids = torch.tensor(prompts[:1], device=device)
    model.train()
    model(ids, targets=ids).loss.backward()  # grad on: the formula (the wrappers would raise)


def test_block_boundary_add_in_the_next_norm_is_bit_equal_to_the_plain_add(rk, device, monkeypatch):
    """A cache step adds each block's output in the next block's input norm and the final norm
    (``MoETransformer.defer_residual_add``): with the kernel on or off, the same tokens and bit-equal log-probs as
    the plain add, and with the kernel on L − 1 + 1 fused launches more and as many plain norms fewer a forward."""
    from moeflow.models import MoETransformer
    from moeflow.models.generation import generate

    monkeypatch.setattr(RMSNorm, "kernel_devices", ("cuda", "cpu"))
    model = kernel_test_model(device, norm_weights=True)
    L, prompts, forwards = model.cfg.num_layers, [[5, 17, 3, 99, 42], [7, 8]], 4
    for fused in (False, True):
        monkeypatch.setattr(RMSNorm, "fused_inference", fused)
        runs, calls = {}, {}
        for defer in (False, True):
            monkeypatch.setattr(MoETransformer, "defer_residual_add", defer)
            counted = _Counted(rk, monkeypatch)
            runs[defer] = generate(model, prompts, 4, return_logprobs=True)
            calls[defer] = dict(counted.calls)  # a snapshot: the next _Counted wraps this one
        assert runs[True].tokens == runs[False].tokens
        assert runs[True].logprobs == runs[False].logprobs  # bit-equal, not close
        if fused:
            assert calls[True]["add_rms_norm"] - calls[False]["add_rms_norm"] == forwards * L
            assert calls[False]["rms_norm"] - calls[True]["rms_norm"] == forwards * L


def test_engine_equals_generate_with_the_kernel(rk, device, monkeypatch):
    """The serving engine's bucketed static step (the captured step's code, uncaptured) with the kernel on,
    prompts joining mid-way: each request's greedy tokens equal generate()'s (which takes the kernel too)."""
    from moeflow.models.serving import Engine

    monkeypatch.setattr(RMSNorm, "kernel_devices", ("cuda", "cpu"))
    counted = _Counted(rk, monkeypatch)
    model = kernel_test_model(device, norm_weights=True)
    prompts = kernel_test_prompts((3, 9, 1))
    engine = Engine(model, max_batch=2, prefill_chunk=8, decode_mode="static")
    got = engine_greedy_tokens(engine, prompts, 5)
    assert counted.calls["add_rms_norm"] > 0
    assert_generate_equals(model, prompts, got, 5)


# --------------------------------------------------------------------------- compiled for the GPU
_COMPILE_FOR_SM90 = r"""
import json, os, re, subprocess, tempfile
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from moeflow.models.kernels import rmsnorm as rk

aligned = [["tt.divisibility", 16]]
cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
report = {}
for name, D, add in [("hidden", 1024, False), ("hidden_add", 1024, True), ("latent", 256, False),
                     ("wide", 7168, True)]:
    block, warps = rk.launch_config(D)
    fn = rk._rms_norm_kernel
    types = {"x_ptr": "*bf16", "x_stride": "i32", "delta_ptr": "*bf16", "delta_stride": "i32", "w_ptr": "*bf16",
             "out_ptr": "*bf16", "sum_ptr": "*bf16", "inv_d": "fp32", "eps": "fp32"}
    signature = {n: types.get(n, "constexpr") for n in fn.arg_names}
    # what the launcher specialises 16-byte-aligned pointers and strides divisible by 16 (1,024; 288) to
    aligned_args = [i for i, n in enumerate(fn.arg_names) if n.endswith(("_ptr", "_stride"))]
    src = ASTSource(fn=fn, signature=signature, constexprs={"D": D, "BLOCK_D": block, "ADD": add},
                    attrs={(i,): aligned for i in aligned_args})
    kernel = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, **rk.COMPILE_OPTIONS})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL):(\d+)", usage))
    ptx = kernel.asm["ptx"]
    report[name] = {"v4_loads": ptx.count("ld.global.v4"), "fma": ptx.count("fma.rn.f32"),
                    "rsqrt": ptx.count("rsqrt.approx"), **{k: int(v) for k, v in fields.items()}}
print(json.dumps(report))
"""


def test_kernel_compiles_for_sm90_without_contraction(rk):
    """The interpreter is lenient: compile the kernel for sm_90 (Triton's own ptxas, no GPU needed) at
    bench_ref's widths and DeepSeek-V3's 7,168. It must compile with 16-byte loads of bf16 rows, the MUFU
    rsqrt, no fp32 FMA (contraction off: ``ms + eps`` rounds after the product, as eager) and no spills."""
    report = sm90_compile_report(_COMPILE_FOR_SM90)
    # x and the weight (and delta) in 16-byte loads; the wide row: two of each a thread
    loads = {"hidden": 2, "hidden_add": 3, "latent": 2, "wide": 6}
    assert all(report[k]["v4_loads"] >= n for k, n in loads.items()), report
    assert all(r["rsqrt"] >= 1 and r["fma"] == 0 for r in report.values()), report
    assert all(r["LOCAL"] == 0 and r["REG"] <= 128 for r in report.values()), report


# --------------------------------------------------------------------------- on the GPU (the lead runs these)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_equals_eager_cuda_never_syncs_and_captures(rk):
    """bench_ref's norms in bf16 on CUDA (1, 32 and 2,048 rows of D = 1,024; the strided latent of 256): against
    eager CUDA's formula (the same mean and rsqrt instructions, so nearly always bit-equal), with sync debug
    mode "error" nothing syncs, and a CUDA graph's replay gives the eager kernel call's output."""
    pairs = []
    for rows in (1, 32, 2048):
        x, w = _inputs(rows, 1024, torch.bfloat16, torch.bfloat16, 1.0, "cuda", rows)
        d, _ = _inputs(rows, 1024, torch.bfloat16, torch.bfloat16, 0.3, "cuda", rows + 1)
        kv, w_lat = _inputs(rows, 256 + 32, torch.bfloat16, torch.bfloat16, 1.0, "cuda", rows + 2)
        lat, w_lat = kv[:, :256], w_lat[:256]
        with torch.inference_mode():
            rk.rms_norm(x, w, 1e-6), rk.add_rms_norm(x, d, w, 1e-6), rk.rms_norm(lat, w_lat, 1e-6)  # JIT first
            torch.cuda.set_sync_debug_mode("error")
            try:
                got = rk.rms_norm(x, w, 1e-6)
                total, normed = rk.add_rms_norm(x, d, w, 1e-6)
                got_lat = rk.rms_norm(lat, w_lat, 1e-6)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.equal(total, x + d)
            pairs += [(got, rms_norm(x, w, 1e-6)), (normed, rms_norm(x + d, w, 1e-6)),
                      (got_lat, rms_norm(lat, w_lat, 1e-6))]
            static_x, static_d = torch.zeros_like(x), d.clone()  # x is copied in after the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_total, static_normed = rk.add_rms_norm(static_x, static_d, w, 1e-6)
            static_x.copy_(x)
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_total, total) and torch.equal(static_normed, normed)
    equal, worst = _agreement(pairs)
    # measured on an H100 (2026-12-07): 99.9995 % bit-equal, the worst element 2 bf16 ulps (the fp32 sum's order
    # moves rsqrt's result by an ulp now and then, and the normalised value and its product with the weight are
    # rounded in turn, as in the formula)
    assert equal >= 0.999 and worst <= 2, (equal, worst)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_equals_generate_with_the_fused_norm(rk, monkeypatch):
    """The serving engine's captured decode (bf16) with the fused norm on, against generate() (which takes it
    too), token for token; the kernels ran (counted at capture and in generate's eager steps)."""
    from moeflow.models.serving import Engine

    monkeypatch.setattr(RMSNorm, "fused_inference", True)
    counted = _Counted(rk, monkeypatch)
    model = kernel_test_model("cpu", norm_weights=True).to("cuda", torch.bfloat16)
    prompts = kernel_test_prompts((3, 17, 1, 30, 9, 24))
    engine = Engine(model, max_batch=3, prefill_chunk=8, cache_len=65)
    assert engine.decode_mode == "graph"
    got = engine_greedy_tokens(engine, prompts, 30)
    assert engine.static.num_graphs >= 2 and engine.static.num_replays > 30
    assert counted.calls["rms_norm"] > 0 and counted.calls["add_rms_norm"] > 0
    assert_generate_equals(model, prompts, got, 30)
