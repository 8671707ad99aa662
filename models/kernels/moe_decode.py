"""Fused routed experts for decode-sized calls: Triton kernels per MoE layer, no sort kernel, no grouped GEMM.

Why: at batch 1 a ``bench_ref`` decode step is kernel-bound. Profiled on an H100 (compiled + CUDA graph,
issue 13) the routed experts' two ``torch._grouped_mm`` per layer took 11 us each for 6 used experts out
of 64 (the 6 experts' weights are ~19 MB a layer, ~6 us at 3 TB/s), plus ``prepare_grouped_gemm_data``
and ~10 small kernels a layer (argsort, inverse permutation, counts, cumsum, gathers, SwiGLU, combine).
When the T·K routed slots are fewer than the E experts nothing is gained by grouping rows per expert, so
each slot reads its own expert's rows directly:

(a) ``_gate_up_swiglu_kernel``, grid (slots N = T·K, F blocks): for slot n = t·K + k with e = idx[t, k],
    h[n, f] = silu(x[t] · Wg[e, f]) · (x[t] · Wu[e, f]); one program loads the gate AND the up rows of
    its F block (``gate_up_proj`` (E, 2F, D): rows [0, F) gate, [F, 2F) up), fp32 accumulation.
(b) ``_down_combine_kernel``, grid (tokens T, D blocks): y[t, d] = Σ_k w[t, k] · (down[e_k, d] · h[t·K+k]),
    the K slots summed inside the program in a fixed order (deterministic, no atomics), fp32 accumulation.

The shared expert folds in (``DeepSeekMoE.fused_shared``; ``shared_fold_weights`` says when): SwiGLU is separable
along its width, so a shared expert of width H = S·F is S more slots a token of the routed experts' width F, each
of gate weight 1 (exactly: no router weight to round). Token t's slots are n = t·(K + S) + j, routed for j < K,
shared slot j − K after them: (a) takes a shared slot's rows from the shared gate_proj/up_proj weights (a scalar
branch on the program id picks the base pointers, no copy of any weight), and (b) adds the S shared slots as the
one down GEMM of width S·F they are (their h rows are adjacent; down_proj's columns). A decode-sized MoE layer's
whole FFN is then these two launches, where the shared SwiGLU and the add took 6 more (3 GEMVs, silu, mul, add). The
expert-major kernels fold it in likewise (below).

Rounding: where ``RoutedExperts``' grouped path rounds, as the compiled decode step runs it. Gate and up
are rounded to the compute dtype (the grouped GEMM's output); silu(gate)·up is taken in fp32 and rounded
once (inductor's fused pointwise kernel; eager rounds silu(gate) to bf16 first); each slot's down output
is rounded (the GEMM's output), and so is the gate weight (``weight_TK.to(bf16)``); the weighted sum over
K is taken in fp32 and rounded once (inductor's reduction; eager rounds each product to bf16 before its
fp32 sum). What differs from the compiled grouped path is only the order of the fp32 sums inside each dot
product (cuBLAS's vs these tiles'); from eager, the two extra roundings named above. The rounding is
round-to-nearest-even done on the bits (``rounded``, from triton_rounding.py), so Triton's CPU interpreter,
which truncates, gives the GPU's values and the tests can check them. tests/test_moe_decode_kernel.py measures
the error against float64: the same as the reference path's, or lower. The folded shared expert rounds where
the formula (``shared_experts(x)``) does, compiled: gate, up, silu·up once, its down GEMM's output (one GEMM over
all S·F, as the formula's), but that output then joins the routed terms' fp32 sum and the total is rounded once,
where the formula rounds the routed sum, then routed + shared (one rounding fewer; tests/test_shared_fold.py:
no farther from float64 than the formula).

Registered with ``torch.library.triton_op`` so ``torch.compile`` sees (and inlines) the kernels and a
CUDA graph captures them; an explicit fake kernel gives compile the output's shape. No host
synchronisation: every size comes from tensor shapes. No autograd formula: the dispatch
(``decide_fused_decode``) takes this path only when no gradient is needed.

Read volume: a slot reads its expert's rows, so experts shared by several tokens of one call are read
once per slot (from L2 when the programs overlap), where the grouped path reads each used expert once.
At one token the two read the same 6 experts; at bench_ref's 10 tokens the 60 slots hit ~40 distinct
experts on random routing (1.5x the grouped path's bytes): benchmarks/bench_moe_decode.py shows where
the crossover lies (measured: ``uses_expert_major``).

Expert-major (``routed_experts_decode_by_expert``), for T·K > 3·E (bench_ref from 33 tokens; the slot-major
kernels would read an expert once per slot routed to it, ~6x the bytes at 64 tokens). At batch 32 the grouped
path read the 64 experts' weights at 2.24 TB/s (629 us of a 1.41 ms compiled step on an H100, issue 13), with
the sort, the permutations and ``prepare_grouped_gemm_data`` around it. Here the slots are grouped by expert
(``expert_major_routing``: ``stable_expert_order``'s order and each expert's end in it, no sort kernel under
compile, no host sync) and
(a) ``_expert_gate_up_swiglu_kernel``, grid (E, F blocks): a program loads its expert's gate AND up rows of
    its F block once and multiplies them with the gathered rows x[t] of up to ``block_s`` of the expert's
    slots at a time (tl.dot: tensor cores, fp32 accumulation); an expert without slots loads nothing; h of
    the expert's slots goes to their rows of the expert-sorted list;
(b) ``_expert_down_kernel``, grid (E, D blocks): likewise with the down rows, writing each slot's rounded
    output y[n] at its own row n = t·K + k;
(c) ``_combine_kernel``, grid (T, D blocks): Σ_k rounded(w[t, k]) · y[t·K + k] in fp32, k in order, rounded
    once: the slot-major down kernel's sum term for term.
The rounding points are the slot-major kernels' (the same ``rounded`` calls), so the two differ only in the
order of the fp32 sums inside each dot product.

The shared expert folds in here too (where ``shared_fold_weights`` gives its weights, as for slot-major): it is one
more "expert" holding all T tokens, in program rows after the E experts' (one tile of ``block_s`` tokens a row, so
no program loops over all T alone; the row is picked by a scalar branch on the program id, one tile helper per
kernel computing routed and shared tiles alike). (a) takes S·ceil(T / block_s) more rows, (slice j of width F,
token tile), reading rows j·F + f of the shared gate_proj/up_proj weights into h rows T·K + t·S + j, so token t's S
shared rows lie adjacent; (b) takes ceil(T / block_s) more, each the shared down GEMM of width S·F over those rows
(one GEMM, as the formula's), its rounded output at y row T·K + t; (c) adds that row after the K routed terms with
weight 1 (no router weight to round) and rounds the total once. The rounding points and the sum are the slot-major
fold's term for term (see Rounding above), so the two folds again differ only in the order of the fp32 sums inside
each dot product. Why fold at expert-major sizes (bench_ref: from 33 tokens; 32 if the crossover moves), where the
layer is not launch-bound the way batch 1 is: the shared module is still 5 more launches a MoE layer (3 GEMMs,
silu·mul, the add) for ~3 MB of weights (bench_ref), and a captured decode step pays each launch's gap. Without a
shared expert (S = 0, a constexpr) the shared branches are not compiled and the grids have E rows: the unfolded op's
kernels as before (sm_90: the same registers, shared memory and pipelined copies).

Triton is an optional accelerator: ``moeflow`` imports and runs without it (``HAS_TRITON`` is False and
the dispatch never picks this path); ``models/moe.py`` imports this module only on CUDA or when forced.
On a CPU, set ``TRITON_INTERPRET=1`` before this module is imported to run the kernels in Triton's
interpreter (the tests do).

Shape suffixes (as in models/moe.py): T tokens, D hidden, E experts, K experts per token, N = T·K routed
slots, F expert width, H = S·F the shared expert's width (S shared slots a token).
"""

import os
from functools import partial

import torch

from ..expert_order import stable_expert_order

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency: the dispatch below then never picks the fused path
    triton = tl = None

HAS_TRITON = triton is not None


# Where auto takes which kernels, from the crossovers measured on an H100 (bench_ref: E = 64, top-6, D 1024, F 512;
# benchmarks/bench_moe_decode.py, CUDA-graph rows, RESULTS.md "Fused routed experts: where each kernel pays"):
#   tokens           8      16      32      64
#   grouped, ms    0.115   0.138   0.169   0.171
#   slot-major     0.051   0.078   0.117   0.198
#   expert-major     -     0.092   0.120   0.123
# Slot-major reads an expert once per slot routed to it, so it loses once experts take several slots each; it
# still wins at 32 tokens (3 slots an expert on average), expert-major from there on. Past 64 tokens (6 slots an
# expert) nothing was measured, and with many rows per expert the grouped GEMM's larger tiles should pay: auto
# leaves those calls to it (prefill chunks are far larger).
SLOT_MAJOR_MAX_SLOTS_PER_EXPERT = 3
FUSED_DECODE_MAX_SLOTS_PER_EXPERT = 6


def decide_fused_decode(*, is_cuda: bool, compute_dtype: torch.dtype, weight_dtypes: tuple[torch.dtype, ...],
                        num_slots: int, num_experts: int, needs_grad: bool, fp8: bool, has_triton: bool) -> bool:
    """The auto rule of ``RoutedExperts.fused_decode``: shapes, dtypes and devices only (never a host sync,
    so it holds for a whole compiled bucket / captured graph).

    CUDA; bf16 compute with bf16 weights (the kernels read the stored stacks: fp32 master weights under
    autocast stay on the grouped path, which casts them); fewer routed slots than experts (the slot-major
    kernels up to ``SLOT_MAJOR_MAX_SLOTS_PER_EXPERT`` slots an expert, the expert-major ones above, see
    ``uses_expert_major``) up to ``FUSED_DECODE_MAX_SLOTS_PER_EXPERT`` slots an expert on average (bench_ref's
    64 experts, top-6: up to 64 tokens); no gradient
    needed (the ops have no backward); not the fp8 path (its GEMMs round the operands to fp8: keep what was
    asked for); Triton importable.
    """
    return (is_cuda and compute_dtype == torch.bfloat16 and all(d == torch.bfloat16 for d in weight_dtypes)
            and num_slots <= FUSED_DECODE_MAX_SLOTS_PER_EXPERT * num_experts
            and not needs_grad and not fp8 and has_triton)


def uses_expert_major(num_slots: int, num_experts: int) -> bool:
    """Which fused kernels a call takes: slot-major (each slot reads its expert's rows) up to
    ``SLOT_MAJOR_MAX_SLOTS_PER_EXPERT`` slots an expert on average, expert-major (each expert's rows read once
    for all its slots) above (the measured crossover, see the table above)."""
    return num_slots > SLOT_MAJOR_MAX_SLOTS_PER_EXPERT * num_experts


def fused_decode_inputs(experts, x_TD: torch.Tensor, idx_TK: torch.Tensor, gate_up_E2FD: torch.Tensor,
                        down_EDF: torch.Tensor) -> dict:
    """The arguments of ``decide_fused_decode`` for a call of ``experts`` (a ``RoutedExperts``) on stacks its
    caller read once (LoRA's parametrization computes ``experts.gate_up_proj`` anew on every read)."""
    tensors = (x_TD, gate_up_E2FD, down_EDF)
    return dict(is_cuda=x_TD.is_cuda, compute_dtype=experts.compute_dtype(x_TD),
                weight_dtypes=(gate_up_E2FD.dtype, down_EDF.dtype),
                num_slots=idx_TK.numel(), num_experts=experts.num_experts,
                needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in tensors),
                fp8=experts.fp8_grad_dtype is not None, has_triton=HAS_TRITON)


def fused_decode_applies(experts, x_TD: torch.Tensor, idx_TK: torch.Tensor, gate_up_E2FD: torch.Tensor,
                         down_EDF: torch.Tensor) -> bool:
    """``experts.fused_decode`` if set, else ``decide_fused_decode`` on this call's tensors."""
    if experts.fused_decode is not None:
        return experts.fused_decode
    return decide_fused_decode(**fused_decode_inputs(experts, x_TD, idx_TK, gate_up_E2FD, down_EDF))


def fused_routed_experts(experts, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor,
                         gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor, shared=None) -> torch.Tensor:
    """Σ_k weight[t, k] · expert_{idx[t, k]}(x[t]) by the fused kernels (slot- or expert-major:
    ``uses_expert_major``), in ``experts``' compute dtype; plus ``shared(x)`` when ``shared`` (the MoE's shared
    expert, a SwiGLU) is given: inside either kernels where it folds (``shared_fold_weights``), else added as its
    own module's output."""
    if not HAS_TRITON:
        raise RuntimeError("RoutedExperts.fused_decode=True needs triton, which is not importable here")
    dtype = experts.compute_dtype(x_TD)
    args = (x_TD.to(dtype), idx_TK, weight_TK, gate_up_E2FD.to(dtype), down_EDF.to(dtype))
    folded = None if shared is None else shared_fold_weights(shared, experts.width, dtype)
    if uses_expert_major(idx_TK.numel(), experts.num_experts):
        decode = partial(expert_major_decode, fused_order=experts.fused_decode_order)
    else:
        decode = routed_experts_decode
    if folded is not None:
        return decode(*args, *folded)
    y_TD = decode(*args)
    return y_TD if shared is None else y_TD + shared(x_TD)


def shared_fold_weights(shared, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...] | None:
    """(gate (H, D), up (H, D), down (D, H)) of a shared expert the fused kernels (slot- and expert-major) can take
    as S = H / width slots of the routed experts' width, each read once (a parametrization computes the weight per
    read), else None: ``shared`` must be a plain ``SwiGLU`` of bias-free linears computing ``F.linear`` with their
    weight (so not LoRALinear, Fp8Linear, Int8Linear: they compute something else), of a width that is a multiple of
    ``width`` (DeepSeekMoE builds it num_shared × moe_intermediate_size wide: every preset folds), with weights
    already in the compute ``dtype`` (no cast kernels) and no gradient wanted of them (the op has no backward)."""
    from ..layers import SwiGLU

    if type(shared) is not SwiGLU:
        return None
    linears = (shared.gate_proj, shared.up_proj, shared.down_proj)
    if not all(isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward and m.bias is None
               for m in linears):
        return None
    weights = tuple(m.weight for m in linears)
    H = weights[0].shape[0]
    if H % width or any(w.dtype != dtype for w in weights) or (
            torch.is_grad_enabled() and any(w.requires_grad for w in weights)):
        return None
    return weights


def expert_major_routing(idx_TK: torch.Tensor, num_experts: int,
                         fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_N, ends_E): the slots n = t·K + k grouped by expert (stably), and the end of each expert's run
    in that list (int32; expert e's slots are order_N[ends_E[e-1] : ends_E[e]]). No sort kernel under
    torch.compile (``stable_expert_order``'s comparison count; argsort eagerly) and no bincount (data-dependent
    size): the ends are one comparison-and-count over (E, N), which inductor fuses into one kernel. ``fused``
    (``RoutedExperts.fused_decode_order``): outside torch.compile, ``fused_expert_order``'s one launch instead."""
    if fused and not torch.compiler.is_compiling() and HAS_TRITON:
        return fused_expert_order(idx_TK, num_experts)
    flat_N = idx_TK.reshape(-1)
    order_N, _ = stable_expert_order(flat_N)
    expert_E1 = torch.arange(num_experts, device=flat_N.device)[:, None]
    return order_N, (flat_N[None, :] <= expert_E1).sum(dim=1, dtype=torch.int32)


def fused_expert_order(idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``expert_major_routing``'s (order_N int64, ends_E int32), the same integers, in one Triton launch: one
    program ranks every slot by counting (``stable_expert_order``'s comparison, (e_m, m) < (e_n, n), in chunks of
    slots) and scatters it to its rank; the ends are the count of slots with an expert id ≤ e. For decode sizes
    (the expert-major kernels take up to 6·E slots): the (N × chunk) comparison tiles of one program."""
    flat_N = idx_TK.reshape(-1).contiguous()
    N = flat_N.numel()
    order_N = torch.empty(N, dtype=torch.int64, device=flat_N.device)
    ends_E = torch.empty(num_experts, dtype=torch.int32, device=flat_N.device)
    block_n = max(16, triton.next_power_of_2(N))
    block_e = max(16, triton.next_power_of_2(num_experts))
    # ≤ 4,096 comparisons a tile (16 a thread at 8 warps): ptxas (sm_90) gives 95 registers at 512 slots, no spills
    # (16k a tile took all 255 at 4 warps); one program, so its registers cost no occupancy, only its latency
    chunk = max(1, min(64, 4096 // max(block_n, block_e)))
    _expert_order_kernel[(1,)](flat_N, order_N, ends_E, N, num_experts, BLOCK_N=block_n, BLOCK_E=block_e,
                               CHUNK=chunk, num_warps=8)
    return order_N, ends_E


def expert_major_decode(x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor,
                        gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor, *shared_weights: torch.Tensor,
                        fused_order: bool = False, **blocks) -> torch.Tensor:
    """The expert-major kernels on (T, K) routing: ``expert_major_routing`` (``fused_order``: its one-launch
    form), then the op (with the shared expert's three weights where given: ``shared_fold_weights``' (gate, up,
    down))."""
    order_N, ends_E = expert_major_routing(idx_TK, down_EDF.shape[0], fused=fused_order)
    return routed_experts_decode_by_expert(x_TD, order_N, ends_E, weight_TK, gate_up_E2FD, down_EDF, *shared_weights,
                                           **blocks)


if HAS_TRITON:

    # bf16 rounding by bits: Triton's interpreter (the CPU tests) truncates a plain ``.to(tl.bfloat16)``
    from .triton_rounding import fp32_dot, rounded  # their own names (inductor re-emits helpers by name)

    @triton.jit
    def _expert_order_kernel(idx_ptr, order_ptr, ends_ptr, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                             CHUNK: tl.constexpr):
        """One program: order[rank(n)] = n with rank(n) = #{m : (e_m, m) < (e_n, n)} (a stable sort by expert id),
        ends[e] = #{m : e_m ≤ e}. Slots past N read expert id E (after every real one): they rank no real slot
        and count in no end, and are not stored."""
        n_N = tl.arange(0, BLOCK_N)
        live_N = n_N < N
        e_N = tl.load(idx_ptr + n_N, mask=live_N, other=E)
        e_E = tl.arange(0, BLOCK_E)
        rank_N = tl.zeros((BLOCK_N,), dtype=tl.int32)
        ends_E = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for m0 in range(0, BLOCK_N, CHUNK):  # constexpr bounds (the interpreter takes no range from runtime values)
            m_M = m0 + tl.arange(0, CHUNK)
            e_M = tl.load(idx_ptr + m_M, mask=m_M < N, other=E)
            before_NM = (e_M[None, :] < e_N[:, None]) | ((e_M[None, :] == e_N[:, None]) & (m_M[None, :] < n_N[:, None]))
            rank_N += tl.sum(before_NM.to(tl.int32), axis=1)
            ends_E += tl.sum((e_M[None, :] <= e_E[:, None]).to(tl.int32), axis=1)
        tl.store(order_ptr + rank_N, n_N.to(tl.int64), mask=live_N)
        tl.store(ends_ptr + e_E, ends_E, mask=e_E < E)

    @triton.jit
    def _gate_up_swiglu_kernel(x_ptr, idx_ptr, w_ptr, sg_ptr, su_ptr, h_ptr, K: tl.constexpr, S: tl.constexpr,
                               D: tl.constexpr, F: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
        n = tl.program_id(0)  # slot n = t·(K + S) + j: routed (expert idx[t, j]) for j < K, shared slot j − K after
        t = n // (K + S)
        j = n % (K + S)
        f_F = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_F = f_F < F
        # scalar bases chosen by the branch, the same row offsets after it (offsets computed in the branches took
        # 124 registers a thread on sm_90 against 62 so: the gate and up pointer tiles no longer shared them)
        if j < K:
            e = tl.load(idx_ptr + t * K + j).to(tl.int64)
            gate_base = w_ptr + e * (2 * F * D)  # expert e's gate half
            up_base = gate_base + F * D          # its up half
        else:  # the shared expert's rows (j − K)·F + f of its own gate_proj and up_proj weights (S·F, D)
            gate_base = sg_ptr + (j - K) * (F * D)
            up_base = su_ptr + (j - K) * (F * D)
        gate_FD = gate_base + f_F[:, None] * D  # rows f of the slot's gate
        up_FD = up_base + f_F[:, None] * D      # and their up twins
        acc_gate_F = tl.zeros((BLOCK_F,), dtype=tl.float32)
        acc_up_F = tl.zeros((BLOCK_F,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_D = d0 + tl.arange(0, BLOCK_D)
            mask_D = d_D < D
            x_D = tl.load(x_ptr + t * D + d_D, mask=mask_D, other=0.0).to(tl.float32)
            mask_FD = mask_F[:, None] & mask_D[None, :]
            wg_FD = tl.load(gate_FD + d_D[None, :], mask=mask_FD, other=0.0).to(tl.float32)
            wu_FD = tl.load(up_FD + d_D[None, :], mask=mask_FD, other=0.0).to(tl.float32)
            acc_gate_F += tl.sum(wg_FD * x_D[None, :], axis=1)
            acc_up_F += tl.sum(wu_FD * x_D[None, :], axis=1)
        out_ty = h_ptr.dtype.element_ty
        gate_F = rounded(acc_gate_F, out_ty)  # the grouped GEMM's rounded output
        up_F = rounded(acc_up_F, out_ty)
        h_F = gate_F * tl.sigmoid(gate_F) * up_F
        tl.store(h_ptr + n * F + f_F, rounded(h_F, out_ty).to(out_ty), mask=mask_F)

    @triton.jit
    def _rows_dot(rows_DF, h_ptr, mask_D, WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
        """Σ_f rows[d, f] · h[f] over f < WIDTH in fp32: one slot's down GEMM for a block of output rows."""
        acc_D = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for f0 in range(0, WIDTH, BLOCK_F):
            f_F = f0 + tl.arange(0, BLOCK_F)
            mask_F = f_F < WIDTH
            h_F = tl.load(h_ptr + f_F, mask=mask_F, other=0.0).to(tl.float32)
            w_DF = tl.load(rows_DF + f_F[None, :], mask=mask_D[:, None] & mask_F[None, :], other=0.0).to(tl.float32)
            acc_D += tl.sum(w_DF * h_F[None, :], axis=1)
        return acc_D

    @triton.jit
    def _down_combine_kernel(h_ptr, idx_ptr, gw_ptr, w_ptr, sd_ptr, y_ptr, K: tl.constexpr, S: tl.constexpr,
                             D: tl.constexpr, F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
        t = tl.program_id(0)
        d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_D = d_D < D
        out_ty = y_ptr.dtype.element_ty
        h_t = h_ptr + t * (K + S) * F  # token t's K routed then S shared slots of h, F values each
        y_D = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k in tl.static_range(K):  # unrolled: the K experts' loads are independent
            e = tl.load(idx_ptr + t * K + k).to(tl.int64)
            gw = rounded(tl.load(gw_ptr + t * K + k).to(tl.float32), out_ty)  # weight_TK.to(compute dtype)
            acc_D = _rows_dot(w_ptr + e * (D * F) + d_D[:, None] * F, h_t + k * F, mask_D, F, BLOCK_D, BLOCK_F)
            y_D += rounded(acc_D, out_ty) * gw  # the slot's rounded GEMM output × its gate weight
        if S > 0:  # the S shared slots as the one down GEMM of width S·F they are (adjacent in h), weight 1
            acc_D = _rows_dot(sd_ptr + d_D[:, None] * (S * F), h_t + K * F, mask_D, S * F, BLOCK_D, BLOCK_F)
            y_D += rounded(acc_D, out_ty)  # shared_experts(x): its down GEMM's rounded output
        tl.store(y_ptr + t * D + d_D, rounded(y_D, out_ty).to(out_ty), mask=mask_D)

    @torch.library.triton_op("moeflow::routed_experts_decode", mutates_args=())
    def routed_experts_decode(x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor,
                              gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor,
                              shared_gate_HD: torch.Tensor | None = None, shared_up_HD: torch.Tensor | None = None,
                              shared_down_DH: torch.Tensor | None = None, gate_up_block_f: int = 16,
                              gate_up_block_d: int = 1024, down_block_d: int = 8, down_block_f: int = 512,
                              num_warps: int = 4) -> torch.Tensor:
        """(T, D) in x's dtype: the routed experts' weighted sum, plus the shared expert's output where its three
        weights are given (H = S·F, S shared slots a token; the three or none). Block sizes are powers of two
        (any D, F: the kernels mask the tails). The defaults, for bench_ref on sm_90 (ptxas: 60 registers, no
        spills, 16-byte loads): one gate_up program loads its 16 gate + 16 up rows of D = 1024 in one go (64 KB in
        flight; 192 programs for 6 slots, 224 with the shared one), one down program 8 rows × F of each of its K
        experts (the K loop unrolled: 48 KB in flight; 128 programs for one token). benchmarks/bench_moe_decode.py
        --sweep times others."""
        T, K = idx_TK.shape
        E, D, F = down_EDF.shape
        S = 0 if shared_down_DH is None else shared_down_DH.shape[1] // F
        x_TD, idx_TK, weight_TK = x_TD.contiguous(), idx_TK.contiguous(), weight_TK.contiguous()
        gate_up_E2FD, down_EDF = gate_up_E2FD.contiguous(), down_EDF.contiguous()
        # without a shared expert the kernels never read these pointers (S = 0): any tensor of the dtype will do
        shared = (down_EDF,) * 3 if S == 0 else tuple(w.contiguous() for w in (shared_gate_HD, shared_up_HD,
                                                                               shared_down_DH))
        h_NF = x_TD.new_empty(T * (K + S), F)
        y_TD = x_TD.new_empty(T, D)
        torch.library.wrap_triton(_gate_up_swiglu_kernel)[(T * (K + S), triton.cdiv(F, gate_up_block_f))](
            x_TD, idx_TK, gate_up_E2FD, shared[0], shared[1], h_NF, K, S, D, F, BLOCK_F=gate_up_block_f,
            BLOCK_D=gate_up_block_d, num_warps=num_warps)
        torch.library.wrap_triton(_down_combine_kernel)[(T, triton.cdiv(D, down_block_d))](
            h_NF, idx_TK, weight_TK, down_EDF, shared[2], y_TD, K, S, D, F, BLOCK_D=down_block_d,
            BLOCK_F=min(down_block_f, triton.next_power_of_2(F)), num_warps=num_warps)
        return y_TD

    @routed_experts_decode.register_fake
    def _routed_experts_decode_fake(x_TD, idx_TK, weight_TK, gate_up_E2FD, down_EDF, *shared_and_blocks,
                                    **named):
        # Shapes only. triton_op would use the body itself (make_fx-traceable on a GPU); this one also traces
        # where the kernels are Triton-interpreted (TRITON_INTERPRET=1, CPU tests), which fake tensors cannot run.
        return x_TD.new_empty(idx_TK.shape[0], down_EDF.shape[1])

    # Expert-major: T·K > 3·E (decode at batch ≥ 33 for bench_ref). One program per (expert, block of rows)
    # loads its rows once for all the slots routed to that expert (up to ``block_s`` a tile) and multiplies
    # them with tl.dot (tensor cores in bf16, fp32 accumulation): the weights of all E experts are read once a
    # call, the activations (T·K rows of D or F) come again per row block, from L2. A folded shared expert (S > 0)
    # takes the program rows after the E experts' (``_shared_rows``): one more "expert" holding every token, a tile
    # of ``block_s`` tokens a row, so its weights are read once per tile (from L2 after the first) and no program
    # loops over all T tokens alone.

    @triton.jit
    def _expert_run(ends_ptr, e):
        """[start, end) of expert e's slots in the expert-sorted slot list."""
        start = tl.where(e > 0, tl.load(ends_ptr + tl.maximum(e - 1, 0)), 0)
        return start, tl.load(ends_ptr + e)

    @triton.jit
    def _swiglu_tile(gate_FD, up_FD, mask_F, x_ptr, t_S, mask_S, D: tl.constexpr, BLOCK_F: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, IEEE: tl.constexpr, out_ty: tl.constexpr):
        """silu(gate · x[t]) · (up · x[t]) of a tile, (BLOCK_F, BLOCK_S) in fp32 holding out_ty values: rows f
        (gate_FD, up_FD point at each row's column 0) times the gathered rows x[t] of the tile's tokens t_S; gate
        and up rounded (the grouped GEMM's output), silu·up taken in fp32 and rounded once (inductor's fused
        pointwise kernel), the rounding points of the slot-major kernels. One helper for the routed and the shared
        rows: they round alike by construction."""
        acc_gate_FS = tl.zeros((BLOCK_F, BLOCK_S), dtype=tl.float32)
        acc_up_FS = tl.zeros((BLOCK_F, BLOCK_S), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_D = d0 + tl.arange(0, BLOCK_D)
            mask_D = d_D < D
            mask_FD = mask_F[:, None] & mask_D[None, :]
            wg_FD = tl.load(gate_FD + d_D[None, :], mask=mask_FD, other=0.0)
            wu_FD = tl.load(up_FD + d_D[None, :], mask=mask_FD, other=0.0)
            x_DS = tl.load(x_ptr + t_S[None, :] * D + d_D[:, None], mask=mask_D[:, None] & mask_S[None, :],
                           other=0.0)  # one load of the tokens' x for both dots
            acc_gate_FS = fp32_dot(wg_FD, x_DS, acc_gate_FS, IEEE)
            acc_up_FS = fp32_dot(wu_FD, x_DS, acc_up_FS, IEEE)
        gate_FS = rounded(acc_gate_FS, out_ty)
        up_FS = rounded(acc_up_FS, out_ty)
        return rounded(gate_FS * tl.sigmoid(gate_FS) * up_FS, out_ty)

    @triton.jit
    def _down_tile(rows_DF, mask_D, h_FS, mask_S, WIDTH: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_F: tl.constexpr, BLOCK_S: tl.constexpr, IEEE: tl.constexpr, out_ty: tl.constexpr):
        """Σ_f rows[d, f] · h[f, s] over f < WIDTH, (BLOCK_D, BLOCK_S) rounded to out_ty (the GEMM's output):
        rows_DF points at each down row's column 0, h_FS at each tile column's h row (its value f at + f)."""
        acc_DS = tl.zeros((BLOCK_D, BLOCK_S), dtype=tl.float32)
        for f0 in range(0, WIDTH, BLOCK_F):
            f_F = f0 + tl.arange(0, BLOCK_F)
            mask_F = f_F < WIDTH
            w_DF = tl.load(rows_DF + f_F[None, :], mask=mask_D[:, None] & mask_F[None, :], other=0.0)
            h_tile_FS = tl.load(h_FS + f_F[:, None], mask=mask_F[:, None] & mask_S[None, :], other=0.0)
            acc_DS = fp32_dot(w_DF, h_tile_FS, acc_DS, IEEE)
        return rounded(acc_DS, out_ty)

    @triton.jit
    def _shared_rows(r, T, BLOCK_S: tl.constexpr):
        """Shared program row r's tile: its tokens t_S (a block of BLOCK_S) and which are < T."""
        t_S = r * BLOCK_S + tl.arange(0, BLOCK_S)
        return t_S, t_S < T

    @triton.jit
    def _expert_gate_up_swiglu_kernel(x_ptr, order_ptr, ends_ptr, w_ptr, sg_ptr, su_ptr, h_ptr, T,
                                      K: tl.constexpr, S: tl.constexpr, E: tl.constexpr, D: tl.constexpr,
                                      F: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                                      BLOCK_S: tl.constexpr, IEEE: tl.constexpr):
        """h[s, f] for the slots s of expert e = program_id(0) (rows s of the expert-sorted list, so the down
        kernel reads them contiguously), f in program_id(1)'s block; an expert without slots loads nothing.
        Program rows E + r (S > 0): the shared expert's slice j = r % S (its gate_proj/up_proj rows j·F + f) for
        the tile r // S of tokens, into h row T·K + t·S + j (token t's S shared rows adjacent: one down GEMM of
        width S·F reads them as one row)."""
        e = tl.program_id(0)
        f_F = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_F = f_F < F
        out_ty = h_ptr.dtype.element_ty
        if e < E:
            start, end = _expert_run(ends_ptr, e)
            gate_FD = w_ptr + e.to(tl.int64) * (2 * F * D) + f_F[:, None] * D  # rows f of expert e's gate half
            up_FD = gate_FD + F * D                                             # rows F + f: their up twins
            s0 = start
            # one tile unless the expert has more than BLOCK_S slots. A while loop: Triton's interpreter (the CPU
            # tests) cannot take a for loop's bounds from loaded values (its scalars are 1-element arrays)
            while s0 < end:
                s_S = s0 + tl.arange(0, BLOCK_S)
                mask_S = s_S < end
                t_S = tl.load(order_ptr + s_S, mask=mask_S, other=0) // K  # slot n = t·K + k reads token t
                h_FS = _swiglu_tile(gate_FD, up_FD, mask_F, x_ptr, t_S, mask_S, D, BLOCK_F, BLOCK_D, BLOCK_S, IEEE,
                                    out_ty)
                tl.store(h_ptr + s_S[None, :] * F + f_F[:, None], h_FS.to(out_ty),
                         mask=mask_F[:, None] & mask_S[None, :])
                s0 += BLOCK_S
        elif S > 0:  # never compiled without a shared expert (S = 0: the grid has E rows)
            j = (e - E) % S
            t_S, mask_S = _shared_rows((e - E) // S, T, BLOCK_S)
            rows_F = j * F + f_F  # the slice's rows of the shared gate_proj and up_proj weights (S·F, D)
            h_FS = _swiglu_tile(sg_ptr + rows_F[:, None] * D, su_ptr + rows_F[:, None] * D, mask_F, x_ptr, t_S,
                                mask_S, D, BLOCK_F, BLOCK_D, BLOCK_S, IEEE, out_ty)
            tl.store(h_ptr + (T * K + t_S[None, :] * S + j).to(tl.int64) * F + f_F[:, None], h_FS.to(out_ty),
                     mask=mask_F[:, None] & mask_S[None, :])

    @triton.jit
    def _expert_down_kernel(h_ptr, order_ptr, ends_ptr, w_ptr, sd_ptr, y_ptr, T, K: tl.constexpr, S: tl.constexpr,
                            E: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_F: tl.constexpr, BLOCK_S: tl.constexpr, IEEE: tl.constexpr):
        """y[n, d] = down[e, d] · h[s], rounded, for the slots of expert e = program_id(0), written at the
        slot's own row n = t·K + k (the combine then reads a token's K rows together). Program rows E + r
        (S > 0): the shared expert's down GEMM for the tile r of tokens, one of width S·F over token t's S adjacent
        h rows (the formula's one GEMM over the shared width), rounded, into y row T·K + t."""
        e = tl.program_id(0)
        d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_D = d_D < D
        out_ty = y_ptr.dtype.element_ty
        if e < E:
            start, end = _expert_run(ends_ptr, e)
            rows_DF = w_ptr + e.to(tl.int64) * (D * F) + d_D[:, None] * F
            s0 = start
            while s0 < end:  # a while loop, as in the gate_up kernel
                s_S = s0 + tl.arange(0, BLOCK_S)
                mask_S = s_S < end
                n_S = tl.load(order_ptr + s_S, mask=mask_S, other=0)
                y_DS = _down_tile(rows_DF, mask_D, h_ptr + s_S[None, :] * F, mask_S, F, BLOCK_D, BLOCK_F, BLOCK_S,
                                  IEEE, out_ty)
                tl.store(y_ptr + n_S[None, :] * D + d_D[:, None], y_DS.to(out_ty),
                         mask=mask_D[:, None] & mask_S[None, :])
                s0 += BLOCK_S
        elif S > 0:  # as in the gate_up kernel: only with a shared expert
            t_S, mask_S = _shared_rows(e - E, T, BLOCK_S)
            h_FS = h_ptr + (T * K + t_S[None, :] * S).to(tl.int64) * F  # token t's S shared rows, S·F values
            y_DS = _down_tile(sd_ptr + d_D[:, None] * (S * F), mask_D, h_FS, mask_S, S * F, BLOCK_D, BLOCK_F, BLOCK_S,
                              IEEE, out_ty)
            tl.store(y_ptr + (T * K + t_S[None, :]).to(tl.int64) * D + d_D[:, None], y_DS.to(out_ty),
                     mask=mask_D[:, None] & mask_S[None, :])

    @triton.jit
    def _combine_kernel(y_ptr, gw_ptr, out_ptr, T, K: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        """out[t] = Σ_k rounded(w[t, k]) · y[t·K + k] in fp32, k in order, plus (S > 0) the shared expert's
        rounded output y[T·K + t] with weight 1 (not rounded: no router weight), rounded once: the slot-major
        down kernel's sum, term for term."""
        t = tl.program_id(0)
        d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_D = d_D < D
        out_ty = out_ptr.dtype.element_ty
        y_D = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k in tl.static_range(K):
            n = t * K + k
            gw = rounded(tl.load(gw_ptr + n).to(tl.float32), out_ty)
            y_D += tl.load(y_ptr + n * D + d_D, mask=mask_D, other=0.0).to(tl.float32) * gw
        if S > 0:  # after the routed terms, as the slot-major kernel adds it
            y_D += tl.load(y_ptr + (T * K + t) * D + d_D, mask=mask_D, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * D + d_D, rounded(y_D, out_ty).to(out_ty), mask=mask_D)

    @torch.library.triton_op("moeflow::routed_experts_decode_by_expert", mutates_args=())
    def routed_experts_decode_by_expert(x_TD: torch.Tensor, order_N: torch.Tensor, ends_E: torch.Tensor,
                                        weight_TK: torch.Tensor, gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor,
                                        shared_gate_HD: torch.Tensor | None = None,
                                        shared_up_HD: torch.Tensor | None = None,
                                        shared_down_DH: torch.Tensor | None = None,
                                        gate_up_block_f: int = 32, gate_up_block_d: int = 128,
                                        down_block_d: int = 32, down_block_f: int = 128, block_s: int = 16,
                                        combine_block_d: int = 256, num_warps: int = 4,
                                        num_stages: int = 3) -> torch.Tensor:
        """(T, D) in x's dtype, from ``expert_major_routing``'s (order_N, ends_E): the routed experts' weighted
        sum, plus the shared expert's output where its three weights are given (H = S·F; the three or none, as
        ``routed_experts_decode``). Three kernels: gate_up + SwiGLU, grid (E [+ S·ceil(T / block_s)], F blocks),
        into h (N [+ T·S], F), the routed rows in expert order; down, grid (E [+ ceil(T / block_s)], D blocks),
        into each slot's rounded output (N [+ T], D); the combine over K [and the shared row], grid (T, D blocks).
        Blocks are powers of two, the dot's ones ≥ 16 (tl.dot's least). The defaults are a first guess for
        bench_ref on sm_90, not yet timed (benchmarks/bench_moe_decode.py --sweep times others): 1,024 gate_up
        programs of 2 × 32 rows × D, 2,048 down programs of 32 rows × F, at most 16 slots a tile."""
        T, K = weight_TK.shape
        E, D, F = down_EDF.shape
        S = 0 if shared_down_DH is None else shared_down_DH.shape[1] // F
        x_TD, order_N, ends_E, weight_TK = (t.contiguous() for t in (x_TD, order_N, ends_E, weight_TK))
        gate_up_E2FD, down_EDF = gate_up_E2FD.contiguous(), down_EDF.contiguous()
        # without a shared expert the kernels never read these pointers (S = 0): any tensor of the dtype will do
        shared = (down_EDF,) * 3 if S == 0 else tuple(w.contiguous() for w in (shared_gate_HD, shared_up_HD,
                                                                               shared_down_DH))
        ieee = x_TD.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") == "1"
        shared_tiles = 0 if S == 0 else triton.cdiv(T, block_s)  # program rows of the shared expert's token tiles
        h_NF = x_TD.new_empty(T * K + T * S, F)  # routed rows (expert order), then token t's S shared rows
        y_ND = x_TD.new_empty(T * K + (T if S else 0), D)  # slot n's output at row n, then token t's shared one
        out_TD = x_TD.new_empty(T, D)
        torch.library.wrap_triton(_expert_gate_up_swiglu_kernel)[(E + S * shared_tiles,
                                                                  triton.cdiv(F, gate_up_block_f))](
            x_TD, order_N, ends_E, gate_up_E2FD, shared[0], shared[1], h_NF, T, K, S, E, D, F,
            BLOCK_F=gate_up_block_f, BLOCK_D=gate_up_block_d, BLOCK_S=block_s, IEEE=ieee, num_warps=num_warps,
            num_stages=num_stages)
        torch.library.wrap_triton(_expert_down_kernel)[(E + shared_tiles, triton.cdiv(D, down_block_d))](
            h_NF, order_N, ends_E, down_EDF, shared[2], y_ND, T, K, S, E, D, F, BLOCK_D=down_block_d,
            BLOCK_F=down_block_f, BLOCK_S=block_s, IEEE=ieee, num_warps=num_warps, num_stages=num_stages)
        torch.library.wrap_triton(_combine_kernel)[(T, triton.cdiv(D, combine_block_d))](
            y_ND, weight_TK, out_TD, T, K, S, D, BLOCK_D=combine_block_d, num_warps=num_warps)
        return out_TD

    @routed_experts_decode_by_expert.register_fake
    def _routed_experts_decode_by_expert_fake(x_TD, order_N, ends_E, weight_TK, gate_up_E2FD, down_EDF,
                                              *shared_and_blocks, **named):
        return x_TD.new_empty(weight_TK.shape[0], down_EDF.shape[1])
