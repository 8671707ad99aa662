"""The MoE router after its logits GEMV (scores, biased top-k, gate weights) as one Triton launch (inference only).

Why: a serving decode step at batch 1 is launch-bound (issue 13: ~1.7 µs a kernel, replayed as a CUDA graph but not
compiled). After the router's fp32 logits (``Router.logits``: casts and a cuBLAS GEMV, kept as they are, so the
logits are the formula's bit for bit), eager ``Router.forward`` launches 9 kernels a MoE layer with sigmoid scores
and the balancing bias (8 without it): sigmoid, add bias, topk (two: gatherTopK's select and a bitonic sort of the
k), gather, sum, add 1e-20, div, mul by route_scale. How counted: ``torch.profiler`` lists the top-level aten ops of
an eager call after ``aten::linear`` as sigmoid, detach (a view, no kernel), add, topk, gather, sum, add, div, mul
(tests/test_router_kernel.py ``test_eager_router_op_count`` pins that list, and that with the kernel on nothing but
its entry is left); on CUDA each is one kernel except topk, two. Fused: 1 launch a layer, so 9 → 1 (bench_ref's 7
MoE layers: 63 → 7 launches a decode step; benchmarks/profile_decode.py's ``graph`` vs ``graph+router`` rows should
differ by 56 kernels a step).

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
(the fp64 reference tests).

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
# no floating-point contraction: nothing here multiplies then adds today (so it changes no value), kept off as in the
# other kernels so that no later edit gets a product fused into a sum where eager rounds twice
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def interpreting() -> bool:
    """Triton's CPU interpreter is on (it must be set before triton is first imported): no libdevice there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_applies(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int, score_func: str, n_group: int = 1,
                   topk_group: int = 1) -> bool:
    """Whether ``route`` computes this call: Triton importable; no gradient needed (autograd off, or the logits do not
    require grad: the kernel has no backward); logits (T, E) fp32 with T ≥ 1, 1 ≤ E ≤ ``MAX_E``, unit stride along E;
    1 ≤ k ≤ min(E, ``MAX_K``); bias None or (E,) fp32 on the logits' device; score_func in ``SCORE_FUNCS``;
    group-limited routing (``limits_groups``) only over a power-of-two E split evenly into groups, keeping enough
    experts for k. Shapes, dtypes and flags only: no host sync."""
    if not HAS_TRITON or logits_TE.dim() != 2 or logits_TE.dtype != torch.float32 or score_func not in SCORE_FUNCS:
        return False
    tensors = (logits_TE,) if bias_E is None else (logits_TE, bias_E)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    T, E = logits_TE.shape
    if T == 0 or not 1 <= E <= MAX_E or not 1 <= k <= min(E, MAX_K) or logits_TE.stride(1) != 1:
        return False
    if limits_groups(n_group, topk_group) and (E & (E - 1) or E % n_group or topk_group * (E // n_group) < k):
        return False
    return bias_E is None or (tuple(bias_E.shape) == (E,) and bias_E.dtype == torch.float32
                              and bias_E.device == logits_TE.device)


def limits_groups(n_group: int, topk_group: int) -> bool:
    """Whether routing is group-limited (``moe.select_experts`` masks dropped groups only then)."""
    return n_group > 1 and topk_group < n_group


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int, score_func: str, norm_topk_prob: bool,
          route_scale: float, n_group: int = 1, topk_group: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx_TK int64, weight_TK fp32, scores_TE fp32): ``Router.forward``'s choices, gate weights and scores from its
    logits, in one launch (see ``kernel_applies`` for the inputs)."""
    if not HAS_TRITON:
        raise RuntimeError("the fused router needs triton, which is not importable here")
    T, E = logits_TE.shape
    dev = logits_TE.device
    idx_TK = torch.empty((T, k), dtype=torch.int64, device=dev)
    weight_TK = torch.empty((T, k), dtype=torch.float32, device=dev)
    scores_TE = torch.empty((T, E), dtype=torch.float32, device=dev)
    block_e, block_k = triton.next_power_of_2(E), triton.next_power_of_2(k)
    softmax_lanes = min(block_e, SOFTMAX_WARP)
    sum_lanes = last_pow2(k)
    groups = n_group if limits_groups(n_group, topk_group) else 1
    _router_kernel[(T,)](
        logits_TE, logits_TE.stride(0), bias_E if bias_E is not None else logits_TE, idx_TK, weight_TK, scores_TE,
        float(route_scale), E=E, K=k, BLOCK_E=block_e, BLOCK_K=block_k, SOFTMAX=score_func == "softmax",
        HAS_BIAS=bias_E is not None, NORM=bool(norm_topk_prob), GROUPS=groups, TOPK_GROUP=topk_group,
        SOFTMAX_LANES=softmax_lanes, SOFTMAX_LEVELS=softmax_lanes.bit_length() - 1,
        SUM_LANES=sum_lanes, SUM_LEVELS=sum_lanes.bit_length() - 1, HALVING=SUM_TREE == "halving",
        INTERPRET=interpreting(), num_warps=1, **COMPILE_OPTIONS)
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
    def _router_kernel(logits_ptr, logits_stride, bias_ptr, idx_ptr, weight_ptr, scores_ptr, route_scale,
                       E: tl.constexpr, K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                       SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GROUPS: tl.constexpr,
                       TOPK_GROUP: tl.constexpr, SOFTMAX_LANES: tl.constexpr, SOFTMAX_LEVELS: tl.constexpr,
                       SUM_LANES: tl.constexpr, SUM_LEVELS: tl.constexpr, HALVING: tl.constexpr,
                       INTERPRET: tl.constexpr):
        """One program per token: scores, the K best biased choices (largest first, ties to the lower id), their
        unbiased scores renormalised in CUDA ``sum``'s order, times route_scale."""
        row = tl.program_id(0).to(tl.int64)
        e_E = tl.arange(0, BLOCK_E)
        valid_E = e_E < E
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
