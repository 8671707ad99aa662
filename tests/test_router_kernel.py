"""The fused router (models/kernels/router.py) against ``Router.forward``'s formula, and the rules that decide where
``Router.forward`` takes it.

The kernel runs on CUDA where there is one, else in Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1
on a machine without a GPU). On the CPU the model-level tests add "cpu" to ``Router.kernel_devices`` (and switch
``fused_inference`` on: it is off by default) so the model runs through the interpreted kernel. Everything here skips
when triton is not importable: it is an optional accelerator.

What "the same function" means here: on the GPU, bit for bit (the ``gpu`` tests). In the interpreter exp is numpy's,
a few ulps from torch's CPU sigmoid/softmax, so the CPU tests hold the scores to that tolerance and everything after
them exactly: the choices are ``topk_by_rank`` of the kernel's own scores + bias (the formula's set and order, ties
to the lower id) and the weights are the formula's gather / renormalisation / scaling of those scores with the sum
taken in CUDA ``sum``'s order (``cuda_sum_order``), ``torch.equal``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import (
    assert_generate_equals, engine_greedy_tokens, kernel_test_model, kernel_test_prompts, sm90_compile_report,
    triton_kernels)

from moeflow.models import ModelConfig
from moeflow.models.expert_order import topk_by_rank
from moeflow.models.moe import Router, select_experts

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SCORE_ULPS = 8  # numpy's exp against torch's CPU sigmoid/softmax in the interpreter (measured: up to 4)


@pytest.fixture(scope="module")
def rk():
    """kernels.router with a runnable kernel: compiled on CUDA, interpreted on the CPU (else skip)."""
    return triton_kernels("router", "_router_kernel")


@pytest.fixture(scope="module")
def device(rk):
    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_sum_order(w_TK: torch.Tensor, halving: bool = True) -> torch.Tensor:
    """Σ_k w[:, k] as CUDA's ``sum`` over a contiguous (T, K) tensor adds it: L = last_pow2(K) threads, thread l adds
    w[l] + w[l + L], then the threads combine in a shuffle tree (halving: l + L/2 into l first; doubling: l + 1)."""
    K = w_TK.shape[1]
    L = 1 << (K.bit_length() - 1)
    acc = [w_TK[:, l] + w_TK[:, l + L] if l + L < K else w_TK[:, l] for l in range(L)]
    while len(acc) > 1:
        n = len(acc) // 2
        acc = [acc[l] + acc[l + n] for l in range(n)] if halving else [acc[2 * l] + acc[2 * l + 1] for l in range(n)]
    return acc[0]


def formula_after_scores(scores_TE, bias_E, k, norm_topk_prob, route_scale, halving=True):
    """``Router.forward`` after its scores: choices ranked on scores + bias (ties to the lower id), the unbiased
    scores gathered, renormalised with the sum in CUDA's order, scaled."""
    idx_TK = topk_by_rank(scores_TE if bias_E is None else scores_TE + bias_E, k)
    w_TK = scores_TE.gather(1, idx_TK)
    if norm_topk_prob:
        w_TK = w_TK / (cuda_sum_order(w_TK, halving)[:, None] + 1e-20)
    return idx_TK, w_TK * route_scale


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in fp32 ulps between two tensors of non-negative floats."""
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max()) if a.numel() else 0


def _biases(kind: str, E: int, scores_TE: torch.Tensor, g: torch.Generator) -> torch.Tensor | None:
    """None; random (aux-free balancing's scale); or near ties: each expert's bias puts its choice for token 0 on one
    of four values a few ulps apart (choices in other rows then tie closely too)."""
    if kind == "none":
        return None
    if kind == "random":
        return torch.randn(E, generator=g) * 0.05
    target = torch.tensor(0.5, dtype=torch.float32)
    steps = torch.randint(0, 4, (E,), generator=g).to(torch.int32)
    levels = (target.view(torch.int32) + steps).view(torch.float32)
    return levels - scores_TE[0].cpu()  # the caller moves it to the device


def _logits(T, E, g, device, duplicate=False):
    x = torch.randn(T, E, generator=g) * 2.0
    if duplicate:  # experts 0/5, 1/6, 3/7 of equal logits: equal scores, exact ties where their biases are equal
        x[:, 5], x[:, 6], x[:, 7] = x[:, 0], x[:, 1], x[:, 3]
    return x.to(device)


@pytest.mark.parametrize("score_func,norm", list(itertools.product(("sigmoid", "softmax"), (True, False))))
def test_matches_the_formula_across_shapes(rk, device, score_func, norm):
    """T 1, 3, 32, 64 × E 8, 64 × K 1, 2, 6, biases none / random / near ties, route_scale 1 and 2.5: scores within a
    few ulps of torch's (bit-equal on the GPU), choices and weights exactly the formula's on those scores."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for (T, E, K), kind in zip(itertools.product((1, 3, 32, 64), (8, 64), (1, 2, 6)),
                               itertools.cycle(("none", "random", "near_ties"))):
        x = _logits(T, E, g, device, duplicate=kind == "random")
        want_s = x.sigmoid() if score_func == "sigmoid" else x.softmax(dim=-1)
        bias = _biases(kind, E, want_s, g)
        bias = bias.to(device) if bias is not None else None
        scale = 2.5 if checked % 2 else 1.0
        idx, w, s = rk.route(x, bias, K, score_func, norm, scale)
        assert idx.dtype == torch.int64 and w.dtype == s.dtype == torch.float32
        assert idx.shape == w.shape == (T, K) and s.shape == (T, E)
        tolerance = 0 if device == "cuda" else SCORE_ULPS
        assert ulps_apart(s, want_s) <= tolerance, (T, E, K, kind)
        want_idx, want_w = formula_after_scores(s, bias, K, norm, scale)
        assert torch.equal(idx, want_idx), (T, E, K, kind)
        assert torch.equal(w, want_w), (T, E, K, kind)
        # the chosen set is torch.topk's (ties at the k-th value aside: none with distinct choices)
        choice = s if bias is None else s + bias
        if kind == "none":
            assert torch.equal(idx.sort(dim=1).values, choice.topk(K, dim=1).indices.sort(dim=1).values)
        checked += 1
    assert checked == 24


def test_exact_ties_go_to_the_lower_expert_id(rk, device):
    """Equal choices (equal logits and biases, or every logit equal): the lower id first, in the set and in the column
    order (``topk_by_rank``'s rule); the weights of tied experts are equal."""
    g = torch.Generator().manual_seed(1)
    E, K = 8, 6
    x = _logits(4, E, g, device, duplicate=True) * 0.01  # scores near 0.5 (1/8): the biases below decide
    x[3] = 0.0  # every score equal
    bias = torch.zeros(E, device=device)
    bias[[0, 5]], bias[[1, 6]] = 0.3, 0.2  # experts 0, 5 tie above 1, 6 (tied): those four first in every row
    for score_func in ("sigmoid", "softmax"):
        idx, w, s = rk.route(x, bias, K, score_func, True, 1.0)
        want_idx, want_w = formula_after_scores(s, bias, K, True, 1.0)
        assert torch.equal(idx, want_idx) and torch.equal(w, want_w)
        assert idx[:, :4].tolist() == [[0, 5, 1, 6]] * 4
        assert idx[3].tolist() == [0, 5, 1, 6, 2, 3]  # all scores equal: the rest by id
        assert torch.equal(w[:, 0], w[:, 1]) and torch.equal(w[:, 2], w[:, 3])
        idx_nobias, _, _ = rk.route(x[3:], None, K, score_func, False, 1.0)
        assert idx_nobias.tolist() == [[0, 1, 2, 3, 4, 5]]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
def test_wide_rows_and_extreme_logits(rk, device):
    """E up to 256 (a block of 256, DeepSeek-V3's width) and E not a power of two (masked lanes never chosen), K up to
    16; logits of ±1e4 (scores 0 and 1, exp overflowing in the sigmoid), -inf logits under softmax."""
    g = torch.Generator().manual_seed(2)
    for T, E, K in [(3, 256, 8), (2, 200, 16), (2, 12, 12), (5, 3, 3)]:
        x = _logits(T, E, g, device)
        x[0, : E // 2] = 1e4
        x[-1, 1::2] = -1e4
        bias = (torch.randn(E, generator=g) * 0.05).to(device)
        for score_func, norm in itertools.product(("sigmoid", "softmax"), (True, False)):
            if score_func == "softmax":
                x[-1, 0] = float("-inf")
            idx, w, s = rk.route(x, bias, K, score_func, norm, 1.5)
            want_s = x.sigmoid() if score_func == "sigmoid" else x.softmax(dim=-1)
            assert ulps_apart(s, want_s) <= (0 if device == "cuda" else SCORE_ULPS), (E, K, score_func)
            want_idx, want_w = formula_after_scores(s, bias, K, norm, 1.5)
            assert torch.equal(idx, want_idx) and torch.equal(w, want_w), (E, K, score_func, norm)
            assert int(idx.max()) < E


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
def test_all_zero_scores_renormalise_to_zero(rk, device):
    """A token whose every sigmoid score is 0 (logits of −1e4): its weights are 0, as the formula's ``+ 1e-20`` makes
    them (not 0/0); the choices are the bias's."""
    x = torch.full((2, 8), -1e4, device=device)
    bias = torch.arange(8, device=device, dtype=torch.float32) * 0.01
    idx, w, s = rk.route(x, bias, 3, "sigmoid", True, 2.0)
    assert torch.equal(s, torch.zeros_like(s)) and torch.equal(w, torch.zeros_like(w))
    assert idx.tolist() == [[7, 6, 5]] * 2


def test_nan_logits_never_pick_a_masked_lane(rk, device):
    """A NaN choice counts as +inf: chosen first, the ids stay within [0, E) and distinct (the experts index with
    them: an id out of range would read past the expert weights)."""
    x = torch.zeros(2, 6, device=device)
    x[0, 4] = float("nan")
    x[1] = float("nan")
    idx, w, _ = rk.route(x, None, 3, "sigmoid", True, 1.0)
    assert idx[0, 0] == 4 and idx[1].tolist() == [0, 1, 2]
    assert all(len(set(row)) == 3 and max(row) < 6 for row in idx.tolist())
    # a NaN of either sign (the sign bit would order a negative NaN below every number): first all the same
    bias = torch.zeros(6)
    bias[2], bias[4] = float("nan"), -float("nan")
    assert bias[4].view(torch.int32) < 0  # the sign bit is set
    idx, _, _ = rk.route(torch.zeros(1, 6, device=device), bias.to(device), 3, "sigmoid", True, 1.0)
    assert idx[0, :2].tolist() == [2, 4]


def test_group_limited_routing_matches_select_experts(rk, device):
    """n_group > 1, topk_group < n_group: the choices are ``moe.select_experts``'s (the formula's group-limited top-k)
    on the kernel's own scores, column for column, the weights the formula's; bench_ref-like (64 experts, 8 groups),
    DeepSeek-V3's (256, 8 groups, 4 kept, top-8) and one-expert groups (the group score is the choice itself)."""
    g = torch.Generator().manual_seed(6)
    for T, E, G, kept, K in [(5, 64, 8, 3, 6), (4, 256, 8, 4, 8), (6, 16, 4, 2, 2), (3, 8, 8, 4, 3)]:
        x = _logits(T, E, g, device)
        bias = (torch.randn(E, generator=g) * 0.05).to(device)
        for score_func in ("sigmoid", "softmax"):
            assert rk.kernel_applies(x, bias, K, score_func, G, kept)
            idx, w, s = rk.route(x, bias, K, score_func, True, 2.5, G, kept)
            want_idx = select_experts(s, bias, K, G, kept)
            assert torch.equal(idx, want_idx), (E, G, kept, K, score_func)
            want_w = s.gather(1, want_idx)
            assert torch.equal(w, want_w / (cuda_sum_order(want_w)[:, None] + 1e-20) * 2.5)
            assert all(len(set((row // (E // G)).tolist())) <= kept for row in idx), (E, G, kept)


def test_group_ties_keep_the_lower_group(rk, device):
    """Equal group scores keep the lower group id; a group holding its largest choice twice scores it twice (torch's
    top-2 values are then equal); the refused shapes (E not a power of two, too few kept experts) take the formula."""
    x = torch.zeros(1, 8, device=device)  # every score 0.5
    bias = torch.tensor([0.0, 0.0, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0], device=device)  # groups 1 and 2 tie
    idx, _, _ = rk.route(x, bias, 2, "sigmoid", True, 1.0, 4, 1)
    assert idx.tolist() == [[2, 3]]
    bias = torch.tensor([0.0, 0.0, 0.2, 0.2, 0.3, 0.05, 0.0, 0.0], device=device)  # group 1: 0.7 + 0.7 > 0.8 + 0.55
    idx, _, _ = rk.route(x, bias, 2, "sigmoid", True, 1.0, 4, 1)
    assert idx.tolist() == [[2, 3]] and torch.equal(idx, select_experts(torch.full((1, 8), 0.5, device=device), bias,
                                                                          2, 4, 1))
    assert not rk.kernel_applies(torch.zeros(2, 12), None, 2, "sigmoid", 3, 1)  # E 12: not a power of two
    assert not rk.kernel_applies(torch.zeros(2, 8), None, 3, "sigmoid", 4, 1)  # 1 kept group of 2 < k = 3
    assert rk.kernel_applies(torch.zeros(2, 12), None, 2, "sigmoid", 3, 3)  # every group kept: plain top-k


def test_strided_logits_are_read_in_place(rk, device):
    """Rows of logits with a row stride past E (a column slice of a wider tensor): the contiguous copy's results."""
    g = torch.Generator().manual_seed(4)
    wide = _logits(5, 24, g, device)
    bias = (torch.randn(16, generator=g) * 0.05).to(device)
    got, want = rk.route(wide[:, 4:20], bias, 4, "sigmoid", True, 1.0), rk.route(wide[:, 4:20].contiguous(), bias, 4,
                                                                               "sigmoid", True, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_sum_order_reference_is_not_vacuous(rk, device):
    """The CUDA-order reference differs from other orders on these values (so the exact weight checks above test the
    kernel's order): with the doubling tree, the weights differ in some row, and the kernel agrees with halving."""
    g = torch.Generator().manual_seed(3)
    x = _logits(64, 64, g, device)
    idx, w, s = rk.route(x, None, 6, "sigmoid", True, 1.0)
    _, halving = formula_after_scores(s, None, 6, True, 1.0, halving=True)
    _, doubling = formula_after_scores(s, None, 6, True, 1.0, halving=False)
    sequential = s.gather(1, idx) / (s.gather(1, idx).cumsum(dim=1)[:, -1:] + 1e-20)
    assert torch.equal(w, halving) and not torch.equal(w, doubling) and not torch.equal(w, sequential)


def test_kernel_applies_table(rk):
    x, b = torch.zeros(3, 8), torch.zeros(8)
    assert rk.kernel_applies(x, b, 6, "sigmoid") and rk.kernel_applies(x, None, 8, "softmax")
    assert rk.kernel_applies(x[:, :4], None, 2, "sigmoid")  # a row stride of 8 for rows of 4: read in place
    with torch.no_grad():
        assert rk.kernel_applies(x.clone().requires_grad_(True), b, 2, "sigmoid")
    refused = [(x.double(), b.double(), 2, "sigmoid"), (x, b.double(), 2, "sigmoid"), (x.bfloat16(), b, 2, "sigmoid"),
               (x, b, 0, "sigmoid"), (x, b, 9, "sigmoid"), (x, b, 2, "relu"), (x, b[:4], 2, "sigmoid"),
               (x[0], b, 2, "sigmoid"), (x[:0], b, 2, "sigmoid"), (x.t().contiguous().t(), b, 2, "sigmoid"),
               (torch.zeros(1, rk.MAX_E * 2), None, 2, "sigmoid"), (torch.zeros(1, 64), None, rk.MAX_K + 1, "sigmoid"),
               (x.clone().requires_grad_(True), b, 2, "sigmoid")]
    for x_, b_, k, f in refused:
        assert not rk.kernel_applies(x_, b_, k, f), (tuple(x_.shape), k, f)
    if torch.cuda.is_available():
        assert not rk.kernel_applies(x.cuda(), b, 2, "sigmoid")  # bias on another device


# --------------------------------------------------------------------------- where Router.forward takes it
class _Counted:
    """Replaces the kernel entry with a counting wrapper (``raise_on_call``: fail instead)."""

    def __init__(self, rk, monkeypatch, raise_on_call=False):
        self.calls = 0
        real = rk.route

        def wrapper(*args, **kw):
            if raise_on_call:
                raise AssertionError("the router kernel was called where the formula was expected")
            self.calls += 1
            return real(*args, **kw)

        monkeypatch.setattr(rk, "route", wrapper)


def _router(device, **cfg_kw):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(**cfg_kw)
    router = Router(cfg).to(device)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.3)
        router.e_score_correction_bias.normal_(0.0, 0.05)
    return router


def _on(monkeypatch, on=True):
    monkeypatch.setattr(Router, "kernel_devices", ("cuda", "cpu"))
    monkeypatch.setattr(Router, "fused_inference", on)


def _same_routing(got, want, device):
    """The kernel's RouterOutput against the formula's: logits the same tensor values, choices equal, scores and
    weights within the interpreter's exp tolerance (bit-equal on the GPU)."""
    tol = 0 if device == "cuda" else SCORE_ULPS
    assert torch.equal(got.logits_TE, want.logits_TE) and torch.equal(got.topk_idx_TK, want.topk_idx_TK)
    assert ulps_apart(got.scores_TE, want.scores_TE) <= tol
    assert ulps_apart(got.topk_weight_TK, want.topk_weight_TK) <= tol + 2  # + the CPU sum's own order


def test_cpu_tensors_take_the_formula_by_default(rk, monkeypatch):
    _Counted(rk, monkeypatch, raise_on_call=True)
    assert Router.fused_inference is True and Router.kernel_devices == ("cuda",)  # on, but only on CUDA
    router = _router("cpu")
    x = torch.randn(5, router.weight.shape[1])
    with torch.no_grad():
        router(x)
        monkeypatch.setattr(Router, "fused_inference", True)  # on, but the CPU is no kernel device
        router(x)


def test_the_kernel_only_where_it_applies(rk, device, monkeypatch):
    """No grad / inference mode / a frozen router: the kernel, with the formula's routing, also group-limited. Training
    (grad through the logits), forced or balanced routing, group-limited routing over 12 experts, fp64 logits, the
    switch off: the formula."""
    router = _router(device)
    x = torch.randn(7, router.weight.shape[1], device=device)
    with torch.no_grad():
        want = router(x)
    _on(monkeypatch)
    counted = _Counted(rk, monkeypatch)
    with torch.no_grad():
        _same_routing(router(x), want, device)
    with torch.inference_mode():
        router(x)
    assert counted.calls == 2
    router.weight.requires_grad_(False)  # a frozen router, autograd on: no graph to record, the kernel
    router(x)
    assert counted.calls == 3
    router.weight.requires_grad_(True)
    out = router(x)  # training: the formula, and the gradient flows
    out.topk_weight_TK.sum().backward()
    assert counted.calls == 3 and router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    with torch.no_grad():
        forced = torch.zeros(7, router.k, dtype=torch.long, device=device)
        assert torch.equal(router(x, forced).topk_idx_TK, forced)
        router.force_balanced = True
        router(x)
        router.force_balanced = False
        router.double()(x.double())
        router.float()
        monkeypatch.setattr(Router, "fused_inference", False)
        router(x)
    assert counted.calls == 3
    monkeypatch.setattr(Router, "fused_inference", True)
    uneven = _router(device, num_routed_experts=12, n_group=3, topk_group=1)  # group-limited over 12: the formula
    with torch.no_grad():
        uneven(x)
        assert counted.calls == 3
        for kept in (1, 2):  # group-limited, and every group kept (plain top-k): the kernel, the formula's routing
            grouped = _router(device, n_group=2, topk_group=kept)
            monkeypatch.setattr(Router, "fused_inference", False)
            want = grouped(x)
            monkeypatch.setattr(Router, "fused_inference", True)
            _same_routing(grouped(x), want, device)
    assert counted.calls == 5


def test_softmax_router_and_no_bias(rk, device, monkeypatch):
    """score_func softmax, balancing without the bias (no aux-free), norm_topk_prob off, route_scale 2.5."""
    for kw in ({"score_func": "softmax"}, {"balancing": "none"},
               {"norm_topk_prob": False, "route_scale": 2.5, "score_func": "softmax"}):
        router = _router(device, **kw)
        x = torch.randn(9, router.weight.shape[1], device=device)
        monkeypatch.setattr(Router, "fused_inference", False)
        with torch.no_grad():
            want = router(x)
            _on(monkeypatch)
            _same_routing(router(x), want, device)


def test_torch_compile_traces_the_formula(rk, device, monkeypatch):
    """Under torch.compile the formula is traced (inductor fuses it), never the kernel, even where eager would take
    it: the FX graph holds the sigmoid, the top-k and the gather, the kernel entry is not called."""
    _on(monkeypatch)
    _Counted(rk, monkeypatch, raise_on_call=True)
    router = _router(device)
    x = torch.randn(3, router.weight.shape[1], device=device)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(router, backend=keep_graph, fullgraph=True)(x)
    targets = " ".join(str(node.target) for gm in graphs for node in gm.graph.nodes)
    # the top-k is topk_by_rank's comparison count under compile (a scatter_), torch.topk above its size limit
    assert "sigmoid" in targets and "gather" in targets and ("scatter_" in targets or "topk" in targets), targets
    monkeypatch.setattr(Router, "fused_inference", False)
    with torch.no_grad():
        assert torch.equal(got.topk_idx_TK, router(x).topk_idx_TK)


def test_eager_router_op_count(rk, device, monkeypatch):
    """What the kernel replaces, counted: the top-level aten ops of an eager bench_ref router call after its logits
    (torch.profiler on the CPU; each but detach is one CUDA kernel, topk two: select and sort) and, with the kernel
    on, nothing but the kernel's entry (marked with ``record_function``: in the interpreter the launch runs torch ops
    of its own, on the GPU it is the three output allocations and one launch)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    real = rk.route

    def marked(*args, **kw):
        with record_function("router_kernel"):
            return real(*args, **kw)

    monkeypatch.setattr(rk, "route", marked)

    def top_level_ops_after_linear(router, x):
        with torch.inference_mode():
            router(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                router(x)
        names = [e.name for e in prof.events() if e.cpu_parent is None and not e.name.startswith("USDT")]
        return names[names.index("aten::linear") + 1:]

    cfg = ModelConfig.preset("bench_ref")
    router = Router(cfg).to(device)
    torch.nn.init.normal_(router.weight, std=0.02)
    x = torch.randn(1, cfg.hidden_size, device=device)
    eager = top_level_ops_after_linear(router, x)
    assert eager == ["aten::sigmoid", "aten::detach", "aten::add", "aten::topk", "aten::gather", "aten::sum",
                     "aten::add", "aten::div", "aten::mul"], eager
    _on(monkeypatch)
    fused = top_level_ops_after_linear(router, x)
    assert fused == ["router_kernel"], fused


# --------------------------------------------------------------------------- the model: generate() and the engine
def test_model_decodes_through_the_kernel_as_through_the_formula(rk, device, monkeypatch):
    """The tiny model end to end (prefill + cached decode): every router of a no-grad forward takes the kernel, with
    the formula's tokens (log-probs within the interpreter's exp tolerance; bit-equal on the GPU); a training forward
    keeps the formula."""
    from moeflow.models.generation import generate

    model = kernel_test_model(device)
    num_moe = len(list(model.routers()))
    prompts = [[5, 17, 3, 99, 42], [7, 8]]
    runs = {}
    for fused in (False, True):
        _on(monkeypatch, fused)
        counted = _Counted(rk, monkeypatch)
        runs[fused] = generate(model, prompts, 4, return_logprobs=True)
        assert counted.calls == (4 * num_moe if fused else 0)  # prefill + 3 decode steps
    assert runs[True].tokens == runs[False].tokens
    for got, want in zip(runs[True].logprobs, runs[False].logprobs):
        assert got == pytest.approx(want, abs=1e-5 if device == "cpu" else 0)
    _Counted(rk, monkeypatch, raise_on_call=True)
    ids = torch.tensor(prompts[:1], device=device)
    model.train()
    model(ids, targets=ids).loss.backward()  # grad on: the formula (the wrapper would raise)


def test_engine_equals_generate_with_the_kernel(rk, device, monkeypatch):
    """The serving engine's bucketed static step (the captured step's code, uncaptured) with the kernel on, prompts
    joining mid-way: each request's greedy tokens equal generate()'s (which takes the kernel too)."""
    from moeflow.models.serving import Engine

    _on(monkeypatch)
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
from moeflow.models.kernels import router as rk

cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
report = {}
# bench_ref (E 64, K 6, sigmoid + bias, renormalised), DeepSeek-V3 (256, top-8, 4 of 8 groups), a softmax router
# without bias, K 1
for name, E, K, softmax, bias, norm, G in [("bench_ref", 64, 6, False, True, True, 1),
                                           ("v3", 256, 8, False, True, True, 8), ("softmax", 64, 6, True, False, True, 1),
                                           ("k1", 8, 1, False, True, False, 1)]:
    fn = rk._router_kernel
    block_e, block_k = triton.next_power_of_2(E), triton.next_power_of_2(K)
    lanes, sum_lanes = min(block_e, rk.SOFTMAX_WARP), rk.last_pow2(K)
    constexprs = {"E": E, "K": K, "BLOCK_E": block_e, "BLOCK_K": block_k, "SOFTMAX": softmax, "HAS_BIAS": bias,
                  "NORM": norm, "GROUPS": G, "TOPK_GROUP": 4, "SOFTMAX_LANES": lanes, "SOFTMAX_LEVELS": lanes.bit_length() - 1,
                  "SUM_LANES": sum_lanes, "SUM_LEVELS": sum_lanes.bit_length() - 1, "HALVING": True,
                  "INTERPRET": False}
    types = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "idx_ptr": "*i64", "weight_ptr": "*fp32",
             "scores_ptr": "*fp32", "route_scale": "fp32", "logits_stride": "i32"}
    signature = {n: "constexpr" if n in constexprs else types[n] for n in fn.arg_names}
    aligned = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                    attrs={(i,): aligned for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")})
    kernel = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1, **rk.COMPILE_OPTIONS})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL):(\d+)", usage))
    ptx = kernel.asm["ptx"]
    report[name] = {"div_rn": len(re.findall(r"\bdiv\.rn(?:\.ftz)?\.f32", ptx)),
                    "div_approx": len(re.findall(r"\b(?:div\.full|div\.approx|rcp\.approx)", ptx)),
                    "ex2": len(re.findall(r"\bex2\.approx", ptx)), "shfl": len(re.findall(r"\bshfl\.sync", ptx)),
                    "global_stores": len(re.findall(r"\bst\.global", ptx)), **{k: int(v) for k, v in fields.items()}}
print(json.dumps(report))
"""


def test_kernel_compiles_for_sm90(rk):
    """The interpreter is lenient: compile the kernel for sm_90 (Triton's own ptxas, no GPU needed) at bench_ref's and
    DeepSeek-V3's shapes (its group-limited routing too), softmax and K 1. IEEE divisions only (``div.rn``, no ``div.full``/approximate reciprocal):
    CUDA's ``1 / (1 + expf(−x))`` and eager's renormalising division; libdevice's expf inlined (its ``ex2``); no
    spills."""
    report = sm90_compile_report(_COMPILE_FOR_SM90)
    assert set(report) == {"bench_ref", "v3", "softmax", "k1"}, report
    assert all(r["div_rn"] >= 1 and r["div_approx"] == 0 and r["ex2"] >= 1 for r in report.values()), report
    assert all(r["LOCAL"] == 0 and r["REG"] <= 255 and r["global_stores"] >= 3 for r in report.values()), report


# --------------------------------------------------------------------------- on the GPU (the lead runs these)
def _probe_cuda_sum_order() -> str:
    """Which shuffle order CUDA's ``sum`` over the rows of a (T, 6) fp32 tensor runs on this torch: random rows, on
    many of which the two trees round differently."""
    w = torch.rand(4096, 6, generator=torch.Generator().manual_seed(9))
    got = w.cuda().sum(dim=1).cpu()
    halving, doubling = cuda_sum_order(w, True), cuda_sum_order(w, False)
    assert not torch.equal(halving, doubling)
    return "halving" if torch.equal(got, halving) else "doubling" if torch.equal(got, doubling) else "neither"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sum_order_is_the_kernels(rk):
    """CUDA ``sum``'s shuffle order on this torch is the one the kernel assumes (``SUM_TREE``): else flip it."""
    assert _probe_cuda_sum_order() == rk.SUM_TREE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T,score_func,n_group", [(1, "sigmoid", 1), (32, "sigmoid", 1), (2048, "sigmoid", 1),
                                                  (32, "softmax", 1), (32, "sigmoid", 8)])
def test_on_the_gpu_equals_eager_cuda_never_syncs_and_captures(rk, T, score_func, n_group, monkeypatch):
    """bench_ref's router on CUDA (E 64, K 6, sigmoid + bias; 1, 32 and 2,048 tokens), a softmax one and a
    group-limited one (4 of 8 groups): scores,
    choices and weights bit-equal to the eager CUDA formula (Router.forward with the switch off); with sync debug
    mode "error" nothing syncs; a CUDA graph's replay gives the eager kernel call's outputs."""
    monkeypatch.setattr(Router, "fused_inference", False)  # router(x) below: the formula
    g = torch.Generator().manual_seed(5)
    router = _router("cpu", num_routed_experts=64, num_experts_per_tok=6, score_func=score_func, n_group=n_group,
                     topk_group=max(1, n_group // 2)).cuda()
    x = torch.randn(T, router.weight.shape[1], generator=g).cuda()
    with torch.inference_mode():
        want = router(x)  # the formula: the switch is off (set above)
        logits, bias = want.logits_TE, router.e_score_correction_bias
        args = (bias, router.k, score_func, router.norm_topk_prob, router.route_scale, n_group, router.topk_group)
        rk.route(logits, *args)  # JIT first
        torch.cuda.set_sync_debug_mode("error")
        try:
            idx, w, s = rk.route(logits, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(s, want.scores_TE), (T, score_func, (s != want.scores_TE).sum().item())
        # torch.topk orders tied values arbitrarily: compare as sets where the choices tie, else exactly
        assert torch.equal(idx.sort(1).values, want.topk_idx_TK.sort(1).values), (T, score_func)
        same_order = (idx == want.topk_idx_TK).all(dim=1)
        assert same_order.float().mean() > 0.99, (T, score_func)
        assert torch.equal(w[same_order], want.topk_weight_TK[same_order]), (
            T, score_func, (w[same_order] != want.topk_weight_TK[same_order]).sum().item())
        static_logits = torch.zeros_like(logits)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = rk.route(static_logits, *args)
        static_logits.copy_(logits)
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(static_out, (idx, w, s)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_equals_generate_with_the_fused_router(rk, monkeypatch):
    """The serving engine's captured decode (bf16) with the fused router on, against generate() (which takes it too),
    token for token; the kernel ran (counted at capture and in generate's eager steps)."""
    from moeflow.models.serving import Engine

    monkeypatch.setattr(Router, "fused_inference", True)
    counted = _Counted(rk, monkeypatch)
    model = kernel_test_model("cpu").to("cuda", torch.bfloat16)
    prompts = kernel_test_prompts((3, 17, 1, 30, 9, 24))
    engine = Engine(model, max_batch=3, prefill_chunk=8, cache_len=65)
    assert engine.decode_mode == "graph"
    got = engine_greedy_tokens(engine, prompts, 30)
    assert engine.static.num_graphs >= 2 and engine.static.num_replays > 30
    assert counted.calls > 0
    assert_generate_equals(model, prompts, got, 30)
