"""The shared expert folded into the fused decode kernels (``DeepSeekMoE.fused_shared``, models/kernels/moe_decode.py
``shared_fold_weights``): a decode-sized MoE layer's routed AND shared experts in the two slot-major launches (or the
three expert-major ones), against the formula (the fold off: the shared SwiGLU's module added), float64, and each
other.

The kernels run on CUDA where there is one, else in Triton's interpreter on the CPU (conftest turns it on without a
GPU); everything skips when triton is not importable.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_generate_equals, dispatched_ops, engine_greedy_tokens, kernel_test_model, kernel_test_prompts,
    triton_kernels)

from moeflow.models import ModelConfig
from moeflow.models.layers import SwiGLU
from moeflow.models.moe import DeepSeekMoE, RoutedExperts

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
OP = "moeflow.routed_experts_decode.default"
EM_OP = "moeflow.routed_experts_decode_by_expert.default"  # expert-major (T·K > 3·E)


@pytest.fixture(scope="module")
def md():
    return triton_kernels("moe_decode", "_gate_up_swiglu_kernel", "_down_combine_kernel",
                          "_expert_gate_up_swiglu_kernel", "_expert_down_kernel", "_combine_kernel")


@pytest.fixture(scope="module")
def device(md):
    return "cuda" if torch.cuda.is_available() else "cpu"


def _moe(device, dtype, *, E=32, K=2, D=48, F_=24, S=1, std=0.1, seed=0):
    """A DeepSeekMoE with every weight drawn (D, F not multiples of the kernels' blocks), no gradient."""
    cfg = ModelConfig.preset("tiny").replace(hidden_size=D, num_routed_experts=E, num_experts_per_tok=K,
                                             moe_intermediate_size=F_, num_shared_experts=S)
    moe, g = DeepSeekMoE(cfg), torch.Generator().manual_seed(seed)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=std, generator=g)
    return moe.requires_grad_(False).to(device=device, dtype=dtype)


def _call(moe, x_TD, *, fused, fold):
    """moe(x) as (T, D) with the routed experts' fused path forced on/off and the fold on/off; which ops ran and how
    often the shared SwiGLU's modules (itself and its three linears) were called."""
    moe.experts.fused_decode, moe.fused_shared = fused, fold
    calls = []
    shared = moe.shared_experts
    hooks = [m.register_forward_hook(lambda *_: calls.append(1))
             for m in (shared, shared.gate_proj, shared.up_proj, shared.down_proj)]
    try:
        with torch.no_grad(), dispatched_ops() as ops:
            y = moe(x_TD[None], with_losses=False, with_stats=False)[0][0]
    finally:
        for h in hooks:
            h.remove()
    return y, ops.names, len(calls)


def _float64(moe, x_TD, idx_TK=None, weight_TK=None):
    """routed + shared in float64 on the given routing, else the one the layer itself chooses (its router in fp32)."""
    if idx_TK is None:
        with torch.no_grad():
            r = moe.gate(x_TD.float())
        idx_TK, weight_TK = r.topk_idx_TK, r.topk_weight_TK
    x, ex, sh = x_TD.double(), moe.experts, moe.shared_experts
    g, d, F_ = ex.gate_up_proj.double()[idx_TK], ex.down_proj.double()[idx_TK], ex.width
    h = torch.einsum("td,tkfd->tkf", x, g)
    routed = torch.einsum("tkf,tkdf,tk->td", torch.nn.functional.silu(h[..., :F_]) * h[..., F_:], d,
                          weight_TK.double())
    shared = (torch.nn.functional.silu(x @ sh.gate_proj.weight.double().t()) * (x @ sh.up_proj.weight.double().t())
              ) @ sh.down_proj.weight.double().t()
    return routed + shared


def _x(T, D, device, dtype, seed=0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("T,S", [(1, 1), (3, 2), (32, 1)])
def test_fold_equals_the_formula_in_fp32_and_calls_no_shared_module(md, device, T, S):
    """1, 3 and 32 tokens (T·K = 64 ≤ 3·E: slot-major), one and two shared slots a token: the folded layer equals
    the fold off (fused routed kernels + the shared module) and the grouped/looped formula, and float64; the
    shared SwiGLU's modules are not called when folded (4 calls a layer when not) and the one op ran."""
    moe = _moe(device, torch.float32, S=S)
    x = _x(T, 48, device, torch.float32, seed=T)
    folded, ops, calls = _call(moe, x, fused=True, fold=True)
    assert calls == 0 and ops.count(OP) == 1, (calls, ops.count(OP))
    unfolded, ops, calls = _call(moe, x, fused=True, fold=False)
    assert calls == 4 and ops.count(OP) == 1
    formula, ops, calls = _call(moe, x, fused=False, fold=True)  # the fold asked for, but no fused path: the module
    assert calls == 4 and OP not in ops
    scale = formula.abs().max()
    for got in (folded, unfolded):
        torch.testing.assert_close(got, formula, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(folded.double(), _float64(moe, x), rtol=1e-5, atol=2e-6 * scale)


def test_the_fold_off_reproduces_the_old_outputs_exactly(md, device):
    """fused_shared False is the old forward, bit for bit (routed experts' output + the shared module's); with no
    fused path the fold changes nothing either (RoutedExperts adds the module's output the same way)."""
    moe = _moe(device, torch.float32)
    x = _x(3, 48, device, torch.float32)
    for fused in (True, False):
        moe.experts.fused_decode = fused
        with torch.no_grad():
            r = moe.gate(x)
            old = moe.experts(x, r.topk_idx_TK, r.topk_weight_TK) + moe.shared_experts(x)
        assert torch.equal(_call(moe, x, fused=fused, fold=False)[0], old)
    assert torch.equal(_call(moe, x, fused=False, fold=True)[0], old)


def _emulated(moe, x_TD):
    """The folded kernels' documented rounding points in torch (bf16): each routed slot as the kernels without the
    shared expert round it; the shared slot's gate, up, silu·up and down output rounded likewise (weight 1); the
    K + 1 terms summed in fp32 and rounded once."""
    dt, ex, sh = x_TD.dtype, moe.experts, moe.shared_experts

    def r(t):
        return t.to(dt).float()

    with torch.no_grad():
        rt = moe.gate(x_TD)
    idx, F_, x = rt.topk_idx_TK, ex.width, x_TD.float()
    h = r(torch.einsum("td,tkfd->tkf", x, ex.gate_up_proj.float()[idx]))
    a = r(torch.nn.functional.silu(h[..., :F_]) * h[..., F_:])
    y_TKD = r(torch.einsum("tkf,tkdf->tkd", a, ex.down_proj.float()[idx])) * r(rt.topk_weight_TK)[..., None]
    gate, up = r(x @ sh.gate_proj.weight.float().t()), r(x @ sh.up_proj.weight.float().t())
    shared = r(r(torch.nn.functional.silu(gate) * up) @ sh.down_proj.weight.float().t())
    return (y_TKD.sum(dim=1) + shared).to(dt)


BIG_BLOCKS = dict(gate_up_block_f=128, gate_up_block_d=1024, down_block_d=128, down_block_f=512)


@pytest.mark.parametrize("T", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_bf16_rounds_where_documented_and_is_as_close_to_float64_as_the_formula(md, device, T):
    """bench_ref's layer (E 64, top-6, D 1024, F 512, one shared expert) in bf16: (1) the folded kernels equal the
    torch emulation of their rounding points up to the order of fp32 sums (nearly all bit-equal, the rest one bf16
    step); (2) within bf16 noise of the formula (the kernels without the shared expert + its module's output);
    (3) no farther from float64 than it. The op directly, with large blocks: the interpreter pays per program."""
    moe = _moe(device, torch.bfloat16, E=64, K=6, D=1024, F_=512, S=1, std=0.05)
    x = _x(T, 1024, device, torch.bfloat16, seed=T)
    sh, ex = moe.shared_experts, moe.experts
    with torch.no_grad():
        r = moe.gate(x)
        routed = (x, r.topk_idx_TK, r.topk_weight_TK, ex.gate_up_proj, ex.down_proj)
        got = md.routed_experts_decode(*routed, sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight,
                                       **BIG_BLOCKS)
        formula = md.routed_experts_decode(*routed, **BIG_BLOCKS) + sh(x)
    emulated = _emulated(moe, x)
    eps = torch.finfo(torch.bfloat16).eps
    assert (got.float() - emulated.float()).abs().max() <= eps * emulated.abs().max()
    assert (got == emulated).float().mean() > 0.97, (got == emulated).float().mean()
    want64 = _float64(moe, x)
    assert (got.double() - formula.double()).abs().max() <= 0.02 * want64.abs().max()
    err_fold = (got.double() - want64).norm() / want64.norm()
    err_formula = (formula.double() - want64).norm() / want64.norm()
    assert err_fold <= 1.05 * err_formula, (err_fold, err_formula)


# The expert-major kernels' fold (T·K > 3·E). Their smallest blocks (block_s 16 is tl.dot's least) where a test
# wants token tiles and expert runs split; the slot-major op's beside them for the comparison.
EM_SMALL = dict(gate_up_block_f=16, gate_up_block_d=16, down_block_d=16, down_block_f=16, block_s=16,
                combine_block_d=16)
SM_SMALL = dict(gate_up_block_f=16, gate_up_block_d=16, down_block_d=16, down_block_f=16)
EM_BIG = dict(gate_up_block_f=512, gate_up_block_d=1024, down_block_d=1024, down_block_f=512, block_s=64,
              combine_block_d=1024)


def _shared_weights(moe):
    sh = moe.shared_experts
    return sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight


@pytest.mark.parametrize("T,S", [(13, 1), (21, 2), (37, 1)])
def test_expert_major_fold_equals_the_formula_and_the_slot_major_fold(md, device, T, S):
    """Through DeepSeekMoE at expert-major sizes (8 experts, top-2: from 13 tokens), one and two shared slots a
    token, the shared expert's tokens in one, two and three tiles of block_s (the last one partial): the folded
    layer ran the expert-major op once and no shared module (4 calls a layer unfolded), and equals the fold off,
    the grouped/looped formula, the slot-major fold (its op on the same routing) and float64, in fp32."""
    moe = _moe(device, torch.float32, E=8, S=S)
    x = _x(T, 48, device, torch.float32, seed=T)
    folded, ops, calls = _call(moe, x, fused=True, fold=True)
    assert calls == 0 and ops.count(EM_OP) == 1 and OP not in ops, (calls, ops.count(EM_OP))
    unfolded, ops, calls = _call(moe, x, fused=True, fold=False)
    assert calls == 4 and ops.count(EM_OP) == 1
    formula, ops, calls = _call(moe, x, fused=False, fold=True)
    assert calls == 4 and EM_OP not in ops
    ex = moe.experts
    with torch.no_grad():
        r = moe.gate(x)
        slot_major = md.routed_experts_decode(x, r.topk_idx_TK, r.topk_weight_TK, ex.gate_up_proj, ex.down_proj,
                                              *_shared_weights(moe))
    scale = formula.abs().max()
    for got in (folded, unfolded, slot_major):
        torch.testing.assert_close(got, formula, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(folded, slot_major, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(folded.double(), _float64(moe, x), rtol=1e-5, atol=2e-6 * scale)


def _forced_routing(T, K, E, device, seed):
    """(idx, w): every token's first slot on expert E // 2 (T slots: past one tile of 16 when T > 16), its others on
    distinct experts of 1 .. E − 2 besides it, so experts 0 and E − 1 get no slots."""
    g = torch.Generator().manual_seed(seed)
    others = torch.tensor([e for e in range(1, E - 1) if e != E // 2])
    idx = torch.stack([torch.cat([torch.tensor([E // 2]), others[torch.randperm(len(others), generator=g)[:K - 1]]])
                       for _ in range(T)])
    return idx.to(device), (torch.rand(T, K, generator=g) + 0.1).to(device)


@pytest.mark.parametrize("S", [1, 2])
def test_expert_major_fold_with_idle_experts_and_an_expert_past_one_tile(md, device, S):
    """The expert-major op directly on forced routing (8 experts, top-3, 20 tokens): one expert takes 20 slots
    (two tiles of block_s 16), two take none, the shared expert's 20 tokens two tiles (the second partial). The fold
    equals the formula (the op unfolded + the shared module), the slot-major fold and float64 in fp32."""
    T, K, E = 20, 3, 8
    moe = _moe(device, torch.float32, E=E, K=K, S=S)
    x = _x(T, 48, device, torch.float32, seed=S)
    idx, w = _forced_routing(T, K, E, device, seed=S)
    routed = (x, idx, w, moe.experts.gate_up_proj, moe.experts.down_proj)
    with torch.no_grad():
        got = md.expert_major_decode(*routed, *_shared_weights(moe), **EM_SMALL)
        formula = md.expert_major_decode(*routed, **EM_SMALL) + moe.shared_experts(x)
        slot_major = md.routed_experts_decode(*routed, *_shared_weights(moe), **SM_SMALL)
    assert got.shape == (T, 48) and got.dtype == torch.float32
    scale = formula.abs().max()
    torch.testing.assert_close(got, formula, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(got, slot_major, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(got.double(), _float64(moe, x, idx, w), rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("S", [1, 2])
def test_expert_major_fold_in_bf16_rounds_as_the_slot_major_fold(md, device, S):
    """bench_ref's D, F and top-6 with 8 experts (the interpreter's time goes with the weights read) at 5 tokens
    (30 slots > 24: expert-major) in bf16, the op directly with large blocks: the expert-major fold (1) equals the
    torch emulation of the documented rounding points and the slot-major fold up to the order of fp32 sums (nearly
    all bit-equal, the rest one bf16 step); (2) is within bf16 noise of the formula (the expert-major op unfolded +
    the shared module); (3) is no farther from float64 than the formula, nor than the slot-major fold."""
    moe = _moe(device, torch.bfloat16, E=8, K=6, D=1024, F_=512, S=S, std=0.05)
    x = _x(5, 1024, device, torch.bfloat16, seed=5)
    ex = moe.experts
    with torch.no_grad():
        r = moe.gate(x)
        routed = (x, r.topk_idx_TK, r.topk_weight_TK, ex.gate_up_proj, ex.down_proj)
        assert md.uses_expert_major(r.topk_idx_TK.numel(), 8)
        got = md.expert_major_decode(*routed, *_shared_weights(moe), **EM_BIG)
        formula = md.expert_major_decode(*routed, **EM_BIG) + moe.shared_experts(x)
        slot_major = md.routed_experts_decode(*routed, *_shared_weights(moe), **BIG_BLOCKS)
    assert got.dtype == torch.bfloat16
    eps = torch.finfo(torch.bfloat16).eps
    for other in (_emulated(moe, x), slot_major):
        assert (got.float() - other.float()).abs().max() <= eps * other.abs().max()
        assert (got == other).float().mean() > 0.97, (got == other).float().mean()
    want64 = _float64(moe, x)
    assert (got.double() - formula.double()).abs().max() <= 0.02 * want64.abs().max()

    def err(y):
        return (y.double() - want64).norm() / want64.norm()

    assert err(got) <= 1.05 * err(formula), (err(got), err(formula))
    assert err(got) <= 1.05 * err(slot_major), (err(got), err(slot_major))


def _compiled_equals_eager(moe, x):
    """The FX graphs of torch.compile(fullgraph=True, an eager backend) of ``moe`` on x, after checking the compiled
    call bit-equal to the eager one."""
    with torch.no_grad():
        want = moe(x[None], with_losses=False, with_stats=False)[0]
    graphs = []

    def eager_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(moe, backend=eager_backend, fullgraph=True)(x[None], with_losses=False,
                                                                       with_stats=False)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    return graphs


def test_expert_major_folded_layer_traces_without_graph_breaks(md, device):
    """torch.compile(fullgraph=True, eager backend) through DeepSeekMoE at an expert-major size with two shared
    slots a token: the expert-major op with the shared weights in the graph (no sort, no shared module's linears),
    bit-equal to the eager call; the fake kernel's shapes with the shared inputs."""
    moe = _moe(device, torch.float32, E=8, S=2)
    moe.experts.fused_decode, moe.fused_shared = True, True
    x = _x(13, 48, device, torch.float32)
    graphs = _compiled_equals_eager(moe, x)
    nodes = [node for gm in graphs for node in gm.graph.nodes]
    ops = [node for node in nodes if "routed_experts_decode_by_expert" in str(node.target)]
    assert len(ops) == 1 and len([a for a in ops[0].args if a is not None]) >= 9, ops  # 6 + the 3 shared weights
    assert not any("sort" in str(node.target) for node in nodes)
    assert len([n for n in nodes if "linear" in str(n.target)]) == 1  # the router's logits; no shared linear
    from torch._subclasses.fake_tensor import FakeTensorMode

    r = moe.gate(x)
    order, ends = md.expert_major_routing(r.topk_idx_TK, 8)
    tensors = (x, order, ends, r.topk_weight_TK, moe.experts.gate_up_proj, moe.experts.down_proj,
               *_shared_weights(moe))
    with FakeTensorMode() as mode:
        fake = md.routed_experts_decode_by_expert(*(mode.from_tensor(t) for t in tensors))
    assert fake.shape == (13, 48) and fake.dtype == x.dtype and fake.device == x.device


class _ScaledLinear(torch.nn.Linear):
    """An nn.Linear computing something else than F.linear with its weight (as LoRALinear and Fp8Linear do)."""

    def forward(self, x):
        return 2 * super().forward(x)


def _swap(shared: SwiGLU, name: str, cls) -> None:
    old = getattr(shared, name)
    new = cls(old.in_features, old.out_features, bias=False).to(old.weight)
    new.weight = old.weight
    setattr(shared, name, new)


@pytest.mark.parametrize("T", [3, 21])
def test_what_does_not_fold_takes_the_module(md, device, T):
    """Not folded, the shared module's own output added instead (and still right): a linear with its own forward
    (LoRA, fp8), a width that is not a multiple of F, weights that want a gradient; on the slot-major kernels
    (3 tokens) and the expert-major ones (21 tokens × top-2 > 3 slots an expert of 8)."""
    x = _x(T, 48, device, torch.float32)
    for case in ("linear_forward", "width", "grad"):
        moe = _moe(device, torch.float32, E=32 if T == 3 else 8)
        if case == "linear_forward":
            _swap(moe.shared_experts, "up_proj", _ScaledLinear)
        elif case == "width":  # 1.5 × F wide
            moe.shared_experts = SwiGLU(48, 36).to(device)
        elif case == "grad":
            moe.shared_experts.down_proj.weight.requires_grad_(True)
        moe.experts.fused_decode, moe.fused_shared = True, True
        calls = []
        moe.shared_experts.register_forward_hook(lambda *_: calls.append(1))
        with torch.set_grad_enabled(case == "grad"), dispatched_ops() as ops:
            got = moe(x[None], with_losses=False)[0][0]
        assert calls == [1], case
        assert ops.names.count(EM_OP if T == 21 else OP) == 1, case
        moe.fused_shared = False
        with torch.no_grad():
            want = moe(x[None], with_losses=False)[0][0]
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6, msg=case)


def test_a_stand_in_for_the_routed_experts_gets_no_shared_expert(md, device):
    """A module in the routed experts' place with their call but not their class (expert parallelism's) is called
    as before, the shared module added after it."""

    class StandIn(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.inner = experts

        def forward(self, x_TD, idx_TK, weight_TK):
            return self.inner(x_TD, idx_TK, weight_TK)

    moe = _moe(device, torch.float32)
    x = _x(3, 48, device, torch.float32)
    want = _call(moe, x, fused=True, fold=False)[0]
    moe.experts = StandIn(moe.experts)
    moe.fused_shared = True
    with torch.no_grad():
        assert torch.equal(moe(x[None], with_losses=False)[0][0], want)


def test_parametrized_shared_weights_are_read_as_the_formula_reads_them(md, device):
    """A parametrization on the shared linears' weights (a plain nn.Linear forward underneath): folded, with W + ΔW."""
    from torch.nn.utils import parametrize

    class AddDelta(torch.nn.Module):
        def forward(self, w):
            return w + 0.05 * torch.ones_like(w).cumsum(-1) / w.shape[-1]

    moe = _moe(device, torch.float32)
    x = _x(2, 48, device, torch.float32)
    plain = _call(moe, x, fused=True, fold=True)[0]
    for name in ("gate_proj", "up_proj", "down_proj"):
        parametrize.register_parametrization(getattr(moe.shared_experts, name), "weight", AddDelta())
    got, ops, calls = _call(moe, x, fused=True, fold=True)
    assert calls == 0 and ops.count(OP) == 1
    want = _call(moe, x, fused=False, fold=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - plain).abs().max() > 0.01


def test_folded_layer_traces_without_graph_breaks(md, device):
    """torch.compile(fullgraph=True, eager backend) through DeepSeekMoE and the fold's dispatch: the op with the
    shared weights in the graph, bit-equal to the eager call; the fake kernel's shapes with the shared inputs."""
    moe = _moe(device, torch.float32, S=2)
    moe.experts.fused_decode, moe.fused_shared = True, True
    x = _x(2, 48, device, torch.float32)
    graphs = _compiled_equals_eager(moe, x)
    ops = [node for gm in graphs for node in gm.graph.nodes if "routed_experts_decode" in str(node.target)]
    assert len(ops) == 1 and len([a for a in ops[0].args if a is not None]) >= 8, ops  # 5 + the 3 shared weights
    from torch._subclasses.fake_tensor import FakeTensorMode

    sh, ex = moe.shared_experts, moe.experts
    r = moe.gate(x)
    tensors = (x, r.topk_idx_TK, r.topk_weight_TK, ex.gate_up_proj, ex.down_proj, sh.gate_proj.weight,
               sh.up_proj.weight, sh.down_proj.weight)
    with FakeTensorMode() as mode:
        fake = md.routed_experts_decode(*(mode.from_tensor(t) for t in tensors))
    assert fake.shape == (2, 48) and fake.dtype == x.dtype and fake.device == x.device


@pytest.mark.slow  # ~25 s: the engine's steps through the interpreted kernels
def test_engine_equals_generate_with_the_shared_expert_folded(md, device):
    """The serving engine's bucketed static step with every MoE call through the fused kernels and the shared
    expert folded, prompts joining mid-way: each request's greedy tokens equal generate()'s; the
    shared SwiGLUs were never called."""
    from moeflow.models.serving import Engine

    model = kernel_test_model(device, norm_weights=True)
    moes = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    assert moes
    for m in moes:
        m.fused_shared = True
    for m in model.modules():
        if isinstance(m, RoutedExperts):
            m.fused_decode = True
    calls = []
    for m in moes:
        m.shared_experts.register_forward_hook(lambda *_: calls.append(1))
    prompts = kernel_test_prompts((3, 9, 1))
    engine = Engine(model, max_batch=2, prefill_chunk=8, decode_mode="static")
    with dispatched_ops() as ops:
        got = engine_greedy_tokens(engine, prompts, 3)
    assert ops.names.count(OP) >= len(moes) * 2 and not calls
    assert_generate_equals(model, prompts, got, 3)
    assert not calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_the_fold_compiles_captures_never_syncs_and_equals_the_formula(md):
    """bench_ref's layer in bf16 on CUDA, routed experts on auto, 1..32 tokens (slot-major) and 33, 64 (expert-major):
    folded (no shared module called), within bf16 noise of the fold off and no farther from float64; compiled
    (inductor) bit-equal to the eager kernels; a CUDA graph's replay equal; with sync debug mode "error" nothing
    syncs."""
    moe = _moe("cuda", torch.bfloat16, E=64, K=6, D=1024, F_=512, S=1, std=0.05)
    compiled = torch.compile(moe, fullgraph=True)
    for T in (1, 2, 8, 10, 32, 33, 64):
        x = _x(T, 1024, "cuda", torch.bfloat16, seed=T)
        op = EM_OP if md.uses_expert_major(T * 6, 64) else OP
        with torch.inference_mode():
            folded, ops, calls = _call(moe, x, fused=None, fold=True)
            assert calls == 0 and ops.count(op) == 1, (T, calls)
            formula = _call(moe, x, fused=None, fold=False)[0]
            moe.fused_shared = True

            def step(x_TD):
                return moe(x_TD[None], with_losses=False, with_stats=False)[0][0]

            compiled(x[None], with_losses=False, with_stats=False)  # compiles (may sync) before the sync check
            torch.cuda.set_sync_debug_mode("error")
            try:
                again = step(x)
                from_compiled = compiled(x[None], with_losses=False, with_stats=False)[0][0]
            finally:
                torch.cuda.set_sync_debug_mode("default")
            static_x = x.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = step(static_x)
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(again, folded) and torch.equal(static_y, folded)
        assert torch.equal(from_compiled, folded), "inductor runs the same kernels: bit-equal expected"
        want64 = _float64(moe, x)
        assert (folded.double() - formula.double()).abs().max() <= 0.02 * want64.abs().max()
        err_fold = (folded.double() - want64).norm() / want64.norm()
        err_formula = (formula.double() - want64).norm() / want64.norm()
        assert err_fold <= 1.05 * err_formula, (T, err_fold, err_formula)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_equals_generate_with_the_shared_expert_folded(md):
    """The serving engine's captured decode (bf16, routed experts auto, the fold on)
    against generate(), token for token; the fused op ran while capturing and no shared SwiGLU was called in the
    decode steps' captures."""
    from moeflow.models.serving import Engine

    model = kernel_test_model("cpu", norm_weights=True).to("cuda", torch.bfloat16)
    calls = []
    for m in model.modules():
        if isinstance(m, DeepSeekMoE):
            m.fused_shared = True  # off by default until measured on a GPU
            m.shared_experts.register_forward_hook(lambda *_: calls.append(1))
    prompts = kernel_test_prompts((3, 17, 1, 30, 9, 24))
    engine = Engine(model, max_batch=3, prefill_chunk=8, cache_len=65)
    assert engine.decode_mode == "graph"
    with dispatched_ops() as ops:
        got = engine_greedy_tokens(engine, prompts, 30)
    assert engine.static.num_graphs >= 2 and engine.static.num_replays > 30
    assert ops.names.count(OP) > 0 and not calls  # 8-token prefill chunks and decode steps: all slot-major, folded
    assert_generate_equals(model, prompts, got, 30)
