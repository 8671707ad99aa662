"""Fused routed experts for decode-sized calls: two Triton kernels per MoE layer, no sort, no grouped GEMM.

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

Rounding, against ``RoutedExperts``' grouped path (same value everywhere except the order of the fp32
sums inside a dot product): gate and up are rounded to the compute dtype (the grouped GEMM's output),
silu(gate)·up is taken in fp32 and rounded once (as inductor's fused pointwise kernel does; eager rounds
silu(gate) to bf16 first), each slot's down output is rounded to the compute dtype (the GEMM output) and
the gate weight to the compute dtype (``weight_TK.to(bf16)``); the weighted sum over K is taken in fp32
and rounded once (inductor's reduction; eager rounds each product to bf16 before its fp32 sum).

Registered with ``torch.library.triton_op`` so ``torch.compile`` sees (and inlines) the kernels and a
CUDA graph captures them; the op body is make_fx-traceable, so it is also the fake kernel compile uses to
trace shapes. No host synchronisation: every size comes from tensor shapes. No autograd formula: the
dispatch (``decide_fused_decode``) takes this path only when no gradient is needed.

Triton is an optional accelerator: ``moeflow`` imports and runs without it (``HAS_TRITON`` is False and
the dispatch never picks this path); ``models/moe.py`` imports this module only on CUDA or when forced.
On a CPU, set ``TRITON_INTERPRET=1`` before this module is imported to run the kernels in Triton's
interpreter (the tests do).

Shape suffixes (as in models/moe.py): T tokens, D hidden, E experts, K experts per token, N = T·K routed
slots, F expert width.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency: the dispatch below then never picks the fused path
    triton = tl = None

HAS_TRITON = triton is not None


def decide_fused_decode(*, is_cuda: bool, compute_dtype: torch.dtype, weight_dtypes: tuple[torch.dtype, ...],
                        num_slots: int, num_experts: int, needs_grad: bool, fp8: bool, has_triton: bool) -> bool:
    """The auto rule of ``RoutedExperts.fused_decode``: shapes, dtypes and devices only (never a host sync,
    so it holds for a whole compiled bucket / captured graph).

    CUDA; bf16 compute with bf16 weights (the kernels read the stored stacks: fp32 master weights under
    autocast stay on the grouped path, which casts them); fewer routed slots than experts (decode at small
    batch: bench_ref's 64 experts, top-6, 1..10 tokens; beyond that grouping rows per expert reads each
    expert once); no gradient needed (the op has no backward); not the fp8 path (its GEMMs round the
    operands to fp8: keep what was asked for); Triton importable.
    """
    return (is_cuda and compute_dtype == torch.bfloat16 and all(d == torch.bfloat16 for d in weight_dtypes)
            and num_slots < num_experts and not needs_grad and not fp8 and has_triton)


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
                         gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor) -> torch.Tensor:
    """Σ_k weight[t, k] · expert_{idx[t, k]}(x[t]) by the two kernels, in ``experts``' compute dtype."""
    if not HAS_TRITON:
        raise RuntimeError("RoutedExperts.fused_decode=True needs triton, which is not importable here")
    dtype = experts.compute_dtype(x_TD)
    return routed_experts_decode(x_TD.to(dtype), idx_TK, weight_TK, gate_up_E2FD.to(dtype), down_EDF.to(dtype))


if HAS_TRITON:

    @triton.jit
    def _rounded(v, ty: tl.constexpr):
        """fp32 ``v`` rounded to ``ty`` (to nearest, ties to even), kept in fp32. bf16 by bit arithmetic, which
        for finite values is what the GPU's cvt.rn does: Triton's interpreter truncates a plain
        ``.to(tl.bfloat16)``, and the CPU tests check these rounding points bit for bit."""
        if ty == tl.bfloat16:
            u = v.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            return u.to(tl.float32, bitcast=True)
        else:
            return v.to(ty).to(tl.float32)

    @triton.jit
    def _gate_up_swiglu_kernel(x_ptr, idx_ptr, w_ptr, h_ptr, K: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                               BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
        n = tl.program_id(0)  # routed slot n = t·K + k
        t = n // K
        e = tl.load(idx_ptr + n).to(tl.int64)
        f_F = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_F = f_F < F
        gate_FD = w_ptr + e * (2 * F * D) + f_F[:, None] * D  # row f of expert e's gate half
        up_FD = gate_FD + F * D                                # row F + f: its up twin
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
        gate_F = _rounded(acc_gate_F, out_ty)  # the grouped GEMM's rounded output
        up_F = _rounded(acc_up_F, out_ty)
        h_F = gate_F * tl.sigmoid(gate_F) * up_F
        tl.store(h_ptr + n * F + f_F, _rounded(h_F, out_ty).to(out_ty), mask=mask_F)

    @triton.jit
    def _down_combine_kernel(h_ptr, idx_ptr, gw_ptr, w_ptr, y_ptr, K: tl.constexpr, D: tl.constexpr,
                             F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
        t = tl.program_id(0)
        d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_D = d_D < D
        out_ty = y_ptr.dtype.element_ty
        y_D = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k in tl.static_range(K):  # unrolled: the K experts' loads are independent
            n = t * K + k
            e = tl.load(idx_ptr + n).to(tl.int64)
            gw = _rounded(tl.load(gw_ptr + n).to(tl.float32), out_ty)  # weight_TK.to(compute dtype)
            rows_DF = w_ptr + e * (D * F) + d_D[:, None] * F
            acc_D = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for f0 in range(0, F, BLOCK_F):
                f_F = f0 + tl.arange(0, BLOCK_F)
                mask_F = f_F < F
                h_F = tl.load(h_ptr + n * F + f_F, mask=mask_F, other=0.0).to(tl.float32)
                w_DF = tl.load(rows_DF + f_F[None, :], mask=mask_D[:, None] & mask_F[None, :], other=0.0).to(tl.float32)
                acc_D += tl.sum(w_DF * h_F[None, :], axis=1)
            y_D += _rounded(acc_D, out_ty) * gw  # the slot's rounded GEMM output × its gate weight
        tl.store(y_ptr + t * D + d_D, _rounded(y_D, out_ty).to(out_ty), mask=mask_D)

    @torch.library.triton_op("moeflow::routed_experts_decode", mutates_args=())
    def routed_experts_decode(x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor,
                              gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor, gate_up_block_f: int = 16,
                              gate_up_block_d: int = 1024, down_block_d: int = 8, down_block_f: int = 512,
                              num_warps: int = 4) -> torch.Tensor:
        """(T, D) in x's dtype. Block sizes are powers of two (any D, F: the kernels mask the tails). The
        defaults, for bench_ref on sm_90 (ptxas: 60 registers, no spills, 16-byte loads): one gate_up program
        loads its 16 gate + 16 up rows of D = 1024 in one go (64 KB in flight; 192 programs for 6 slots), one
        down program 8 rows × F of each of its K experts (the K loop unrolled: 48 KB in flight; 128 programs
        for one token). benchmarks/bench_moe_decode.py --sweep times others."""
        T, K = idx_TK.shape
        E, D, F = down_EDF.shape
        x_TD, idx_TK, weight_TK = x_TD.contiguous(), idx_TK.contiguous(), weight_TK.contiguous()
        gate_up_E2FD, down_EDF = gate_up_E2FD.contiguous(), down_EDF.contiguous()
        h_NF = x_TD.new_empty(T * K, F)
        y_TD = x_TD.new_empty(T, D)
        torch.library.wrap_triton(_gate_up_swiglu_kernel)[(T * K, triton.cdiv(F, gate_up_block_f))](
            x_TD, idx_TK, gate_up_E2FD, h_NF, K, D, F, BLOCK_F=gate_up_block_f, BLOCK_D=gate_up_block_d,
            num_warps=num_warps)
        torch.library.wrap_triton(_down_combine_kernel)[(T, triton.cdiv(D, down_block_d))](
            h_NF, idx_TK, weight_TK, down_EDF, y_TD, K, D, F, BLOCK_D=down_block_d,
            BLOCK_F=min(down_block_f, triton.next_power_of_2(F)), num_warps=num_warps)
        return y_TD

    @routed_experts_decode.register_fake
    def _routed_experts_decode_fake(x_TD, idx_TK, weight_TK, gate_up_E2FD, down_EDF, *blocks, **named_blocks):
        # Shapes only. triton_op would use the body itself (make_fx-traceable on a GPU); this one also traces
        # where the kernels are Triton-interpreted (TRITON_INTERPRET=1, CPU tests), which fake tensors cannot run.
        return x_TD.new_empty(idx_TK.shape[0], down_EDF.shape[1])
