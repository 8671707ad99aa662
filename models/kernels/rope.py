"""Rotary position embedding (``models.layers.apply_rope``) as one Triton kernel launch (inference only).

Why: a serving decode step at batch 1 is launch-bound (issue 13: ~1.7 µs a kernel of a 1.26 ms ``bench_ref`` step
on an H100, replayed as a CUDA graph but not compiled). Eager ``apply_rope`` is 9 kernels (two casts of cos/sin to
x's dtype, four muls, a sub, an add, a cat) and a layer calls it twice (the queries' rope part and the shared rope
key): 18 launches a layer become 2 here.

The function is ``apply_rope``'s bit for bit, with its rounding points, for x in bf16, fp16 or fp32 (shape
suffixes: N = B·T rows, H heads (1 for a 3-D x), p = P/2 pairs; ``round`` = to x's dtype, nearest, ties to even):
    c = round(cos), s = round(sin)                                  (``cos_BTp.to(x.dtype)``)
    out[..., i]       = round(round(x[2i]·c_i)   − round(x[2i+1]·s_i))
    out[..., p + i]   = round(round(x[2i+1]·c_i) + round(x[2i]·s_i))
Each step is fp32 arithmetic rounded to x's dtype, which is what PyTorch's bf16/fp16 ops do (they compute in fp32
and round once; a product of two bf16/fp16 values is exact in fp32). Floating-point contraction is off
(``enable_fp_fusion=False``): in fp32 the product and the sub/add must round separately, as eager's separate
kernels do, not once in an FMA (tests/test_rope_kernel.py compiles the kernel for sm_90 and looks for FMAs).

x may be any strided view (the queries' rope part is a split of the (B, T, H, N + P) projection, the key's a
split of the (B, T, R + P) latent projection): read in place through its strides, no copy. cos/sin are read
through their strides too. The output is a new contiguous tensor of x's shape and dtype, as the formula's cat.

Capture-safe: no host synchronisation (every size comes from shapes), the output allocated by the caller's
allocator (a CUDA graph's pool), one launch. Not registered as a torch op: ``RotaryEmbedding.rotate`` calls it
only outside ``torch.compile`` (inductor fuses the formula itself there) and only when no gradient is needed
(there is no backward).

Triton is optional: without it ``HAS_TRITON`` is False and ``RotaryEmbedding.rotate`` keeps the formula. On a
CPU, set ``TRITON_INTERPRET=1`` before this module is imported to run the kernel in Triton's interpreter (the
tests do).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency: RotaryEmbedding.rotate then never takes the kernel
    triton = tl = None

HAS_TRITON = triton is not None

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# pairs one program holds (heads × pairs of a tile); bench_ref's queries are 16 heads × 16 pairs, DeepSeek-V3's
# 128 × 32 (two head blocks)
MAX_TILE = 2048
MAX_P = 2 * MAX_TILE  # the rope dim: one head's pairs in one tile
# compile options of every launch: no floating-point contraction, so each product rounds before the sub/add (as
# eager's separate kernels do) instead of once in an FMA
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def kernel_applies(x: torch.Tensor, cos_BTp: torch.Tensor, sin_BTp: torch.Tensor) -> bool:
    """Whether ``apply_rope`` computes this call: Triton importable; no gradient needed (autograd off, or nothing
    requires grad: the kernel has no backward); x (B, T, P) or (B, T, H, P) with P even, 0 < P ≤ ``MAX_P``, and
    at least one element; cos and sin exactly (B, T, P/2) (the formula broadcasts; the kernel does not) on x's
    device; every dtype in ``DTYPES``. Shapes, dtypes and flags only: no host sync."""
    tensors = (x, cos_BTp, sin_BTp)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad or not HAS_TRITON or x.dim() not in (3, 4) or x.numel() == 0:
        return False
    P = x.shape[-1]
    table = (x.shape[0], x.shape[1], P // 2)
    return (P % 2 == 0 and P <= MAX_P and all(t.dtype in DTYPES for t in tensors)
            and all(tuple(t.shape) == table and t.device == x.device for t in (cos_BTp, sin_BTp)))


def apply_rope(x: torch.Tensor, cos_BTp: torch.Tensor, sin_BTp: torch.Tensor) -> torch.Tensor:
    """``models.layers.apply_rope(x, cos_BTp, sin_BTp)`` in one launch (see ``kernel_applies`` for the inputs)."""
    if not HAS_TRITON:
        raise RuntimeError("the fused RoPE needs triton, which is not importable here")
    B, T, P = x.shape[0], x.shape[1], x.shape[-1]
    x_BTHP = x if x.dim() == 4 else x[:, :, None, :]  # a view: heads of 1, its stride unused
    H = x_BTHP.shape[2]
    out_BTHP = torch.empty((B, T, H, P), dtype=x.dtype, device=x.device)
    block_p, block_h, warps = launch_config(H, P)
    grid = (B * T, triton.cdiv(H, block_h))
    _rope_kernel[grid](x_BTHP, *x_BTHP.stride(), cos_BTp, *cos_BTp.stride(), sin_BTp, *sin_BTp.stride(), out_BTHP,
                       T, H, HALF=P // 2, BLOCK_P=block_p, BLOCK_H=block_h, num_warps=warps, **COMPILE_OPTIONS)
    return out_BTHP.view(x.shape)


def launch_config(H: int, P: int) -> tuple[int, int, int]:
    """(BLOCK_P pairs, BLOCK_H heads, num_warps) of a (heads × pairs) tile: every pair of a head, as many heads as
    fit ``MAX_TILE``; a warp per 256 pairs (2 even/odd values a lane and a load), 1 to 8 warps."""
    block_p = triton.next_power_of_2(P // 2)
    block_h = min(triton.next_power_of_2(H), max(1, MAX_TILE // block_p))
    return block_p, block_h, min(8, max(1, block_h * block_p // 256))


if HAS_TRITON:
    from .triton_rounding import rounded

    @triton.jit
    def _rope_kernel(x_ptr, x_sb, x_st, x_sh, x_sp, cos_ptr, cos_sb, cos_st, cos_sp, sin_ptr, sin_sb, sin_st, sin_sp,
                     out_ptr, T, H, HALF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
        """One program per (b, t) row and block of heads: out[b, t, h] = [x_e·c − x_o·s, x_o·c + x_e·s], each
        product, difference and sum rounded to x's dtype (c, s rounded to it first)."""
        row = tl.program_id(0).to(tl.int64)
        b, t = row // T, row % T
        p_P = tl.arange(0, BLOCK_P)
        h_H = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_P = p_P < HALF
        mask_HP = (h_H < H)[:, None] & mask_P[None, :]
        ty = x_ptr.dtype.element_ty
        c_P = rounded(tl.load(cos_ptr + b * cos_sb + t * cos_st + p_P * cos_sp, mask=mask_P, other=0.0)
                      .to(tl.float32), ty)
        s_P = rounded(tl.load(sin_ptr + b * sin_sb + t * sin_st + p_P * sin_sp, mask=mask_P, other=0.0)
                      .to(tl.float32), ty)
        x_HP = x_ptr + b * x_sb + t * x_st + h_H.to(tl.int64)[:, None] * x_sh
        even_HP = tl.load(x_HP + (2 * p_P)[None, :] * x_sp, mask=mask_HP, other=0.0).to(tl.float32)
        odd_HP = tl.load(x_HP + (2 * p_P + 1)[None, :] * x_sp, mask=mask_HP, other=0.0).to(tl.float32)
        c_HP, s_HP = c_P[None, :], s_P[None, :]
        first_HP = rounded(rounded(even_HP * c_HP, ty) - rounded(odd_HP * s_HP, ty), ty)
        second_HP = rounded(rounded(odd_HP * c_HP, ty) + rounded(even_HP * s_HP, ty), ty)
        out_HP = out_ptr + (row * H + h_H.to(tl.int64)[:, None]) * (2 * HALF) + p_P[None, :]
        tl.store(out_HP, first_HP.to(ty), mask=mask_HP)
        tl.store(out_HP + HALF, second_HP.to(ty), mask=mask_HP)
