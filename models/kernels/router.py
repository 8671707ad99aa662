"""The MoE router (logits, scores, biased top-k, gate weights) as one Triton launch (inference only).

Why: a serving decode step at batch 1 is launch-bound (issue 13: ~1.7 µs a kernel, replayed as a CUDA graph but not
compiled). The router's fp32 logits (``Router.logits``) are 3 kernels in a bf16 model (x and the weight cast to
fp32, cuBLAS's fp32 GEMV; "the logits in the kernel" below); after them, eager ``Router.forward`` launches 9
kernels a MoE layer with sigmoid scores and the balancing bias (8 without it): sigmoid, add bias, topk (two:
gatherTopK's select and a bitonic sort of the k), gather, sum, add 1e-20, div, mul by route_scale. How counted:
``torch.profiler`` lists the top-level aten ops of an eager call after ``aten::linear`` as sigmoid, detach (a view,
no kernel), add, topk, gather, sum, add, div, mul (tests/test_router_kernel.py ``test_eager_router_op_count`` pins
that list, and that with the kernel on nothing but its entry is left); on CUDA each is one kernel except topk, two.
Fused: 1 launch a layer, so 9 → 1 (bench_ref's 7 MoE layers: 63 → 7 launches a decode step; the ``graph`` vs
``graph+norouter`` rows of benchmarks/profile_decode.py should differ by 56 kernels a step). With the logits in it
(``route_hidden``, ``Router.fused_logits``): 12 → 1 a layer, 84 → 7 a step (``graph+norouterlogits`` has 21 more
kernels a step than ``graph``).

The logits in the kernel (``route_hidden``; ``route`` reads ``Router.logits``' instead): logit[t, e] = Σ_d x[t, d] ·
w[e, d] in fp32, x and w read in their dtypes (bf16, fp16 or fp32: an fp32 master weight as it is) and each product
taken in fp32, exact for bf16 and fp16 operands. Summation order (``_logits``): a (BLOCK_E, BLOCK_D) tile of the
weight a step, its products summed along D by one ``tl.sum`` (a tree that the tile's shape and the launch's warps
fix), the block sums added in ascending D order. BLOCK_D comes from E and D only (``logits_block_d``) and the warps
are a constant, so every token of every call is summed in the same order: a token's logits, and so its routing, do
not depend on how many tokens the call has or where the token sits in it (batch invariance: the serving engine's
prefill chunks and generate()'s whole prompts must route alike; tests ``test_logits_are_batch_invariant`` and the
``gpu`` one). Against cuBLAS's fp32 GEMM the logits differ only in that order (both within an fp32 dot product's
error of float64: ``test_logits_within_an_fp32_dot_error_of_float64``), so the choices can differ from
``Router.logits``' where two choices are within that error (near-ties). Why one program a token and no ``tl.dot``:
the routing after the logits is per token; a dot needs a block of ≥ 16 tokens (15 wasted at batch 1) and rounds in
the tensor cores' own way, and fp32 weights would need its slow IEEE form; a decode step's few tokens read the
weight (bench_ref 128 KB) from L2 after the first. At a 2,048-token prefill chunk each program reads it once, 256 MB
from L2 a layer: more than cuBLAS, but prefill is not what this launch is for.

The function is ``Router.forward``'s after the logits, with its rounding points (shape suffixes: T tokens, E experts,
K experts per token, L lanes of a summing warp):
    s = 1 / (1 + exp(−x))                    sigmoid: CUDA's ``sigmoid`` (expf, an IEEE division)
      = exp(x − max) / Σ exp(x − max)        softmax: CUDA's warp softmax (dim ≤ 1024): lane l sums e[l], e[l + L],
                                             ... from 0 in that order, then a halving butterfly over the L lanes
    choice = s + bias (fp32; no bias: s)
    group-limited routing (n_group G > 1, topk_group < G; ``moe.select_experts``): a group's score is the sum of its
          two largest choices (one addition: either order), the topk_group best groups stay (ties to the lower group
          id, as CUDA's topk collects equal values in index order), the others' choices become −inf
    idx = the K largest choices, largest first, ties to the lower expert id (``expert_order.topk_by_rank``'s order;
          torch.topk picks the same set and order except among tied values, which it leaves unordered)
    w = s[idx]; if norm_topk_prob: w = w / (Σ_k w + 1e-20) with Σ in CUDA ``sum``'s order over the K columns
    (L = last_pow2(K) threads, thread l adds w[l] + w[l + L], then a halving shuffle tree: ``block_x_reduce``
    since pytorch#164790, Oct 2025; ``SUM_TREE`` = "doubling" is the older ascending order); weight = w · route_scale.
The K columns come in the formula's order (largest choice first), which matters: RoutedExperts and the fused decode
experts (kernels/moe_decode.py) sum the K slots' outputs in column order. exp is libdevice's ``__nv_expf``
(CUDA's ``expf``) and the divisions ``div.rn`` (IEEE, as nvcc's default ``-prec-div``), so on the GPU the kernel
computes eager CUDA's values; the ``gpu`` tests check that bit for bit. Two places may still differ: Triton links
libdevice with flush-to-zero, so a sigmoid score below 1.2e-38 (logit < −87.3) or a softmax term that small flushes
to 0 where eager keeps a subnormal; and NaN logits (the formula picks NaN choices first; here they count as +inf).
In Triton's CPU interpreter exp is numpy's, which differs from torch's CPU sigmoid/softmax by a few ulps: there the
tests check the scores to that tolerance and everything after them exactly (selection, gather, sum order, division).

Not taken (``kernel_applies``, ``Router.forward``): while torch.compile traces (inductor fuses the formula; the
compiled step's ``topk_by_rank`` is its own fused form), when a gradient is needed (no backward), forced or balanced
routing, group-limited routing over an E that is not a power of two, E > ``MAX_E``, K > ``MAX_K``, logits not fp32
(the fp64 reference tests); with the logits in it (``logits_kernel_applies``) also x or the weight fp64 (those take
``Router.logits``, then this launch after it where it applies).

Capture-safe: no host synchronisation (every size comes from shapes), outputs allocated by the caller's allocator (a
CUDA graph's pool), one launch. Not registered as a torch op (``Router.forward`` calls it only outside
``torch.compile``). Triton is optional: without it ``HAS_TRITON`` is False and the router keeps the formula. On a CPU,
set ``TRITON_INTERPRET=1`` before this module is imported to run the kernel in Triton's interpreter (the tests do).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # optional dependency: Router.forward then never takes the kernel
    triton = tl = libdevice = None

HAS_TRITON = triton is not None

SCORE_FUNCS = ("sigmoid", "softmax")
MAX_E = 256  # one program holds a row of E choices (a power-of-two block; bench_ref 64, DeepSeek-V3 256)
MAX_K = 16  # CUDA's sum of K ≤ 32 is one warp's shuffle tree; DeepSeek-V3's K is 8
# the order of CUDA ``sum``'s intra-warp shuffles: "halving" (offsets L/2 … 1, since pytorch#164790) or "doubling"
# (1 … L/2, older torch). The GPU test measures which one the installed torch runs (the lead's: 2.11).
SUM_TREE = "halving"
SOFTMAX_WARP = 32  # lanes of CUDA's warp softmax
# the logits in the kernel (``route_hidden``): the input and weight dtypes it reads (fp32 accumulation of fp32
# products either way), the weight tile's size in elements and the launch's warps (8 warps × 32 lanes × 64 values:
# 32 KB of bf16 weight in flight a step of the D loop, 4 steps at bench_ref's D; sm_90: 74 registers, 165 with an
# fp32 weight, no spills; chosen, not yet timed on a GPU). Changing either changes the logits' summation order, for
# every call alike.
LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LOGITS_TILE = 16384
LOGITS_WARPS = 8
# no floating-point contraction: nothing here multiplies then adds today (so it changes no value), kept off as in the
# other kernels so that no later edit gets a product fused into a sum where eager rounds twice
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def interpreting() -> bool:
    """Triton's CPU interpreter is on (it must be set before triton is first imported): no libdevice there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_applies(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int, score_func: str, n_group: int = 1,
                   topk_group: int = 1) -> bool:
    """Whether ``route`` computes this call: Triton importable; no gradient needed (autograd off, or the logits do not
    require grad: the kernel has no backward); logits (T, E) fp32 with T ≥ 1, unit stride along E; the routing
    ``routing_applies``. Shapes, dtypes and flags only: no host sync."""
    if not HAS_TRITON or logits_TE.dim() != 2 or logits_TE.dtype != torch.float32 or logits_TE.stride(1) != 1:
        return False
    return not _needs_grad(logits_TE, bias_E) and routing_applies(*logits_TE.shape, logits_TE.device, bias_E, k,
                                                                  score_func, n_group, topk_group)


def logits_kernel_applies(x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None, k: int,
                          score_func: str, n_group: int = 1, topk_group: int = 1) -> bool:
    """Whether ``route_hidden`` computes this call: Triton importable; no gradient needed (of x, the weight or the
    bias); x (T, D) and weight (E, D) on one device, each bf16, fp16 or fp32 (``LOGIT_DTYPES``: an fp32 master
    weight is read as it is; fp64, the reference tests' dtype, takes the formula), unit stride along D, D ≥ 1; the
    routing ``routing_applies``. Shapes, dtypes and flags only: no host sync."""
    if (not HAS_TRITON or x_TD.dim() != 2 or weight_ED.dim() != 2 or x_TD.dtype not in LOGIT_DTYPES
            or weight_ED.dtype not in LOGIT_DTYPES or x_TD.shape[1] != weight_ED.shape[1] or x_TD.shape[1] == 0
            or x_TD.stride(1) != 1 or weight_ED.stride(1) != 1 or weight_ED.device != x_TD.device):
        return False
    return not _needs_grad(x_TD, weight_ED, bias_E) and routing_applies(
        x_TD.shape[0], weight_ED.shape[0], x_TD.device, bias_E, k, score_func, n_group, topk_group)


def routing_applies(T: int, E: int, device: torch.device, bias_E: torch.Tensor | None, k: int, score_func: str,
                    n_group: int, topk_group: int) -> bool:
    """The routing the kernel does: T ≥ 1, 1 ≤ E ≤ ``MAX_E``, 1 ≤ k ≤ min(E, ``MAX_K``); bias None or (E,) fp32 on
    ``device``; score_func in ``SCORE_FUNCS``; group-limited routing (``limits_groups``) only over a power-of-two E
    split evenly into groups, keeping enough experts for k."""
    if score_func not in SCORE_FUNCS or T == 0 or not 1 <= E <= MAX_E or not 1 <= k <= min(E, MAX_K):
        return False
    if limits_groups(n_group, topk_group) and (E & (E - 1) or E % n_group or topk_group * (E // n_group) < k):
        return False
    return bias_E is None or (tuple(bias_E.shape) == (E,) and bias_E.dtype == torch.float32
                              and bias_E.device == device)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """A gradient would flow through the call (the kernel has no backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def limits_groups(n_group: int, topk_group: int) -> bool:
    """Whether routing is group-limited (``moe.select_experts`` masks dropped groups only then)."""
    return n_group > 1 and topk_group < n_group


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int, score_func: str, norm_topk_prob: bool,
          route_scale: float, n_group: int = 1, topk_group: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx_TK int64, weight_TK fp32, scores_TE fp32): ``Router.forward``'s choices, gate weights and scores from its
    logits, in one launch (see ``kernel_applies`` for the inputs)."""
    T, E = logits_TE.shape
    return _launch(T, E, logits_TE, logits_TE.stride(0), None, None, bias_E, k, score_func, norm_topk_prob,
                   route_scale, n_group, topk_group)


def route_hidden(x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None, k: int, score_func: str,
                 norm_topk_prob: bool, route_scale: float, n_group: int = 1, topk_group: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx_TK int64, weight_TK fp32, scores_TE fp32, logits_TE fp32): the router from its input, logits included,
    in one launch (see ``logits_kernel_applies`` for the inputs); the logits are x · weight in fp32 summed in the
    order of ``_logits`` (the same for every token of every call), the rest ``route``'s of those logits."""
    T, E = x_TD.shape[0], weight_ED.shape[0]
    logits_TE = torch.empty((T, E), dtype=torch.float32, device=x_TD.device)
    return (*_launch(T, E, logits_TE, E, x_TD, weight_ED, bias_E, k, score_func, norm_topk_prob, route_scale, n_group,
                     topk_group), logits_TE)


def logits_block_d(E: int, D: int) -> int:
    """BLOCK_D of the logits' (BLOCK_E, BLOCK_D) weight tile: ``LOGITS_TILE`` elements (at least 16 columns, at most
    the row). A function of E and D only, never of T: it fixes the logits' summation order (batch invariance)."""
    return max(16, min(triton.next_power_of_2(D), LOGITS_TILE // triton.next_power_of_2(E)))


def _launch(T, E, logits_TE, logits_stride, x_TD, weight_ED, bias_E, k, score_func, norm_topk_prob, route_scale,
            n_group, topk_group):
    """The kernel over T tokens: it reads the logits (x_TD None) or writes them from x_TD · weight_EDᵀ."""
    if not HAS_TRITON:
        raise RuntimeError("the fused router needs triton, which is not importable here")
    dev = logits_TE.device
    idx_TK = torch.empty((T, k), dtype=torch.int64, device=dev)
    weight_TK = torch.empty((T, k), dtype=torch.float32, device=dev)
    scores_TE = torch.empty((T, E), dtype=torch.float32, device=dev)
    block_e, block_k = triton.next_power_of_2(E), triton.next_power_of_2(k)
    softmax_lanes = min(block_e, SOFTMAX_WARP)
    sum_lanes = last_pow2(k)
    groups = n_group if limits_groups(n_group, topk_group) else 1
    from_x = x_TD is not None
    D = x_TD.shape[1] if from_x else 1
    x_args = (x_TD, x_TD.stride(0), weight_ED, weight_ED.stride(0)) if from_x else (logits_TE, 0, logits_TE, 0)
    _router_kernel[(T,)](
        logits_TE, logits_stride, *x_args, bias_E if bias_E is not None else logits_TE, idx_TK, weight_TK, scores_TE,
        float(route_scale), E=E, K=k, BLOCK_E=block_e, BLOCK_K=block_k, SOFTMAX=score_func == "softmax",
        HAS_BIAS=bias_E is not None, NORM=bool(norm_topk_prob), GROUPS=groups, TOPK_GROUP=topk_group,
        SOFTMAX_LANES=softmax_lanes, SOFTMAX_LEVELS=softmax_lanes.bit_length() - 1,
        SUM_LANES=sum_lanes, SUM_LEVELS=sum_lanes.bit_length() - 1, HALVING=SUM_TREE == "halving",
        FROM_X=from_x, D=D, BLOCK_D=logits_block_d(E, D) if from_x else 16,
        INTERPRET=interpreting(), num_warps=LOGITS_WARPS if from_x else 1, **COMPILE_OPTIONS)
    return idx_TK, weight_TK, scores_TE


def last_pow2(n: int) -> int:
    """The largest power of two ≤ n (CUDA reduce's ``last_pow2``: the threads of one output's sum)."""
    return 1 << (n.bit_length() - 1)


if HAS_TRITON:

    @triton.jit
    def _exp(x, INTERPRET: tl.constexpr):
        """CUDA's ``expf`` (libdevice ``__nv_expf``) on the GPU; numpy's exp in the interpreter (no libdevice)."""
        if INTERPRET:
            return tl.exp(x)
        else:
            return libdevice.exp(x)

    @triton.jit
    def _ordered_sum(v_N, ITER: tl.constexpr, LANES: tl.constexpr, LEVELS: tl.constexpr, HALVING: tl.constexpr):
        """Σ v in the order of a CUDA warp reduction over LANES = 2^LEVELS lanes, N = ITER · LANES: lane l adds
        v[l], v[l + LANES], ... to 0 in turn, then the lanes combine in a shuffle tree, halving (l + LANES/2 into l,
        then LANES/4, ...) or doubling (l + 1 into l, then l + 2, ...). Each step is one fp32 addition; the
        reshapes and the sums of one non-zero term are exact."""
        v_IL = tl.reshape(v_N, (ITER, LANES))
        it_I1 = tl.arange(0, ITER)[:, None]
        acc_L = tl.zeros((LANES,), tl.float32)
        for it in tl.static_range(ITER):
            acc_L = acc_L + tl.sum(tl.where(it_I1 == it, v_IL, 0.0), axis=0)
        for level in tl.static_range(LEVELS):  # n = LANES >> (level + 1) lanes after this level
            if HALVING:  # lane l takes lane l + n: rows of a (2, n) view
                acc_L = tl.sum(tl.reshape(acc_L, (2, LANES >> (level + 1))), axis=0)
            else:  # lane 2l takes lane 2l + 1: pairs of a (n, 2) view
                acc_L = tl.sum(tl.reshape(acc_L, (LANES >> (level + 1), 2)), axis=1)
        return tl.sum(acc_L, axis=0)  # one lane left

    @triton.jit
    def _limit_groups(choice_E, G: tl.constexpr, S: tl.constexpr, TOPK_GROUP: tl.constexpr):
        """choice with the experts of all but the TOPK_GROUP best of G groups of S set to −inf; a group's score is
        the sum of its two largest choices (its largest twice if it holds it twice), ties to the lower group id."""
        c_GS = tl.reshape(choice_E, (G, S))
        first_G = tl.max(c_GS, axis=1)
        if S > 1:
            ties_G = tl.sum((c_GS == first_G[:, None]).to(tl.int32), axis=1)
            below_G = tl.max(tl.where(c_GS < first_G[:, None], c_GS, float("-inf")), axis=1)
            score_G = first_G + tl.where(ties_G > 1, first_G, below_G)
        else:
            score_G = first_G
        # a group's rank: the groups that beat it (a larger score, or an equal one and a lower id)
        g_G = tl.arange(0, G)
        other_GH, this_GH = score_G[None, :], score_G[:, None]
        beats_GH = (other_GH > this_GH) | ((other_GH == this_GH) & (g_G[None, :] < g_G[:, None]))
        keep_G = tl.sum(beats_GH.to(tl.int32), axis=1) < TOPK_GROUP
        keep_E = tl.reshape(tl.broadcast_to(keep_G[:, None], (G, S)), (G * S,))
        return tl.where(keep_E, choice_E, float("-inf"))

    @triton.jit
    def _logits(x_ptr, w_ptr, w_stride, e_E, valid_E, D: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_D: tl.constexpr):
        """x · w[e] for the E experts in fp32: each product in fp32 (exact for bf16 and fp16 operands), a block of
        BLOCK_D products summed by one ``tl.sum`` (a reduction tree that the tile's shape and the launch's warps fix),
        the block sums added to the total in ascending D order. Nothing here depends on the token's row or on how
        many tokens the launch has: every token's logits are summed in the same order (batch invariance)."""
        d_D = tl.arange(0, BLOCK_D)
        acc_E = tl.zeros((BLOCK_E,), tl.float32)
        w_ED = w_ptr + e_E[:, None].to(tl.int64) * w_stride + d_D[None, :]
        for d0 in range(0, D, BLOCK_D):
            valid_D = d0 + d_D < D
            x_D = tl.load(x_ptr + d0 + d_D, mask=valid_D, other=0.0).to(tl.float32)
            w = tl.load(w_ED + d0, mask=valid_E[:, None] & valid_D[None, :], other=0.0).to(tl.float32)
            acc_E = acc_E + tl.sum(w * x_D[None, :], axis=1)
        return acc_E

    @triton.jit
    def _router_kernel(logits_ptr, logits_stride, x_ptr, x_stride, w_ptr, w_stride, bias_ptr, idx_ptr, weight_ptr,
                       scores_ptr, route_scale, E: tl.constexpr, K: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                       GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, SOFTMAX_LANES: tl.constexpr,
                       SOFTMAX_LEVELS: tl.constexpr, SUM_LANES: tl.constexpr, SUM_LEVELS: tl.constexpr,
                       HALVING: tl.constexpr, FROM_X: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       INTERPRET: tl.constexpr):
        """One program per token: (FROM_X) its logits from x and the weight, stored; else its logits loaded; then
        the scores, the K best biased choices (largest first, ties to the lower id), their unbiased scores
        renormalised in CUDA ``sum``'s order, times route_scale."""
        row = tl.program_id(0).to(tl.int64)
        e_E = tl.arange(0, BLOCK_E)
        valid_E = e_E < E
        if FROM_X:
            x_E = _logits(x_ptr + row * x_stride, w_ptr, w_stride, e_E, valid_E, D, BLOCK_E, BLOCK_D)
            tl.store(logits_ptr + row * logits_stride + e_E, x_E, mask=valid_E)
            x_E = tl.where(valid_E, x_E, float("-inf"))
        else:
            x_E = tl.load(logits_ptr + row * logits_stride + e_E, mask=valid_E, other=float("-inf"))
        if SOFTMAX:
            ex_E = _exp(x_E - tl.max(x_E, axis=0), INTERPRET)  # padded lanes: exp(−inf) = 0
            total = _ordered_sum(ex_E, BLOCK_E // SOFTMAX_LANES, SOFTMAX_LANES, SOFTMAX_LEVELS, True)
            s_E = tl.math.div_rn(ex_E, tl.zeros_like(ex_E) + total)
        else:
            s_E = tl.math.div_rn(tl.full([BLOCK_E], 1.0, tl.float32), 1.0 + _exp(-x_E, INTERPRET))
        tl.store(scores_ptr + row * E + e_E, s_E, mask=valid_E)
        choice_E = s_E
        if HAS_BIAS:
            choice_E = s_E + tl.load(bias_ptr + e_E, mask=valid_E, other=0.0)
        # one int64 key a lane, ordered as (choice, −id): the fp32 bits made order-preserving as an int32 (negative
        # values' magnitude bits flipped) in the high word, BLOCK_E − 1 − id in the low; so one max picks the largest
        # choice and, among equal ones, the lowest id. NaN counts as +inf, −0 as +0 (they compare equal)
        choice_E = tl.where(choice_E != choice_E, float("inf"), tl.where(choice_E == 0.0, 0.0, choice_E))
        if GROUPS > 1:  # E a power of two here: no padded lanes
            choice_E = _limit_groups(choice_E, GROUPS, BLOCK_E // GROUPS, TOPK_GROUP)
        bits_E = choice_E.to(tl.int32, bitcast=True)
        ordered_E = bits_E ^ ((bits_E >> 31) & 0x7FFFFFFF)
        key_E = (ordered_E.to(tl.int64) << 32) | (BLOCK_E - 1 - e_E).to(tl.int64)
        taken = -9223372036854775807 - 1  # below every key: padded and picked lanes
        key_E = tl.where(valid_E, key_E, taken)
        k_K = tl.arange(0, BLOCK_K)
        idx_K = tl.zeros((BLOCK_K,), tl.int64)
        for j in tl.static_range(K):  # K dependent reductions: the rest works on all K columns at once
            pick = BLOCK_E - 1 - (tl.max(key_E, axis=0) & 0xFFFFFFFF)
            key_E = tl.where(e_E == pick, taken, key_E)
            idx_K = tl.where(k_K == j, pick, idx_K)
        # the unbiased scores of the picks (sums of one non-zero term: exact); padded columns 0 (they join the sum)
        hit_KE = (e_E[None, :] == idx_K[:, None]) & (k_K < K)[:, None]
        w_K = tl.sum(tl.where(hit_KE, s_E[None, :], 0.0), axis=1)
        if NORM:
            total_w = _ordered_sum(w_K, BLOCK_K // SUM_LANES, SUM_LANES, SUM_LEVELS, HALVING) + 1e-20
            w_K = tl.math.div_rn(w_K, tl.zeros_like(w_K) + total_w)
        w_K = w_K * route_scale
        mask_K = k_K < K
        tl.store(idx_ptr + row * K + k_K, idx_K, mask=mask_K)
        tl.store(weight_ptr + row * K + k_K, w_K, mask=mask_K)
