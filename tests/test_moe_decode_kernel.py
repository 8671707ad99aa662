"""Fused decode routed experts (models/kernels/moe_decode.py), slot-major and expert-major, against
RoutedExperts' own paths and float64.

The kernels run on CUDA where there is one, else in Triton's interpreter on the CPU (this module sets
TRITON_INTERPRET=1 at collection on a machine without a GPU). Everything here skips when triton is not importable:
it is an optional accelerator, and moeflow must work without it.
"""

from __future__ import annotations


import pytest
import torch
from conftest import (
    assert_generate_equals, dispatched_ops, engine_greedy_tokens, kernel_test_model, kernel_test_prompts,
    sm90_compile_report, triton_kernels)

from moeflow.models import ModelConfig
from moeflow.models.moe import RoutedExperts

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
OP = "moeflow.routed_experts_decode.default"  # slot-major (T·K < E)
EM_OP = "moeflow.routed_experts_decode_by_expert.default"  # expert-major (T·K ≥ E)


@pytest.fixture(scope="module")
def md():
    """moe_decode with runnable kernels: compiled on CUDA, interpreted on the CPU (else skip; conftest turns the
    interpreter on without a GPU)."""
    return triton_kernels("moe_decode", "_gate_up_swiglu_kernel")


@pytest.fixture(scope="module")
def device(md):
    return "cuda" if torch.cuda.is_available() else "cpu"


def _experts(E, D, F_, K, dtype, device, std=0.1):
    cfg = ModelConfig.preset("tiny").replace(hidden_size=D, num_routed_experts=E, moe_intermediate_size=F_,
                                             num_experts_per_tok=K)
    ex, g = RoutedExperts(cfg), torch.Generator().manual_seed(E * D + F_)
    torch.nn.init.normal_(ex.gate_up_proj, std=std, generator=g)
    torch.nn.init.normal_(ex.down_proj, std=std, generator=g)
    return ex.requires_grad_(False).to(device=device, dtype=dtype)


def _routing(T, K, E, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # distinct experts per token
    w = torch.rand(T, K, generator=g) + 0.1
    return x.to(device), idx.to(device), w.to(device)


def _float64(ex, x, idx, w):
    """The reference function, per slot in float64 (no routing machinery at all)."""
    g, d = ex.gate_up_proj.double(), ex.down_proj.double()
    F_ = d.shape[-1]
    h_TK2F = torch.einsum("td,tkfd->tkf", x.double(), g[idx])
    a_TKF = torch.nn.functional.silu(h_TK2F[..., :F_]) * h_TK2F[..., F_:]
    return torch.einsum("tkf,tkdf,tk->td", a_TKF, d[idx], w.double())


def _emulated(ex, x, idx, w):
    """The fused path's documented rounding points, in torch: gate, up, h, each slot's down output and the
    gate weight rounded to the compute dtype; silu·up, the weighted K sum and every dot product in fp32."""
    dt, F_ = x.dtype, ex.width

    def r(t):
        return t.to(dt).float()

    h_TK2F = r(torch.einsum("td,tkfd->tkf", x.float(), ex.gate_up_proj.float()[idx]))
    a_TKF = r(torch.nn.functional.silu(h_TK2F[..., :F_]) * h_TK2F[..., F_:])
    y_TKD = r(torch.einsum("tkf,tkdf->tkd", a_TKF, ex.down_proj.float()[idx]))
    return (y_TKD * r(w)[..., None]).sum(dim=1).to(dt)


def _run(ex, x, idx, w, fused, takes_fused_op=None):
    """ex(x, idx, w) with ``fused_decode = fused``, checking which path ran (``fused`` unless told): the grouped
    or looped one, or the fused op of the call's size (``uses_expert_major``: slot-major up to T·K = 3·E)."""
    ex.fused_decode = fused
    with torch.no_grad(), dispatched_ops() as ops:
        y = ex(x, idx, w)
    took_fused = bool(fused) if takes_fused_op is None else takes_fused_op
    from moeflow.models.kernels.moe_decode import uses_expert_major

    expert_major = uses_expert_major(idx.numel(), ex.num_experts)
    assert (OP in ops.names) == (took_fused and not expert_major), ops.names[:5]
    assert (EM_OP in ops.names) == (took_fused and expert_major), ops.names[:5]
    return y


BIG_BLOCKS = dict(gate_up_block_f=128, gate_up_block_d=1024, down_block_d=128, down_block_f=512)
SMALL_BLOCKS = dict(gate_up_block_f=16, gate_up_block_d=32, down_block_d=16, down_block_f=16)

# (T, K, E, D, F, blocks): T·K < E throughout; D and F mostly not multiples of the blocks
SHAPES = [
    (1, 1, 2, 8, 8, SMALL_BLOCKS),
    (1, 6, 64, 1024, 512, {}),        # bench_ref, one token, the default blocks
    (3, 3, 10, 40, 24, SMALL_BLOCKS),  # T·K = 9 just under E = 10
    (2, 4, 16, 72, 40, SMALL_BLOCKS),
    (5, 2, 11, 33, 17, dict(gate_up_block_f=8, gate_up_block_d=16, down_block_d=4, down_block_f=8)),
]


@pytest.mark.parametrize("T,K,E,D,F_,blocks", SHAPES)
def test_kernels_equal_the_reference_paths_in_fp32(md, device, T, K, E, D, F_, blocks):
    ex = _experts(E, D, F_, K, torch.float32, device)
    x, idx, w = _routing(T, K, E, D, device, seed=T * 100 + D)
    got = md.routed_experts_decode(x, idx, w, ex.gate_up_proj, ex.down_proj, **blocks)
    want = _run(ex, x, idx, w, fused=False)  # the looped path on the CPU, grouped on CUDA
    assert got.shape == (T, D) and got.dtype == torch.float32
    scale = want.abs().max()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(got.double(), _float64(ex, x, idx, w), rtol=1e-5, atol=2e-6 * scale)


def test_repeated_experts_within_a_token_and_the_dispatch(md, device):
    """Forced routing may pick one expert twice for a token: both slots count, each with its own weight."""
    E, D, F_, K = 8, 24, 20, 3
    ex = _experts(E, D, F_, K, torch.float32, device)
    x, _, w = _routing(2, K, E, D, device)
    idx = torch.tensor([[5, 5, 1], [2, 2, 2]], device=device)
    got = _run(ex, x, idx, w, fused=True)  # forced on through RoutedExperts.forward
    want = _run(ex, x, idx, w, fused=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), _float64(ex, x, idx, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 3])
def test_bf16_rounds_where_documented_and_is_as_close_to_float64_as_the_reference(md, device, T):
    """bf16 at bench_ref sizes: (1) the kernels equal a torch emulation of their rounding points up to the
    order of fp32 sums (nearly all outputs bit-equal, the rest one bf16 step); (2) they stay within bf16
    noise of RoutedExperts' own path; (3) they are no farther from float64 than that path."""
    E, D, F_, K = 64, 1024, 512, 6
    ex = _experts(E, D, F_, K, torch.bfloat16, device, std=0.05)
    x, idx, w = _routing(T, K, E, D, device, seed=T)
    x = x.bfloat16()
    # large blocks: the interpreter's cost is per program; the rounding points do not depend on them
    got = md.routed_experts_decode(x, idx, w, ex.gate_up_proj, ex.down_proj, **BIG_BLOCKS)
    assert got.dtype == torch.bfloat16
    emulated = _emulated(ex, x, idx, w)
    # one bf16 step at the output's scale (a flipped rounding of one slot's output before the K sum cancels)
    assert (got.float() - emulated.float()).abs().max() <= torch.finfo(torch.bfloat16).eps * emulated.abs().max()
    assert (got == emulated).float().mean() > 0.97, (got == emulated).float().mean()
    want64 = _float64(ex, x, idx, w)
    reference = _run(ex, x, idx, w, fused=False)  # looped (eager rounding) on CPU, grouped on CUDA
    scale = want64.abs().max()
    assert (got.double() - reference.double()).abs().max() <= 0.02 * scale
    err_fused = (got.double() - want64).norm() / want64.norm()
    err_reference = (reference.double() - want64).norm() / want64.norm()
    assert err_fused <= 1.05 * err_reference, (err_fused, err_reference)


EM_SMALL = dict(gate_up_block_f=16, gate_up_block_d=16, down_block_d=16, down_block_f=16, block_s=16,
                combine_block_d=16)
EM_BIG = dict(gate_up_block_f=512, gate_up_block_d=1024, down_block_d=1024, down_block_f=512, block_s=64,
              combine_block_d=1024)


def _em_routing(T, K, E, D, kind, device, seed=0):
    """(x, idx, w) with T·K ≥ E. kind: ``random`` (distinct experts per token), ``unused`` (the first and last
    experts get no slot), ``one`` (every slot on one expert, so each token repeats it K times), ``repeats``
    (independent draws: experts repeated within tokens)."""
    x, idx, w = _routing(T, K, E, D, device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "unused":
        idx = torch.stack([torch.randperm(E - 2, generator=g)[:K] + 1 for _ in range(T)]).to(device)
    elif kind == "one":
        idx = torch.full((T, K), E // 2, device=device)
    elif kind == "repeats":
        idx = torch.randint(0, E, (T, K), generator=g).to(device)
    assert idx.numel() >= E
    return x, idx, w


# (T, K, E, D, F, routing, blocks): T·K ≥ E throughout; D and F mostly not multiples of the blocks
EM_SHAPES = [
    (4, 2, 8, 40, 24, "random", EM_SMALL),      # T·K exactly E
    (2, 4, 8, 32, 16, "repeats", EM_SMALL),     # exactly E, repeats within tokens
    (11, 3, 8, 72, 40, "unused", EM_SMALL),     # experts 0 and 7 without slots
    (10, 2, 4, 33, 17, "one", EM_SMALL),        # 20 slots on one expert: two tiles of 16
    (9, 3, 16, 33, 17, "repeats", dict(gate_up_block_f=16, gate_up_block_d=32, down_block_d=16,
                                       down_block_f=16, block_s=16, combine_block_d=8)),
    (8, 4, 16, 256, 128, "random", {}),         # the default blocks
]


@pytest.mark.parametrize("T,K,E,D,F_,kind,blocks", EM_SHAPES)
def test_expert_major_equals_the_reference_paths_in_fp32(md, device, T, K, E, D, F_, kind, blocks):
    ex = _experts(E, D, F_, K, torch.float32, device)
    x, idx, w = _em_routing(T, K, E, D, kind, device, seed=T * 100 + D)
    got = md.expert_major_decode(x, idx, w, ex.gate_up_proj, ex.down_proj, **blocks)
    want = _run(ex, x, idx, w, fused=False)  # the looped path on the CPU, grouped on CUDA
    assert got.shape == (T, D) and got.dtype == torch.float32
    scale = want.abs().max()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(got.double(), _float64(ex, x, idx, w), rtol=1e-5, atol=2e-6 * scale)
    forced = _run(ex, x, idx, w, fused=True)  # through RoutedExperts.forward: the expert-major op (checked)
    torch.testing.assert_close(forced, got, rtol=1e-5, atol=2e-6 * scale)


def test_expert_major_routing_groups_the_slots_by_expert(md):
    """order lists the slots expert by expert (stable: slot order within an expert); ends are the running
    counts, zero-width runs for unused experts; the same eagerly (argsort) and in the counting form."""
    idx = torch.tensor([[3, 0], [3, 3], [5, 0]])
    order, ends = md.expert_major_routing(idx, 7)
    assert order.tolist() == [1, 5, 0, 2, 3, 4] and ends.dtype == torch.int32
    assert ends.tolist() == [2, 2, 2, 5, 5, 6, 6]
    from moeflow.models.moe import stable_expert_order

    assert torch.equal(stable_expert_order(idx.reshape(-1), force_rank=True)[0], order)


@pytest.mark.parametrize("T,K,E", [(3, 2, 7), (11, 6, 64), (64, 6, 64), (5, 3, 256), (1, 1, 4), (40, 4, 16)])
def test_fused_expert_order_is_the_stable_sort_and_its_ends(md, device, T, K, E):
    """``fused_expert_order`` (one launch, RoutedExperts.fused_decode_order) gives expert_major_routing's integers:
    the stable argsort by expert, each expert's end (idle experts, an expert holding many slots, N not a power of
    two, E past 128, one slot)."""
    g = torch.Generator().manual_seed(T * K + E)
    idx = torch.randint(0, E, (T, K), generator=g)
    idx[: T // 2, 0] = E // 2  # one expert holding many slots; most experts idle at the small sizes
    idx = idx.to(device)
    order, ends = md.fused_expert_order(idx, E)
    want_order, want_ends = md.expert_major_routing(idx, E)
    assert order.dtype == want_order.dtype == torch.int64 and ends.dtype == want_ends.dtype == torch.int32
    assert torch.equal(order, want_order) and torch.equal(ends, want_ends)
    assert torch.equal(order.cpu(), torch.argsort(idx.reshape(-1).cpu(), stable=True))


def test_the_fused_order_switch_feeds_the_expert_major_kernels(md, device, monkeypatch):
    """With ``RoutedExperts.fused_decode_order`` an expert-major call takes the one-launch order (called once) and
    gives the default's output bit for bit (the same integers); off, it is not called."""
    E, D, F_, K, T = 16, 48, 24, 4, 13
    ex = _experts(E, D, F_, K, torch.float32, device)
    ex.fused_decode = True
    x, idx, w = _routing(T, K, E, D, device, seed=5)
    calls = []
    real = md.fused_expert_order
    monkeypatch.setattr(md, "fused_expert_order", lambda *a: calls.append(1) or real(*a))
    assert md.uses_expert_major(idx.numel(), E)
    with torch.no_grad():
        default = ex(x, idx, w)
        assert calls == []
        monkeypatch.setattr(RoutedExperts, "fused_decode_order", True)
        fused = ex(x, idx, w)
    assert calls == [1] and torch.equal(fused, default)


@pytest.mark.parametrize("T,E", [(3, 16)] + [pytest.param(T, 64, marks=pytest.mark.slow) for T in (11, 32)])
def test_expert_major_bf16_rounds_as_the_slot_major_kernels(md, device, T, E):
    """bf16 at bench_ref's D, F and top-6 (E = 16 for the quick case: the interpreter's time goes with the
    weights read, ~20 s at 11 tokens of bench_ref), T·K ≥ E: (1) equal to the torch emulation of the
    documented rounding points up to the order of fp32 sums (nearly all outputs bit-equal, the rest one bf16
    step); (2) equal to the slot-major kernels in the same way (the same rounding points); (3) within bf16
    noise of RoutedExperts' own path and no farther from float64."""
    D, F_, K = 1024, 512, 6
    ex = _experts(E, D, F_, K, torch.bfloat16, device, std=0.05)
    x, idx, w = _routing(T, K, E, D, device, seed=T)
    x = x.bfloat16()
    stacks = (ex.gate_up_proj, ex.down_proj)
    got = md.expert_major_decode(x, idx, w, *stacks, **EM_BIG)  # large blocks: the interpreter pays per program
    assert got.dtype == torch.bfloat16
    eps = torch.finfo(torch.bfloat16).eps
    for other in (_emulated(ex, x, idx, w), md.routed_experts_decode(x, idx, w, *stacks, **BIG_BLOCKS)):
        assert (got.float() - other.float()).abs().max() <= eps * other.abs().max()
        assert (got == other).float().mean() > 0.97, (got == other).float().mean()
    want64 = _float64(ex, x, idx, w)
    reference = _run(ex, x, idx, w, fused=False)
    assert (got.double() - reference.double()).abs().max() <= 0.02 * want64.abs().max()
    err_fused = (got.double() - want64).norm() / want64.norm()
    err_reference = (reference.double() - want64).norm() / want64.norm()
    assert err_fused <= 1.05 * err_reference, (err_fused, err_reference)


def test_expert_major_dispatch_traces_without_graph_breaks(md, device):
    """torch.compile(fullgraph=True, eager backend) through the expert-major dispatch: the routing in its
    counting form (no argsort under compile), the op's fake kernel; bit-equal to the eager call (argsort)."""
    ex = _experts(8, 24, 20, 3, torch.float32, device)
    x, idx, w = _em_routing(9, 3, 8, 24, "repeats", device)  # 27 slots > 3 an expert: expert-major
    want = _run(ex, x, idx, w, fused=True)
    graphs = []

    def eager_backend(gm, example_inputs):  # the eager backend, keeping the graph to look at
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(ex, backend=eager_backend, fullgraph=True)(x, idx, w)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes]
    assert any("routed_experts_decode_by_expert" in t for t in targets), targets
    assert not any("sort" in t for t in targets), targets
    from torch._subclasses.fake_tensor import FakeTensorMode

    order, ends = md.expert_major_routing(idx, 8)
    with FakeTensorMode() as mode:
        fake = md.routed_experts_decode_by_expert(
            *(mode.from_tensor(t) for t in (x, order, ends, w, ex.gate_up_proj, ex.down_proj)))
    assert fake.shape == (9, 24) and fake.dtype == x.dtype and fake.device == x.device


_COMPILE_FOR_SM90 = r"""
import json, os, re, subprocess, tempfile
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from moeflow.models.kernels import moe_decode as md

aligned = [["tt.divisibility", 16]]  # what the launcher specialises 16-byte-aligned pointers to
shapes = {"K": 6, "D": 1024, "F": 512}
slot_major = ["*bf16", "*i64", "*bf16", "*bf16", "*bf16", "*bf16"]  # gate_up: x, idx, stack, shared gate, up, h
down = ["*bf16", "*i64", "*fp32", "*bf16", "*bf16", "*bf16"]  # h, idx, weights, stack, shared down, y
kernels = {  # slot-major with the shared expert folded in (S = 1, bench_ref) and without (S = 0)
    "gate_up": (md._gate_up_swiglu_kernel, slot_major, dict(S=1, BLOCK_F=16, BLOCK_D=1024)),
    "down": (md._down_combine_kernel, down, dict(S=1, BLOCK_D=8, BLOCK_F=512)),
    "gate_up_s0": (md._gate_up_swiglu_kernel, slot_major, dict(S=0, BLOCK_F=16, BLOCK_D=1024)),
    "down_s0": (md._down_combine_kernel, down, dict(S=0, BLOCK_D=8, BLOCK_F=512)),
}
# expert-major, routed_experts_decode_by_expert's default blocks, without the shared expert and with it folded in
# (S = 1, bench_ref: the shared branch's tiles compiled too). gate_up: x, order, ends, stack, shared gate, up, h, T;
# down: h, order, ends, stack, shared down, y, T; combine: y, weights, out, T
em_gate_up = ["*bf16", "*i64", "*i32", "*bf16", "*bf16", "*bf16", "*bf16", "i32"]
em_down = ["*bf16", "*i64", "*i32", "*bf16", "*bf16", "*bf16", "i32"]
for S, name in ((0, ""), (1, "_s1")):
    kernels["em_gate_up" + name] = (md._expert_gate_up_swiglu_kernel, em_gate_up,
                                    dict(S=S, E=64, BLOCK_F=32, BLOCK_D=128, BLOCK_S=16, IEEE=False))
    kernels["em_down" + name] = (md._expert_down_kernel, em_down,
                                 dict(S=S, E=64, BLOCK_D=32, BLOCK_F=128, BLOCK_S=16, IEEE=False))
    kernels["em_combine" + name] = (md._combine_kernel, ["*bf16", "*fp32", "*bf16", "i32"], dict(S=S, BLOCK_D=256))
# the one-launch expert order (RoutedExperts.fused_decode_order) at batch 64 × top-6 over 64 experts: idx, order, ends
kernels["order"] = (md._expert_order_kernel, ["*i64", "*i64", "*i32", "i32", "i32"],
                    dict(BLOCK_N=512, BLOCK_E=64, CHUNK=8), 8)  # fused_expert_order's launch: 8 warps
cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
report = {}
for name, (fn, pointers, blocks, *warps) in kernels.items():
    names = fn.arg_names
    signature = {n: (pointers[i] if i < len(pointers) else "constexpr") for i, n in enumerate(names)}
    sizes = {k: v for k, v in shapes.items() if k in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={**sizes, **blocks},
                    attrs={(i,): aligned for i, p in enumerate(pointers) if p.startswith("*")})
    kernel = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps[0] if warps else 4})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL):(\d+)", usage))
    ptx = kernel.asm["ptx"]
    report[name] = {"v4_loads": ptx.count("ld.global.v4"), "cp_async": ptx.count("cp.async.cg"),
                    "bf16_mma": ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"),
                    "shared_bytes": kernel.metadata.shared, **{k: int(v) for k, v in fields.items()}}
print(json.dumps(report))
"""


def test_kernels_compile_for_sm90_with_vector_loads(md):
    """The interpreter is lenient: compile the kernels for real (Triton's own ptxas, no GPU needed) with
    the default blocks at bench_ref sizes. They must compile, the slot-major ones load weights with 16-byte
    vector loads, the expert-major ones multiply on the tensor cores (bf16 mma, not the interpreter's fp32
    dot) from 16-byte asynchronous copies (the pipelined weight stream; the folded shared expert's tiles too), and
    none spill to local memory or
    use more than 128 registers a thread (ptxas, via cuobjdump)."""
    report = sm90_compile_report(_COMPILE_FOR_SM90)
    # gate_up: 16 rows × 1024 of gate and of up = 64 KB over 128 threads = 32 16-byte loads per thread
    # (the shared slot's branch of gate_up loads through its own pointers: 16-byte loads there too, so more)
    for s in ("", "_s0"):
        assert report["gate_up" + s]["v4_loads"] >= 32 and report["down" + s]["v4_loads"] >= 24, report
    assert report["em_gate_up"]["bf16_mma"] > 0 and report["em_down"]["bf16_mma"] > 0, report
    assert report["em_gate_up"]["cp_async"] > 0 and report["em_down"]["cp_async"] > 0, report
    # the folded shared expert's tiles: on the tensor cores and pipelined as the routed ones (more mma and cp.async
    # than without it), in the same shared memory (the two branches' buffers are never live together)
    for k in ("em_gate_up", "em_down"):
        for field in ("bf16_mma", "cp_async"):
            assert report[k + "_s1"][field] > report[k][field], (k, field, report)
        assert report[k + "_s1"]["shared_bytes"] == report[k]["shared_bytes"], report
    assert all(r["LOCAL"] == 0 and r["REG"] <= 128 for r in report.values()), report
    assert report["gate_up"]["REG"] <= 64, report  # the shared slot's branch costs ~2 (124 with tiles per branch)


def test_auto_dispatch_table(md, monkeypatch):
    bf16, fp32 = torch.bfloat16, torch.float32
    base = dict(is_cuda=True, compute_dtype=bf16, weight_dtypes=(bf16, bf16), num_slots=6, num_experts=64,
                needs_grad=False, fp8=False, has_triton=True)
    assert md.decide_fused_decode(**base)
    # up to 6 slots an expert on average (64 tokens × top-6 of 64), the range measured on an H100
    for num_slots in (63, 64, 66, 192, 193, 383, 384):
        assert md.decide_fused_decode(**{**base, "num_slots": num_slots}), num_slots
    assert md.FUSED_DECODE_MAX_SLOTS_PER_EXPERT == 6
    for change in [dict(is_cuda=False), dict(compute_dtype=fp32), dict(weight_dtypes=(fp32, bf16)),
                   dict(weight_dtypes=(bf16, fp32)), dict(num_slots=385), dict(num_slots=6 * 2048),
                   dict(needs_grad=True), dict(fp8=True), dict(has_triton=False)]:
        assert not md.decide_fused_decode(**{**base, **change}), change
    # which kernels: slot-major up to 3 slots an expert (32 tokens: it still won there), expert-major above
    assert [md.uses_expert_major(n, 64) for n in (1, 6, 63, 64, 65, 192, 193, 384, 10_000)] == [
        False, False, False, False, False, False, True, True, True]
    assert md.uses_expert_major(25, 8) and not md.uses_expert_major(24, 8)


def test_bench_moe_decode_runs_in_the_interpreter(md, device, tmp_path):
    """benchmarks/bench_moe_decode.py (its GPU run is for the lead) on the tiny preset (8 experts, top-2): the
    rows of 1 token (slot-major), 4 tokens (slot-major by auto, expert-major beside it) and 16 tokens
    (expert-major by auto, slot-major beside it), and at 4 tokens each op with the shared expert added and folded
    (at 16 tokens left out: the interpreter is slow), run, agree, and land in the JSONL."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_moe_decode.py"
    spec = importlib.util.spec_from_file_location("bench_moe_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.jsonl"
    run = ["--device", device, "--preset", "tiny", "--rounds", "1", "--reps", "1", "--out", str(out)]
    assert bench.main(run + ["--tokens", "1", "16", "--no-shared"]) == 0
    assert bench.main(run + ["--tokens", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["tokens"], r["path"], r["cuda_graph"]) for r in rows} >= {
        (1, "grouped", False), (1, "fused", False), (4, "grouped", False), (4, "fused", False),
        (4, "expert_major", False), (16, "expert_major", False), (16, "slot_major", False)} | {
        (4, op + shared, False) for op in ("slot_major", "expert_major") for shared in ("+shared", "_folded")} | {
        (4, "expert_major_folded+order", False)}
    assert all(r["ms"] > 0 and r["max_rel_diff"] < 0.02 for r in rows)


def test_generate_with_the_fused_path_forced_equals_the_default(md, device):
    """The tiny model end to end (prefill and cached decode through DeepSeekMoE), every routed-experts call
    forced through the kernels: the same greedy tokens and log-probs as the default path, in fp32."""
    from moeflow.models import MoETransformer
    from moeflow.models.generation import generate

    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=128, init_std=0.08)).eval().to(device)
    layers = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    prompts = [[5, 17, 3, 99, 42, 11, 12, 13], [7, 8]]
    runs = {}
    for fused in (False, True):
        for m in layers:
            m.fused_decode = fused
        with dispatched_ops() as ops:
            runs[fused] = generate(model, prompts, 4, return_logprobs=True)
        # 1 prefill (2 × 8 tokens × top-2 > 3 slots an expert: expert-major) + 3 decode steps (slot-major) a layer
        assert ops.names.count(EM_OP) == (len(layers) if fused else 0)
        assert ops.names.count(OP) == (len(layers) * 3 if fused else 0)
    assert runs[True].tokens == runs[False].tokens
    torch.testing.assert_close(torch.tensor(runs[True].logprobs), torch.tensor(runs[False].logprobs),
                               rtol=1e-4, atol=1e-5)


def test_the_rule_reads_the_call(md):
    """The per-call inputs of the rule (autograd counts only while it is on) and the forcing settings."""
    ex = _experts(8, 16, 8, 2, torch.float32, "cpu")
    x, idx, _ = _routing(1, 2, 8, 16, "cpu")
    stacks = (ex.gate_up_proj, ex.down_proj)
    assert md.fused_decode_inputs(ex, x, idx, *stacks) == dict(
        is_cuda=False, compute_dtype=torch.float32, weight_dtypes=(torch.float32,) * 2, num_slots=2,
        num_experts=8, needs_grad=False, fp8=False, has_triton=True)
    assert not md.fused_decode_applies(ex, x, idx, *stacks)
    ex.fused_decode = True
    assert md.fused_decode_applies(ex, x, idx, *stacks)
    ex.fused_decode = False
    assert not md.fused_decode_applies(ex, x, idx, *stacks)
    ex.down_proj.requires_grad_(True)
    assert md.fused_decode_inputs(ex, x, idx, *stacks)["needs_grad"]
    with torch.no_grad():
        assert not md.fused_decode_inputs(ex, x, idx, *stacks)["needs_grad"]
    ex.down_proj.requires_grad_(False)
    assert md.fused_decode_inputs(ex, x.requires_grad_(True), idx, *stacks)["needs_grad"]  # frozen experts


def test_parametrized_stacks_are_read_as_the_other_paths_read_them(md, device):
    """LoRA adapts the stacks through torch.nn.utils.parametrize: the fused path computes with W + ΔW."""
    from torch.nn.utils import parametrize

    class AddDelta(torch.nn.Module):
        def forward(self, w):
            return w + 0.05 * torch.ones_like(w).cumsum(-1) / w.shape[-1]

    ex = _experts(8, 24, 20, 2, torch.float32, device)
    x, idx, w = _routing(3, 2, 8, 24, device)
    plain = _run(ex, x, idx, w, fused=True)
    parametrize.register_parametrization(ex, "gate_up_proj", AddDelta())
    parametrize.register_parametrization(ex, "down_proj", AddDelta())
    got, want = _run(ex, x, idx, w, fused=True), _run(ex, x, idx, w, fused=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - plain).abs().max() > 0.01


def test_dispatch_traces_without_graph_breaks(md, device):
    """torch.compile(fullgraph=True) through RoutedExperts.forward's dispatch (the lazy import, the rule)
    and the op's fake kernel (whose shapes are checked too). The eager backend: interpreted kernels cannot
    run inside a compiled graph."""
    ex = _experts(8, 24, 20, 3, torch.float32, device)
    x, idx, w = _routing(2, 3, 8, 24, device)
    want = _run(ex, x, idx, w, fused=True)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(ex, backend="eager", fullgraph=True)(x, idx, w)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # the shapes compile traces with
        fake = md.routed_experts_decode(*(mode.from_tensor(t) for t in (x, idx, w, ex.gate_up_proj, ex.down_proj)))
    assert fake.shape == (2, 24) and fake.dtype == x.dtype and fake.device == x.device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_auto_compiles_captures_never_syncs_and_equals_grouped(md, monkeypatch):
    """bench_ref sizes in bf16 on CUDA, 1..32 tokens (slot-major) and 33..64 (expert-major): auto takes the
    fused path, which equals the grouped path to bf16 rounding and is no farther from float64; compiled
    (inductor) it gives the eager kernels' output; inside a CUDA graph the replay equals it too; with sync
    debug mode "error" nothing syncs."""
    E, D, F_, K = 64, 1024, 512, 6
    ex = _experts(E, D, F_, K, torch.bfloat16, "cuda", std=0.05)
    ex.fused_decode = None  # auto (the class default)
    compiled = torch.compile(ex, fullgraph=True)
    for T in (1, 2, 4, 8, 10, 11, 16, 32, 33, 64):
        x, idx, w = _routing(T, K, E, D, "cuda", seed=T)
        x = x.bfloat16()
        with torch.inference_mode():
            assert md.fused_decode_applies(ex, x, idx, ex.gate_up_proj, ex.down_proj)
            fused = _run(ex, x, idx, w, fused=None, takes_fused_op=True)  # auto
            grouped = _run(ex, x, idx, w, fused=False)
            ex.fused_decode = None  # auto again, for the calls below
            compiled(x, idx, w)  # compiles (may sync) before the sync check
            torch.cuda.set_sync_debug_mode("error")
            try:
                again = ex(x, idx, w)
                from_compiled = compiled(x, idx, w)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            static_x, static_idx, static_w = x.clone(), idx.clone(), w.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = ex(static_x, static_idx, static_w)
            static_x.copy_(x)
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(again, fused) and torch.equal(static_y, fused)
        assert torch.equal(from_compiled, fused), "inductor runs the same kernels: bit-equal expected"
        if md.uses_expert_major(idx.numel(), E):  # the one-launch order: the same integers, no sync, captured
            torch.cuda.set_sync_debug_mode("error")
            try:
                order, ends = md.fused_expert_order(idx, E)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            want_order, want_ends = md.expert_major_routing(idx, E)
            assert torch.equal(order, want_order) and torch.equal(ends, want_ends)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                static_y = md.expert_major_decode(static_x, static_idx, static_w, ex.gate_up_proj, ex.down_proj,
                                                  fused_order=True)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_y, fused)
        want64 = _float64(ex, x, idx, w)
        assert (fused.double() - grouped.double()).abs().max() <= 0.02 * want64.abs().max()
        err_fused = (fused.double() - want64).norm() / want64.norm()
        err_grouped = (grouped.double() - want64).norm() / want64.norm()
        assert err_fused <= 1.05 * err_grouped, (T, err_fused, err_grouped)
    # INT8 keeps its own per-slot path; forced onto its whole stack it must not take the fused one
    from moeflow.models.quant import Int8RoutedExperts

    q = Int8RoutedExperts(ex)
    q.use_slot_gather = False
    with torch.inference_mode(), dispatched_ops() as ops:
        q(x, idx, w)
    assert OP not in ops.names and EM_OP not in ops.names


@pytest.mark.slow  # ~25 s: the engine's steps through the interpreted kernels
def test_engine_equals_generate_with_the_fused_experts(md, device):
    """The serving engine's bucketed static step (the captured step's code, uncaptured) with every decode-sized
    routed-experts call through the kernels, prompts joining mid-way: each request's greedy tokens equal
    generate()'s (which takes the kernels too); the kernels ran in both."""
    from moeflow.models.generation import generate
    from moeflow.models.serving import Engine

    model = kernel_test_model(device, norm_weights=True)
    layers = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    for m in layers:
        m.fused_decode = True
    prompts = kernel_test_prompts((3, 9, 1))
    engine = Engine(model, max_batch=2, prefill_chunk=8, decode_mode="static")
    with dispatched_ops() as ops:
        got = engine_greedy_tokens(engine, prompts, 3)
    assert ops.names.count(OP) >= len(layers) * 2
    for i, p in enumerate(prompts):
        with dispatched_ops() as ops:
            want = generate(model, [p], 3).tokens[0]
        assert ops.names.count(OP) >= len(layers) * 2  # the 2 decode steps (and a short prompt's prefill)
        assert got[i] == want, f"request {i}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_equals_generate_with_the_fused_experts_on_auto(md):
    """The serving engine's captured decode (bf16) with the routed experts on auto (the fused kernels for
    decode-sized calls, the grouped GEMM for large prefill chunks), against generate() (which decides alike),
    token for token; the fused kernels ran in the captured steps."""
    from moeflow.models.serving import Engine

    model = kernel_test_model("cpu", norm_weights=True).to("cuda", torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    for m in layers:
        m.fused_decode = None  # auto
    prompts = kernel_test_prompts((3, 17, 1, 30, 9, 24))
    engine = Engine(model, max_batch=3, prefill_chunk=8, cache_len=65)
    assert engine.decode_mode == "graph"
    with dispatched_ops() as ops:
        got = engine_greedy_tokens(engine, prompts, 30)
    assert engine.static.num_graphs >= 2 and engine.static.num_replays > 30
    assert ops.names.count(OP) > 0  # dispatched while the graphs were captured
    assert_generate_equals(model, prompts, got, 30)
