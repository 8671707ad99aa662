"""RMSNorm, and a residual add followed by RMSNorm, as one Triton kernel launch each (inference only).

Why: a serving decode step at batch 1 is launch-bound (issue 13: ~1,000 kernels a ``bench_ref`` step on an
H100, replayed as a CUDA graph but not compiled). Eager ``RMSNorm.forward`` is 8 kernels (cast, pow, mean,
add, rsqrt, mul, cast, mul) and a decoder layer runs three norms, one of them right after a residual add: the
25 kernels of a layer's three norms and that add become 3 here (``rms_norm`` for the attention input and the
MLA latent, ``add_rms_norm`` for ``x + attention`` and the FFN input's norm).

The function is ``models.layers.rms_norm``'s, with its rounding points, for x and weight in bf16, fp16 or
fp32 (shape suffixes: N rows = every leading dim of x flattened, D the normalised dim):
    s = x (or, fused, s = round_x.dtype(residual + delta): torch's add, fp32 sum rounded once; stored as the
        new residual stream, bit-equal to ``residual + delta``)
    ms = Σ_d s_f32² · fl32(1/D)                    (CUDA's ``mean``: a sum times the fp32 factor 1/D)
    n = round_x.dtype(s_f32 · rsqrt(ms + eps))     (eps rounded to fp32, as torch adds a Python scalar)
    y = round_out(weight_f32 · n), out = torch.promote_types(weight.dtype, x.dtype)  (``weight * n``)
Only the order of the fp32 sum differs from eager (one program sums its row as a tree; no atomics, so a row's
result does not depend on how many rows the call has, nor on the batch the engine runs). Floating-point
contraction is off (``enable_fp_fusion=False``): ``ms + eps`` after the product must round twice, as eager
does, not once in an FMA. The kernel's mean multiplies as CUDA's does, also in the CPU interpreter, where CPU
eager divides (``sum / D``): the tests against the CPU formula allow for that (1 ulp of the fp32 mean, now and
then).

rsqrt: ``tl.math.rsqrt`` is libdevice's ``__nv_rsqrtf`` (as inductor's), eager CUDA's is ``rsqrtf``; both the
MUFU approximation. The GPU test (tests/test_rmsnorm_kernel.py, ``gpu``) measures how often the two agree.

Capture-safe: no host synchronisation (every size comes from shapes), outputs allocated by the caller's
allocator (a CUDA graph's pool), one launch. Not registered as a torch op: ``RMSNorm`` calls it only outside
``torch.compile`` (inductor fuses the formula itself there) and only when no gradient is needed (there is no
backward), see ``models.layers.RMSNorm``.

Triton is optional: without it ``HAS_TRITON`` is False and ``RMSNorm`` keeps the formula. On a CPU, set
``TRITON_INTERPRET=1`` before this module is imported to run the kernel in Triton's interpreter (the tests do).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency: RMSNorm then never takes the kernel
    triton = tl = None

HAS_TRITON = triton is not None

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# one program holds a whole row in registers: up to 16 K values over 16 warps (32 a thread). bench_ref's rows
# are 1,024 (hidden) and 256 (kv_lora_rank); DeepSeek-V3's widest is 7,168.
MAX_D = 16384
# compile options of every launch: no floating-point contraction, so ``ms + eps`` rounds after the product
# (as eager's two kernels do) instead of once in an FMA
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def kernel_applies(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None = None) -> bool:
    """Whether ``rms_norm`` (``add_rms_norm`` with ``delta``) computes this call: Triton importable; no gradient
    needed (autograd off, or nothing requires grad: the kernel has no backward); at least one row; dtypes in
    ``DTYPES``; weight (D,) with D ≤ ``MAX_D``, on x's device; ``delta`` of x's shape, dtype and device (the
    formula broadcasts and promotes; the kernel does neither). Shapes, dtypes and flags only: no host sync."""
    tensors = (x, weight) if delta is None else (x, weight, delta)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    D = x.shape[-1] if x.dim() else 0
    return (HAS_TRITON and not needs_grad and x.numel() > 0 and x.dtype in DTYPES and weight.dtype in DTYPES
            and tuple(weight.shape) == (D,) and D <= MAX_D and weight.device == x.device
            and (delta is None or (delta.shape == x.shape and delta.dtype == x.dtype and delta.device == x.device)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``models.layers.rms_norm(x, weight, eps)`` in one launch; x (..., D), weight (D,) (see ``kernel_applies``)."""
    normed, _ = _launch(x, None, weight, eps)
    return normed


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) for s = residual + delta, in one launch: s bit-equal to torch's add."""
    normed, total = _launch(residual, delta, weight, eps)
    return total, normed


def launch_config(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for rows of D: the row in one block, 8 values a thread up to 16 warps (16-byte loads
    in bf16). D alone decides it, so a row's sum order is the same whatever the number of rows."""
    block = triton.next_power_of_2(D)
    return block, min(16, max(1, block // 256))


@functools.lru_cache(maxsize=None)
def _inv(D: int) -> float:
    """fl32(1/D), correctly rounded (CUDA ``mean``'s factor); a Python float holding that fp32 value exactly."""
    return float(np.float32(1.0) / np.float32(D))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, D) view of t (a copy only when the leading dims cannot be flattened with one stride, or the last
    is strided). The MLA latent is such a view: the first R of each row of R + P values, row stride R + P."""
    t_ND = t.reshape(-1, t.shape[-1])
    return t_ND if t_ND.stride(-1) == 1 else t_ND.contiguous()


def _launch(x, delta, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not HAS_TRITON:
        raise RuntimeError("the fused RMSNorm needs triton, which is not importable here")
    D = x.shape[-1]
    x_ND = _rows(x)
    N = x_ND.shape[0]
    out_ND = torch.empty((N, D), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if delta is None:
        delta_ND = sum_ND = x_ND  # not read (ADD is off): any pointer of the right type
    else:
        delta_ND = _rows(delta)
        sum_ND = torch.empty((N, D), dtype=x.dtype, device=x.device)
    block, warps = launch_config(D)
    _rms_norm_kernel[(N,)](x_ND, x_ND.stride(0), delta_ND, delta_ND.stride(0), weight.contiguous(), out_ND,
                           sum_ND, _inv(D), float(eps), D=D, BLOCK_D=block, ADD=delta is not None,
                           num_warps=warps, **COMPILE_OPTIONS)
    return out_ND.view(x.shape), (sum_ND.view(x.shape) if delta is not None else None)


if HAS_TRITON:
    from .triton_rounding import rounded

    @triton.jit
    def _rms_norm_kernel(x_ptr, x_stride, delta_ptr, delta_stride, w_ptr, out_ptr, sum_ptr, inv_d, eps,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, ADD: tl.constexpr):
        """One program per row: out[row] = w · round(s · rsqrt(mean(s²) + eps)), s = x[row] (+ delta[row])."""
        row = tl.program_id(0).to(tl.int64)
        d_D = tl.arange(0, BLOCK_D)
        mask_D = d_D < D
        x_ty = x_ptr.dtype.element_ty
        s_D = tl.load(x_ptr + row * x_stride + d_D, mask=mask_D, other=0.0).to(tl.float32)
        if ADD:  # the residual stream: torch's add (fp32 sum, rounded once), kept for the caller
            delta_D = tl.load(delta_ptr + row * delta_stride + d_D, mask=mask_D, other=0.0).to(tl.float32)
            s_D = rounded(s_D + delta_D, x_ty)
            tl.store(sum_ptr + row * D + d_D, s_D.to(x_ty), mask=mask_D)
        mean_sq = tl.sum(s_D * s_D, axis=0) * inv_d  # masked lanes hold 0
        normed_D = rounded(s_D * tl.math.rsqrt(mean_sq + eps), x_ty)  # x_f32.to(x.dtype)
        w_D = tl.load(w_ptr + d_D, mask=mask_D, other=0.0).to(tl.float32)
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * D + d_D, rounded(w_D * normed_D, out_ty).to(out_ty), mask=mask_D)
