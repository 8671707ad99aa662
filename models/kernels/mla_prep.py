"""MLA's cache step before attention as one Triton kernel launch (inference only): the new tokens' latent (RMSNorm'd)
and RoPE key written into the latent cache, and the queries' RoPE part rotated.

Why: a serving decode step at batch 1 is launch-bound (issue 13: ~1.7 µs a kernel, replayed as a CUDA graph but not
compiled). Between the two projections and attention, a cache step of ``models.attention.MLA`` runs: the latent's
norm (1 launch, the fused RMSNorm), the key's RoPE and the queries' RoPE (9 eager kernels each, 1 each with the fused
RoPE), a ``torch.cat`` of latent and key, a cast to the cache's dtype (none when the dtypes agree) and an
``index_copy_`` into the cache: 21 launches a layer by default (5 with the fused RoPE) become 1 here. The latent and
the key are never materialised: attention reads them back from the cache, as it always did.

The function is the formula's, with its rounding points (shape suffixes: B batch, T new tokens, S cache slots,
H heads, R kv_lora_rank, P rope dim, p = P/2 pairs, X = R + P; ``round_ty`` = to ty, nearest, ties to even):
    kv_a (B, T, X) = latent (R) ‖ key (P), the kv_a projection's output; x its dtype
    latent: models.kernels.rmsnorm's arithmetic (the fused ``RMSNorm``, bit for bit: the same fp32 sum, layout,
            mean factor fl32(1/R), eps, rsqrt and roundings), n = round_x(latent · rsqrt(Σ latent² · fl32(1/R) + eps)),
            y = round_norm(w · n), norm = torch.promote_types(w.dtype, x)
    key:    ``apply_rope`` in x's dtype (models.kernels.rope's arithmetic, bit for bit)
    cache[b, slots_T[t]] = round_cache(y ‖ key)            (``torch.cat``, ``.to(cache dtype)``, ``index_copy_``)
    query:  ``apply_rope(q_rope, cos, sin)`` in q's dtype, a new contiguous (B, T, H, P) tensor
So with the fused RMSNorm the cache and the query are bit-equal to the unfused path's, RoPE fused or not (RoPE is
element-wise and rounds where the formula does); against the eager norm formula the latent differs as the fused
RMSNorm's does (the fp32 sum's order: a bf16 ulp or two now and then). Floating-point contraction is off
(``enable_fp_fusion=False``), as in both kernels it merges.

One program per (b, t) row and part: part 0 the latent and the key of that row (the norm needs the whole row), parts
1.. a block of query heads each. Every program uses the fused RMSNorm's ``num_warps`` for R (``rmsnorm.launch_config``),
so the norm's sum runs in the same register layout and order as there; the query tiles are sized to those warps
(about 256 pairs a warp, as the fused RoPE's).

Slots are trusted as ``index_copy_``'s are by the caller (``prepare_attention`` makes them: [length, length + T)
checked against max_len, or the serving engine's ``cache_position``); a slot outside [0, S) is not written (the
formula would raise) rather than written past the cache.

Capture-safe: no host synchronisation (every size comes from shapes, slots are read on the device), the query output
allocated by the caller's allocator (a CUDA graph's pool), one launch. Not registered as a torch op: ``MLA`` calls it
only outside ``torch.compile``, only when no gradient is needed (there is no backward) and only on a cache step (the
training path is untouched), see ``models.attention.MLA.fused_cache_write``.

Triton is optional: without it ``HAS_TRITON`` is False and ``MLA`` keeps the formula. On a CPU, set
``TRITON_INTERPRET=1`` before this module is imported to run the kernel in Triton's interpreter (the tests do).
"""

from __future__ import annotations

import torch

from . import rmsnorm, rope

HAS_TRITON = rmsnorm.HAS_TRITON and rope.HAS_TRITON
if HAS_TRITON:
    import triton
    import triton.language as tl

DTYPES = rmsnorm.DTYPES  # bf16, fp16, fp32 (rope's too)
# no floating-point contraction: every product rounds before the sum/difference, and ``ms + eps`` after the mean's
# product, as in eager's separate kernels (the same options as rmsnorm's and rope's launches)
COMPILE_OPTIONS = {"enable_fp_fusion": False}
PAIRS_PER_WARP = 256  # a query tile's pairs per warp: 2 even/odd values a lane and a load, as the fused RoPE's


def kernel_applies(kv_a_BTX: torch.Tensor, q_rope_BTHP: torch.Tensor, norm_weight_R: torch.Tensor,
                   cos_BTp: torch.Tensor, sin_BTp: torch.Tensor, cache_BSX: torch.Tensor,
                   slots_T: torch.Tensor) -> bool:
    """Whether ``mla_prep`` computes this cache step: Triton importable; no gradient needed (autograd off, or nothing
    requires grad: the kernel has no backward); kv_a (B, T, R + P) with R the weight's length (≤ rmsnorm.MAX_D), P
    even (≤ rope.MAX_P) and the query's rope dim; q_rope (B, T, H, P); cos and sin exactly (B, T, P/2); the cache
    (B, S, R + P); slots (T,) int64 (``index_copy_``'s index type); every float in ``DTYPES``, all on one device, at
    least one element. Shapes, dtypes and flags only: no host sync."""
    floats = (kv_a_BTX, q_rope_BTHP, norm_weight_R, cos_BTp, sin_BTp, cache_BSX)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in floats[:5])
    if (needs_grad or not HAS_TRITON or kv_a_BTX.dim() != 3 or q_rope_BTHP.dim() != 4 or norm_weight_R.dim() != 1
            or cache_BSX.dim() != 3 or slots_T.dim() != 1 or kv_a_BTX.numel() == 0 or q_rope_BTHP.numel() == 0
            or cache_BSX.numel() == 0):
        return False
    B, T, X = kv_a_BTX.shape
    R, P = norm_weight_R.shape[0], q_rope_BTHP.shape[-1]
    table = (B, T, P // 2)
    return (R + P == X and P % 2 == 0 and 0 < R <= rmsnorm.MAX_D and 0 < P <= rope.MAX_P
            and tuple(q_rope_BTHP.shape[:2]) == (B, T) and tuple(cos_BTp.shape) == tuple(sin_BTp.shape) == table
            and cache_BSX.shape[0] == B and cache_BSX.shape[2] == X and tuple(slots_T.shape) == (T,)
            and slots_T.dtype == torch.int64 and all(t.dtype in DTYPES for t in floats)
            and all(t.device == kv_a_BTX.device for t in (*floats, slots_T)))


def mla_prep(kv_a_BTX: torch.Tensor, q_rope_BTHP: torch.Tensor, norm_weight_R: torch.Tensor, eps: float,
             cos_BTp: torch.Tensor, sin_BTp: torch.Tensor, cache_BSX: torch.Tensor,
             slots_T: torch.Tensor) -> torch.Tensor:
    """Writes ``cache_BSX[b, slots_T[t]] = (rms_norm(kv_a latent, w, eps) ‖ apply_rope(kv_a key))`` cast to the cache's
    dtype, and returns ``apply_rope(q_rope_BTHP, cos_BTp, sin_BTp)``, in one launch (see ``kernel_applies``). Every
    input is read through its strides (q_rope is a split of the query projection; the cache a view of the engine's
    slot cache), the cache written in place."""
    if not HAS_TRITON:
        raise RuntimeError("the fused MLA cache step needs triton, which is not importable here")
    B, T, _ = kv_a_BTX.shape
    R = norm_weight_R.shape[0]
    H, P = q_rope_BTHP.shape[2], q_rope_BTHP.shape[3]
    q_out_BTHP = torch.empty((B, T, H, P), dtype=q_rope_BTHP.dtype, device=q_rope_BTHP.device)
    block_r, block_p, block_h, warps = launch_config(R, H, P)
    grid = (B * T, 1 + triton.cdiv(H, block_h))
    round_norm = torch.promote_types(norm_weight_R.dtype, kv_a_BTX.dtype) == kv_a_BTX.dtype
    _mla_prep_kernel[grid](kv_a_BTX, *kv_a_BTX.stride(), norm_weight_R.contiguous(), rmsnorm._inv(R), float(eps),
                           q_rope_BTHP, *q_rope_BTHP.stride(), q_out_BTHP,
                           cos_BTp, *cos_BTp.stride(), sin_BTp, *sin_BTp.stride(),
                           slots_T, slots_T.stride(0), cache_BSX, *cache_BSX.stride(), cache_BSX.shape[1],
                           T, H, R=R, HALF=P // 2, BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_H=block_h,
                           ROUND_NORM_TO_X=round_norm, num_warps=warps, **COMPILE_OPTIONS)
    return q_out_BTHP


def launch_config(R: int, H: int, P: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_P pairs, BLOCK_H query heads, num_warps): the latent row in one block with the fused RMSNorm's
    warps (its sum's layout, so its bits), a query tile of every pair of a head and as many heads as make about
    ``PAIRS_PER_WARP`` pairs a warp."""
    block_r, warps = rmsnorm.launch_config(R)
    block_p = triton.next_power_of_2(P // 2)
    block_h = min(triton.next_power_of_2(H), max(1, PAIRS_PER_WARP * warps // block_p))
    return block_r, block_p, block_h, warps


if HAS_TRITON:
    from .triton_rounding import rounded

    @triton.jit
    def _rotated_pairs(even_ptr, stride, c_P, s_P, mask, ty: tl.constexpr):
        """apply_rope's two halves of the pairs whose even elements are at even_ptr (the odd ones a stride on), each
        product, difference and sum rounded to ty (c, s rounded to it already); fp32 values."""
        even = tl.load(even_ptr, mask=mask, other=0.0).to(tl.float32)
        odd = tl.load(even_ptr + stride, mask=mask, other=0.0).to(tl.float32)
        first = rounded(rounded(even * c_P, ty) - rounded(odd * s_P, ty), ty)
        second = rounded(rounded(odd * c_P, ty) + rounded(even * s_P, ty), ty)
        return first, second

    @triton.jit
    def _mla_prep_kernel(kv_ptr, kv_sb, kv_st, kv_sx, w_ptr, inv_r, eps,
                         q_ptr, q_sb, q_st, q_sh, q_sp, q_out_ptr,
                         cos_ptr, cos_sb, cos_st, cos_sp, sin_ptr, sin_sb, sin_st, sin_sp,
                         slots_ptr, slots_s, cache_ptr, cache_sb, cache_ss, cache_sx, num_slots,
                         T, H, R: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_H: tl.constexpr, ROUND_NORM_TO_X: tl.constexpr):
        """Program (row, 0): cache[b, slots[t]] = round_cache(norm(latent) ‖ rope(key)) of kv_a[b, t]; program
        (row, j ≥ 1): out[b, t, heads of block j − 1] = rope(q[b, t, those heads])."""
        row = tl.program_id(0).to(tl.int64)
        b, t = row // T, row % T
        part = tl.program_id(1)
        p_P = tl.arange(0, BLOCK_P)
        mask_P = p_P < HALF
        cos_P = tl.load(cos_ptr + b * cos_sb + t * cos_st + p_P * cos_sp, mask=mask_P, other=0.0).to(tl.float32)
        sin_P = tl.load(sin_ptr + b * sin_sb + t * sin_st + p_P * sin_sp, mask=mask_P, other=0.0).to(tl.float32)
        if part == 0:
            x_ty = kv_ptr.dtype.element_ty
            cache_ty = cache_ptr.dtype.element_ty
            kv_row = kv_ptr + b * kv_sb + t * kv_st
            slot = tl.load(slots_ptr + t * slots_s).to(tl.int64)
            in_cache = (slot >= 0) & (slot < num_slots)
            cache_row = cache_ptr + b * cache_sb + slot * cache_ss
            # the latent: rmsnorm._rms_norm_kernel's arithmetic (no ADD), line for line
            d_R = tl.arange(0, BLOCK_R)
            mask_R = d_R < R
            s_R = tl.load(kv_row + d_R * kv_sx, mask=mask_R, other=0.0).to(tl.float32)
            mean_sq = tl.sum(s_R * s_R, axis=0) * inv_r  # masked lanes hold 0
            normed_R = rounded(s_R * tl.math.rsqrt(mean_sq + eps), x_ty)  # x_f32.to(x.dtype)
            w_R = tl.load(w_ptr + d_R, mask=mask_R, other=0.0).to(tl.float32)
            latent_R = w_R * normed_R
            if ROUND_NORM_TO_X:  # weight * n in x's dtype (else in fp32: a product of two ≤ 11-bit values, exact)
                latent_R = rounded(latent_R, x_ty)
            tl.store(cache_row + d_R * cache_sx, rounded(latent_R, cache_ty).to(cache_ty), mask=mask_R & in_cache)
            # the key: apply_rope in x's dtype, then cast (exactly, up to the cat's dtype) to the cache's
            first_P, second_P = _rotated_pairs(kv_row + (R + 2 * p_P) * kv_sx, kv_sx, rounded(cos_P, x_ty),
                                               rounded(sin_P, x_ty), mask_P, x_ty)
            key_P = cache_row + (R + p_P) * cache_sx
            tl.store(key_P, rounded(first_P, cache_ty).to(cache_ty), mask=mask_P & in_cache)
            tl.store(key_P + HALF * cache_sx, rounded(second_P, cache_ty).to(cache_ty), mask=mask_P & in_cache)
        else:
            q_ty = q_ptr.dtype.element_ty
            h_H = (part - 1) * BLOCK_H + tl.arange(0, BLOCK_H)
            mask_HP = (h_H < H)[:, None] & mask_P[None, :]
            q_HP = q_ptr + b * q_sb + t * q_st + h_H.to(tl.int64)[:, None] * q_sh + (2 * p_P)[None, :] * q_sp
            first_HP, second_HP = _rotated_pairs(q_HP, q_sp, rounded(cos_P, q_ty)[None, :],
                                                 rounded(sin_P, q_ty)[None, :], mask_HP, q_ty)
            out_HP = q_out_ptr + (row * H + h_H.to(tl.int64)[:, None]) * (2 * HALF) + p_P[None, :]
            tl.store(out_HP, first_HP.to(q_ty), mask=mask_HP)
            tl.store(out_HP + HALF, second_HP.to(q_ty), mask=mask_HP)
