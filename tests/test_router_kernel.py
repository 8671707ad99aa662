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
import math
from unittest import mock

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


# --------------------------------------------------------------------------- the logits in the kernel
def assert_fp32_dot_error(logits_TE, x_TD, weight_ED, ulps=4):
    """|logits − x · weightᵀ| (exact, in float64) ≤ ulps · √D · u · Σ_d |x_d · w_ed| for every element (u = 2⁻²⁴):
    an fp32 dot product's rounding error over D terms (its worst case grows with the depth of the summation, under
    2·log2(D) + D/BLOCK_D here; √D is the bound's usual scale), not a bf16 one (u = 2⁻⁹)."""
    x64, w64 = x_TD.double().cpu(), weight_ED.double().cpu()
    err = (logits_TE.double().cpu() - x64 @ w64.T).abs()
    scale = x64.abs() @ w64.abs().T
    bound = ulps * math.sqrt(x_TD.shape[1]) * 2.0 ** -24 * scale
    assert bool((err <= bound).all()), float((err / scale.clamp_min(1e-30)).max())


def _router_inputs(T, D, E, g, x_dtype=torch.bfloat16, w_dtype=torch.bfloat16, device="cpu"):
    x = torch.randn(T, D, generator=g).to(device, x_dtype)
    w = (torch.randn(E, D, generator=g) * D ** -0.5).to(device, w_dtype)
    return x, w


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_logits_within_an_fp32_dot_error_of_float64(rk, device, x_dtype, w_dtype):
    """The kernel's logits (``route_hidden``) against x · wᵀ in float64: within an fp32 dot product's error, as
    torch's fp32 GEMM (``Router.logits``) is; bench_ref's D 1024 and E 64, a D that is no multiple of the block (1000),
    a small one (24: one block, masked), E 12 (masked experts) and 256."""
    g = torch.Generator().manual_seed(10)
    for T, D, E in [(5, 1024, 64), (3, 1000, 12), (4, 24, 8), (2, 256, 256)]:
        x, w = _router_inputs(T, D, E, g, x_dtype, w_dtype, device)
        assert rk.logits_kernel_applies(x, w, None, min(6, E), "sigmoid")
        _, _, _, logits = rk.route_hidden(x, w, None, min(6, E), "sigmoid", True, 1.0)
        assert logits.dtype == torch.float32 and logits.shape == (T, E)
        assert_fp32_dot_error(logits, x, w)
        gemm = torch.nn.functional.linear(x.float(), w.float())  # Router.logits: the same bound holds for it
        assert_fp32_dot_error(gemm, x, w)
        # rows of x and of the weight read in place at a row stride past D (column slices of wider tensors)
        wide_x, wide_w = torch.zeros(T, D + 8, dtype=x_dtype, device=device), torch.zeros(E, D + 8, dtype=w_dtype,
                                                                                        device=device)
        wide_x[:, 8:], wide_w[:, 8:] = x, w
        assert torch.equal(rk.route_hidden(wide_x[:, 8:], wide_w[:, 8:], None, min(6, E), "sigmoid", True, 1.0)[3],
                           logits)


def test_route_hidden_routes_its_logits_as_route_does(rk, device):
    """After its logits the launch is ``route``'s, bit for bit: scores, choices and weights equal ``route`` of the
    logits it wrote, for sigmoid with bias, softmax, group-limited routing, E 256, E 12 (masked experts); and the
    choices are the formula's on the GEMM's logits wherever the choices are well separated (no two of the K + 1 best
    within 1e-5 in float64)."""
    g = torch.Generator().manual_seed(11)
    checked = 0
    for T, D, E, K, score_func, groups in [(40, 1024, 64, 6, "sigmoid", (1, 1)), (9, 512, 64, 6, "softmax", (1, 1)),
                                           (9, 256, 64, 6, "sigmoid", (8, 3)), (4, 128, 256, 8, "sigmoid", (8, 4)),
                                           (9, 100, 12, 6, "sigmoid", (1, 1)), (9, 100, 12, 6, "softmax", (1, 1))]:
        x, w = _router_inputs(T, D, E, g, device=device)
        bias = (torch.randn(E, generator=g) * 0.05).to(device)
        idx, wt, s, logits = rk.route_hidden(x, w, bias, K, score_func, True, 2.5, *groups)
        want = rk.route(logits, bias, K, score_func, True, 2.5, *groups)
        assert all(torch.equal(a, b) for a, b in zip((idx, wt, s), want)), (E, score_func, groups)
        exact = (x.double() @ w.double().T).cpu()
        s64 = exact.sigmoid() if score_func == "sigmoid" else exact.softmax(dim=-1)
        top = (s64 + bias.double().cpu()).topk(K + 1, dim=1).values
        separated = (top[:, :-1] - top[:, 1:]).min(dim=1).values > 1e-5
        gemm_logits = torch.nn.functional.linear(x.float(), w.float())
        s32 = gemm_logits.sigmoid() if score_func == "sigmoid" else gemm_logits.softmax(dim=-1)
        formula = select_experts(s32, bias, K, *groups).cpu()
        assert torch.equal(idx.cpu()[separated], formula[separated]), (E, score_func, groups)
        checked += int(separated.sum())
    assert checked >= 50


def test_logits_are_batch_invariant(rk, device):
    """A token's logits, scores, choices and weights are the same bits whatever the call: alone, 4th of 7, 212th of
    300, and in a call whose rows start at an odd element offset (another alignment of x): the sum order is the D
    blocking's, never the call's (the serving engine's prefill chunks and generate()'s whole prompts must route
    alike)."""
    g = torch.Generator().manual_seed(12)
    D, E = 256, 16  # few experts and K 2: the interpreter's 300 programs in seconds
    x, w = _router_inputs(300, D, E, g, device=device)
    bias = (torch.randn(E, generator=g) * 0.05).to(device)
    token = x[211].clone()

    def run(rows_TD, at):
        return [t[at] for t in rk.route_hidden(rows_TD, w, bias, 2, "sigmoid", True, 1.0)]

    alone = run(token[None], 0)
    seven = x[:7].clone()
    seven[3] = token
    flat = torch.empty(7 * D + 1, dtype=x.dtype, device=device)
    odd = flat[1:].view(7, D)  # rows one element past an aligned start
    odd.copy_(seven)
    for got in (run(seven, 3), run(x, 211), run(odd, 3)):
        assert all(torch.equal(a, b) for a, b in zip(got, alone))


def test_logits_kernel_applies_table(rk):
    x, w, b = torch.zeros(3, 16, dtype=torch.bfloat16), torch.zeros(8, 16, dtype=torch.bfloat16), torch.zeros(8)
    assert rk.logits_kernel_applies(x, w, b, 6, "sigmoid") and rk.logits_kernel_applies(x, w, None, 8, "softmax")
    assert rk.logits_kernel_applies(x.float(), w.float(), b, 2, "sigmoid")  # an fp32 model
    assert rk.logits_kernel_applies(x, w.float(), b, 2, "sigmoid")  # fp32 master weights, bf16 activations
    strided = torch.zeros(3, 32, dtype=torch.bfloat16)[:, :16]  # a row stride of 32 for rows of 16: read in place
    assert rk.logits_kernel_applies(strided, w, b, 2, "sigmoid")
    with torch.no_grad():
        assert rk.logits_kernel_applies(x, w.clone().requires_grad_(True), b, 2, "sigmoid")
    refused = [(x.double(), w, b, 2), (x, w.double(), b, 2), (x, w[:, :8], b, 2), (x[:, :0], w[:, :0], b, 2),
               (x[:0], w, b, 2), (x.t().contiguous().t(), w, b, 2), (x, w.t().contiguous().t(), b, 2),
               (x[0], w, b, 2), (x, w, b.double(), 2), (x, w, b, 9), (x, w[:0], None, 1),
               (x, w.clone().requires_grad_(True), b, 2), (x.clone().requires_grad_(True), w, b, 2),
               (x, w, b.clone().requires_grad_(True), 2), (x.int(), w, b, 2)]
    for x_, w_, b_, k in refused:
        assert not rk.logits_kernel_applies(x_, w_, b_, k, "sigmoid"), (tuple(x_.shape), x_.dtype, w_.dtype, k)
    assert not rk.logits_kernel_applies(x, w, b, 2, "relu")
    assert not rk.logits_kernel_applies(x, torch.zeros(12, 16, dtype=torch.bfloat16), None, 2, "sigmoid", 3, 1)
    if torch.cuda.is_available():
        assert not rk.logits_kernel_applies(x.cuda(), w, b, 2, "sigmoid")  # weight on another device


# --------------------------------------------------------------------------- where Router.forward takes it
class _Counted:
    """Replaces the kernel's two entries (from the logits, ``route``; from x, ``route_hidden``) with counting wrappers
    (``raise_on_call``: fail instead): ``calls`` both, ``hidden_calls`` the second's."""

    def __init__(self, rk, monkeypatch, raise_on_call=False):
        self.calls = self.hidden_calls = 0
        for entry in ("route", "route_hidden"):
            monkeypatch.setattr(rk, entry, self._wrap(getattr(rk, entry), entry == "route_hidden", raise_on_call))

    def _wrap(self, real, hidden, raise_on_call):
        def wrapper(*args, **kw):
            if raise_on_call:
                raise AssertionError("the router kernel was called where the formula was expected")
            self.calls += 1
            self.hidden_calls += hidden
            return real(*args, **kw)

        return wrapper


def _router(device, **cfg_kw):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(**cfg_kw)
    router = Router(cfg).to(device)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.3)
        router.e_score_correction_bias.normal_(0.0, 0.05)
    return router


def _on(monkeypatch, on=True, logits=True):
    monkeypatch.setattr(Router, "kernel_devices", ("cuda", "cpu"))
    monkeypatch.setattr(Router, "fused_inference", on)
    monkeypatch.setattr(Router, "fused_logits", logits)


def _formula_on(router, logits_TE):
    """``Router.forward``'s formula (the kernel off) after the given logits: ``Router.logits`` replaced for the call."""
    with mock.patch.object(Router, "fused_inference", False), mock.patch.object(router, "logits", lambda x: logits_TE):
        return router(logits_TE.new_empty(logits_TE.shape[0], router.weight.shape[1]))


def _same_routing(router, got, want, device):
    """The kernel's RouterOutput against the formula's: the logits within an fp32 GEMM's rounding of the formula's
    (the same values where the kernel reads ``Router.logits``), the same choices (no near-ties here); scores and
    weights the formula's on the kernel's own logits, within the interpreter's exp tolerance (bit-equal on the GPU)."""
    tol = 0 if device == "cuda" else SCORE_ULPS
    torch.testing.assert_close(got.logits_TE, want.logits_TE, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.topk_idx_TK, want.topk_idx_TK)
    own = _formula_on(router, got.logits_TE)
    assert torch.equal(got.topk_idx_TK, own.topk_idx_TK)
    assert ulps_apart(got.scores_TE, own.scores_TE) <= tol
    assert ulps_apart(got.topk_weight_TK, own.topk_weight_TK) <= tol + 2  # + the CPU sum's own order


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
        _same_routing(router, router(x), want, device)
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
            _same_routing(grouped, grouped(x), want, device)
    assert counted.calls == counted.hidden_calls == 5  # the logits in the kernel too (``fused_logits``, on)
    with torch.no_grad():
        monkeypatch.setattr(Router, "fused_logits", False)  # the logits GEMV, then the kernel after it
        got = router(x)
        assert torch.equal(got.logits_TE, router.logits(x))
    assert counted.calls == 6 and counted.hidden_calls == 5


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
            _same_routing(router, router(x), want, device)


def test_fp32_router_under_autocast_forms_its_logits_in_the_kernel(rk, device, monkeypatch):
    """An fp32 router (fp32 master weights) fed bf16 activations under autocast: ``Router.logits`` forms fp32 logits
    from the fp32 weight whatever autocast says, and so does the kernel (it reads the fp32 weight as it is): the same
    routing as the formula's; an fp64 router takes the formula."""
    router = _router(device)
    x = torch.randn(6, router.weight.shape[1], device=device).bfloat16()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        want = router(x)
        _on(monkeypatch)
        counted = _Counted(rk, monkeypatch)
        got = router(x)
    assert counted.hidden_calls == 1 and got.logits_TE.dtype == torch.float32
    assert_fp32_dot_error(got.logits_TE, x, router.weight)
    _same_routing(router, got, want, device)
    with torch.no_grad():
        router.double()(x.double())
    assert counted.calls == 1


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
    """What the kernel replaces, counted: the top-level aten ops of an eager bench_ref router call (torch.profiler on
    the CPU; each but detach is one CUDA kernel, topk two: select and sort) are its logits (``aten::linear``: in a
    bf16 model on CUDA two casts and the fp32 GEMV, 3 kernels; in the fp32 model here the casts are no-ops) and 9
    after them;
    with the kernel on, nothing but its entry (marked with ``record_function``: in the interpreter the launch runs
    torch ops of its own, on the GPU it is the output allocations and one launch); with ``fused_logits`` off, the
    logits and the entry."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for entry in ("route", "route_hidden"):
        real = getattr(rk, entry)

        def marked(*args, _real=real, **kw):
            with record_function("router_kernel"):
                return _real(*args, **kw)

        monkeypatch.setattr(rk, entry, marked)

    def top_level_ops(router, x):
        with torch.inference_mode():
            router(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                router(x)
        return [e.name for e in prof.events() if e.cpu_parent is None and not e.name.startswith("USDT")]

    cfg = ModelConfig.preset("bench_ref")
    router = Router(cfg).to(device)
    torch.nn.init.normal_(router.weight, std=0.02)
    x = torch.randn(1, cfg.hidden_size, device=device)
    logits_ops = ["aten::promote_types", "aten::to", "aten::to", "aten::linear"]  # the casts: no-ops in fp32
    eager = top_level_ops(router, x)
    assert eager == logits_ops + ["aten::sigmoid", "aten::detach", "aten::add", "aten::topk", "aten::gather",
                     "aten::sum", "aten::add", "aten::div", "aten::mul"], eager
    _on(monkeypatch)
    fused = top_level_ops(router, x)
    assert fused == ["router_kernel"], fused
    monkeypatch.setattr(Router, "fused_logits", False)
    after_logits = top_level_ops(router, x)
    assert after_logits == logits_ops + ["router_kernel"], after_logits


# --------------------------------------------------------------------------- the model: generate() and the engine
def test_model_decodes_through_the_kernel_as_through_the_formula(rk, device, monkeypatch):
    """The tiny model end to end (prefill + cached decode): every router of a no-grad forward takes the kernel, with
    the formula's tokens; log-probs after ``Router.logits`` within the interpreter's exp tolerance (bit-equal on the
    GPU), with the logits in the kernel (``fused_logits``) within what their fp32 sum order moves; a training forward
    keeps the formula."""
    from moeflow.models.generation import generate

    model = kernel_test_model(device)
    num_moe = len(list(model.routers()))
    prompts = [[5, 17, 3, 99, 42], [7, 8]]
    runs = {}
    for fused, logits in ((False, False), (True, False), (True, True)):
        _on(monkeypatch, fused, logits)
        counted = _Counted(rk, monkeypatch)
        runs[fused, logits] = generate(model, prompts, 4, return_logprobs=True)
        assert counted.calls == (4 * num_moe if fused else 0)  # prefill + 3 decode steps
        assert counted.hidden_calls == (counted.calls if logits else 0)
    want = runs[False, False]
    for key, tol in (((True, False), 1e-5 if device == "cpu" else 0), ((True, True), 1e-4)):
        assert runs[key].tokens == want.tokens, key
        for got, ref in zip(runs[key].logprobs, want.logprobs):
            assert got == pytest.approx(ref, abs=tol), key
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
# without bias, K 1; each from its logits and (+x) forming them from x and the weight: bench_ref's bf16 (D 1024),
# DeepSeek-V3's bf16 (D 7168), an fp32 weight with bf16 x
for name, E, K, softmax, bias, norm, G, D, x_ty, w_ty in [
        ("bench_ref", 64, 6, False, True, True, 1, 0, "", ""), ("v3", 256, 8, False, True, True, 8, 0, "", ""),
        ("softmax", 64, 6, True, False, True, 1, 0, "", ""), ("k1", 8, 1, False, True, False, 1, 0, "", ""),
        ("bench_ref+x", 64, 6, False, True, True, 1, 1024, "*bf16", "*bf16"),
        ("v3+x", 256, 8, False, True, True, 8, 7168, "*bf16", "*bf16"),
        ("fp32_weight+x", 64, 6, False, True, True, 1, 1024, "*bf16", "*fp32")]:
    fn = rk._router_kernel
    block_e, block_k = triton.next_power_of_2(E), triton.next_power_of_2(K)
    lanes, sum_lanes = min(block_e, rk.SOFTMAX_WARP), rk.last_pow2(K)
    constexprs = {"E": E, "K": K, "BLOCK_E": block_e, "BLOCK_K": block_k, "SOFTMAX": softmax, "HAS_BIAS": bias,
                  "NORM": norm, "GROUPS": G, "TOPK_GROUP": 4, "SOFTMAX_LANES": lanes, "SOFTMAX_LEVELS": lanes.bit_length() - 1,
                  "SUM_LANES": sum_lanes, "SUM_LEVELS": sum_lanes.bit_length() - 1, "HALVING": True,
                  "FROM_X": D > 0, "D": max(D, 1), "BLOCK_D": rk.logits_block_d(E, D) if D else 16, "INTERPRET": False}
    types = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "idx_ptr": "*i64", "weight_ptr": "*fp32",
             "scores_ptr": "*fp32", "route_scale": "fp32", "logits_stride": "i32", "x_ptr": x_ty or "*fp32",
             "x_stride": "i32", "w_ptr": w_ty or "*fp32", "w_stride": "i32"}
    signature = {n: "constexpr" if n in constexprs else types[n] for n in fn.arg_names}
    aligned = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                    attrs={(i,): aligned for i, n in enumerate(fn.arg_names) if n.endswith(("_ptr", "_stride"))})
    warps = rk.LOGITS_WARPS if D else 1
    kernel = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, **rk.COMPILE_OPTIONS})
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
    assert set(report) == {"bench_ref", "v3", "softmax", "k1", "bench_ref+x", "v3+x", "fp32_weight+x"}, report
    assert all(r["div_rn"] >= 1 and r["div_approx"] == 0 and r["ex2"] >= 1 for r in report.values()), report
    assert all(r["LOCAL"] == 0 and r["REG"] <= 255 and r["global_stores"] >= 3 for r in report.values()), report
    assert all(r["global_stores"] >= 4 for name, r in report.items() if name.endswith("+x")), report  # + the logits


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
@pytest.mark.parametrize("T,w_dtype,score_func", [(1, torch.bfloat16, "sigmoid"), (32, torch.bfloat16, "sigmoid"),
                                                  (2048, torch.bfloat16, "sigmoid"), (32, torch.bfloat16, "softmax"),
                                                  (32, torch.float32, "sigmoid")])
def test_on_the_gpu_logits_in_the_kernel_never_sync_capture_and_are_batch_invariant(rk, T, w_dtype, score_func):
    """bench_ref's router (D 1024, E 64, K 6, bias) from bf16 x on CUDA, its weight bf16 (or fp32: master weights):
    the logits within an fp32 dot product's error of float64 (as cuBLAS's are); scores, choices and weights those of
    ``route`` on the same logits and of the eager CUDA formula on them, bit for bit (the formula's tied choices in
    any order); nothing syncs; a CUDA graph's replay gives the eager call's outputs; a token's outputs are the same
    bits alone, 4th of 7, 212th of 300 and with its rows at an odd element offset."""
    g = torch.Generator().manual_seed(13)
    router = _router("cpu", hidden_size=1024, num_routed_experts=64, num_experts_per_tok=6, score_func=score_func)
    with torch.no_grad():
        router.weight.normal_(0.0, 1024 ** -0.5, generator=g)
    router = router.to("cuda", w_dtype)
    x = torch.randn(max(T, 300), 1024, generator=g).cuda().bfloat16()
    args = (router.e_score_correction_bias, router.k, score_func, router.norm_topk_prob, router.route_scale)
    with torch.inference_mode():
        rk.route_hidden(x[:T], router.weight, *args)  # JIT first
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = rk.route_hidden(x[:T], router.weight, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        idx, w, s, logits = out
        assert_fp32_dot_error(logits, x[:T], router.weight)
        assert all(torch.equal(a, b) for a, b in zip((idx, w, s), rk.route(logits, *args)))
        want = _formula_on(router, logits)
        assert torch.equal(s, want.scores_TE)
        assert torch.equal(idx.sort(1).values, want.topk_idx_TK.sort(1).values)
        same_order = (idx == want.topk_idx_TK).all(dim=1)
        assert same_order.float().mean() > 0.99 and torch.equal(w[same_order], want.topk_weight_TK[same_order])
        static_x = torch.zeros_like(x[:T])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = rk.route_hidden(static_x, router.weight, *args)
        static_x.copy_(x[:T])
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(static_out, out))
        token = x[211].clone()
        alone = [t[0] for t in rk.route_hidden(token[None], router.weight, *args)]
        seven = x[:7].clone()
        seven[3] = token
        odd = torch.empty(7 * 1024 + 1, dtype=x.dtype, device="cuda")[1:].view(7, 1024)
        odd.copy_(seven)
        for rows, at in ((seven, 3), (x[:300], 211), (odd, 3)):
            got = [t[at] for t in rk.route_hidden(rows, router.weight, *args)]
            assert all(torch.equal(a, b) for a, b in zip(got, alone)), at


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused_logits", [True, False])
def test_cuda_graph_engine_equals_generate_with_the_fused_router(rk, monkeypatch, fused_logits):
    """The serving engine's captured decode (bf16) with the fused router on, the logits in it or not
    (``fused_logits``), against generate() (which takes it too), token for token; the kernel ran (counted at capture
    and in generate's eager steps), the entry the switch names."""
    from moeflow.models.serving import Engine

    monkeypatch.setattr(Router, "fused_inference", True)
    monkeypatch.setattr(Router, "fused_logits", fused_logits)
    counted = _Counted(rk, monkeypatch)
    model = kernel_test_model("cpu").to("cuda", torch.bfloat16)
    prompts = kernel_test_prompts((3, 17, 1, 30, 9, 24))
    engine = Engine(model, max_batch=3, prefill_chunk=8, cache_len=65)
    assert engine.decode_mode == "graph"
    got = engine_greedy_tokens(engine, prompts, 30)
    assert engine.static.num_graphs >= 2 and engine.static.num_replays > 30
    assert counted.calls > 0 and counted.hidden_calls == (counted.calls if fused_logits else 0)
    assert_generate_equals(model, prompts, got, 30)
