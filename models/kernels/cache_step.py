"""A one-token cache step's bookkeeping and RoPE table in one Triton kernel launch (inference only): the key mask's
new slot, the real-token counts, the RoPE positions, the boolean attention mask and the cos/sin rows.

Why: a serving decode step at batch 1 is launch-bound (issue 13: ~2-3 µs a kernel, replayed as a CUDA graph but not
compiled). Before the first layer, ``models.attention.prepare_attention`` ran 13 small kernels for a cache step (the
key mask's ``index_copy_``, a cast, cumsum, sub, clamp and add for the positions, a sum and an add for the counts, an
arange and four comparisons for the mask) and ``RotaryEmbedding.forward`` 6 more for the cos/sin table (a cast, three
products, cos, sin): 19 launches a step become 1 here.

The function is the formula's, exactly (shape suffixes: B batch, S key slots of the mask, K key-mask columns, N table
rows, P rope dim, p = P/2; one new token, T = 1, at slot ``slot``; ``real[b]`` its attention-mask entry != 0):
    key_mask[b, slot] = real[b]                                  (``index_copy_``; a slot outside [0, K) not written)
    position[b]       = num_real[b]                              (``num_real + (cumsum(real) − 1).clamp_min(0)``)
    num_real[b]      += real[b]
    mask[b, 0, 0, s]  = s ≤ slot and (key_mask[b, s] or s == slot)  for s < S, key_mask as just written
    cos[b, 0], sin[b, 0] = table[position[b], :p], table[position[b], p:]
Integers and booleans are exact; the cos/sin rows are COPIED from ``RotaryEmbedding.table``, the formula's own
values for positions 0..N-1 (the same element-wise fp32 ops on the same device: bit-equal to computing them from the
positions, tests/test_cache_step_kernel.py checks it). A position past the table (the cache's invariant
``num_real[b] ≤ `` the real slots ``< S`` rules it out; ``prepare_attention`` takes the kernel only with N ≥ the
cache's ``max_len``) reads the table's last row rather than past it.

One program per row b and block of ``BLOCK_S`` mask columns; the row's scalars (count, position, key-mask slot,
cos/sin) are read and written by its first block's program alone. The mask's column ``slot`` is True whatever the
key mask holds there (a query sees its own slot), so no program depends on seeing the key mask's store or not.

Capture-safe: no host synchronisation (every size comes from shapes, the slot is read on the device), outputs
allocated by the caller's allocator (a CUDA graph's pool), one launch. Not registered as a torch op:
``prepare_attention`` calls it only outside ``torch.compile`` (inductor fuses the formula itself there).

Triton is optional: without it ``HAS_TRITON`` is False and ``prepare_attention`` keeps the formula. On a CPU, set
``TRITON_INTERPRET=1`` before this module is imported to run the kernel in Triton's interpreter (the tests do).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency: prepare_attention then never takes the kernel
    triton = tl = None

HAS_TRITON = triton is not None

BLOCK_S = 1024  # mask columns a program writes
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64)


def kernel_applies(real_B1: torch.Tensor | None, slot_1: torch.Tensor, key_mask_BK: torch.Tensor,
                   num_real_B: torch.Tensor, num_keys: int, table_NP: torch.Tensor) -> bool:
    """Whether ``cache_step`` computes this step: Triton importable; one new token (slot (1,) int64); the key mask
    (B, K) bool with num_keys ≤ K; counts (B,) int64; the new tokens' mask entries (B, 1) of an integer or bool dtype
    (or None: every row real); the table (N, P) fp32, contiguous, P even; all on one device. Shapes and dtypes only:
    no host sync."""
    if not HAS_TRITON or key_mask_BK.dim() != 2 or num_real_B.dim() != 1 or table_NP.dim() != 2:
        return False
    B, K = key_mask_BK.shape
    dev = key_mask_BK.device
    real_ok = real_B1 is None or (tuple(real_B1.shape) == (B, 1) and real_B1.dtype in MASK_DTYPES
                                  and real_B1.device == dev)
    return (real_ok and B > 0 and 0 < num_keys <= K and tuple(slot_1.shape) == (1,) and slot_1.dtype == torch.int64
            and key_mask_BK.dtype == torch.bool and tuple(num_real_B.shape) == (B,) and num_real_B.dtype == torch.int64
            and table_NP.dtype == torch.float32 and table_NP.is_contiguous() and table_NP.shape[0] > 0
            and table_NP.shape[1] % 2 == 0 and table_NP.shape[1] > 0
            and all(t.device == dev for t in (slot_1, num_real_B, table_NP)))


def cache_step(real_B1: torch.Tensor | None, slot_1: torch.Tensor, key_mask_BK: torch.Tensor,
               num_real_B: torch.Tensor, num_keys: int, table_NP: torch.Tensor):
    """Writes the key mask's slot and advances the counts in place; returns (positions (B, 1) int64, mask
    (B, 1, 1, num_keys) bool, cos (B, 1, P/2), sin (B, 1, P/2)), cos and sin views of one (B, 1, P) fp32 buffer, in
    one launch (see ``kernel_applies``)."""
    if not HAS_TRITON:
        raise RuntimeError("the fused cache step needs triton, which is not importable here")
    B = key_mask_BK.shape[0]
    P = table_NP.shape[1]
    dev = key_mask_BK.device
    positions_B1 = torch.empty((B, 1), dtype=torch.long, device=dev)
    mask_B11S = torch.empty((B, 1, 1, num_keys), dtype=torch.bool, device=dev)
    rope_B1P = torch.empty((B, 1, P), dtype=torch.float32, device=dev)
    has_real = real_B1 is not None
    real = real_B1 if has_real else num_real_B  # any pointer when every row is real (not read)
    if real.dtype == torch.bool:
        real = real.view(torch.uint8)  # the same bytes, a pointer type Triton loads on every backend
    block_s = min(BLOCK_S, triton.next_power_of_2(num_keys))
    grid = (B, triton.cdiv(num_keys, block_s))
    _cache_step_kernel[grid](real, real.stride(0), slot_1, key_mask_BK.view(torch.uint8), *key_mask_BK.stride(),
                             key_mask_BK.shape[1], num_real_B, num_real_B.stride(0), positions_B1,
                             mask_B11S.view(torch.uint8), num_keys, table_NP, table_NP.shape[0], rope_B1P,
                             HAS_REAL=has_real, P=P, BLOCK_P=triton.next_power_of_2(P), BLOCK_S=block_s, num_warps=4)
    cos_B1p, sin_B1p = rope_B1P.split([P // 2, P // 2], dim=-1)
    return positions_B1, mask_B11S, cos_B1p, sin_B1p


if HAS_TRITON:
    @triton.jit
    def _cache_step_kernel(real_ptr, real_sb, slot_ptr, km_ptr, km_sb, km_ss, K, num_real_ptr, num_real_sb, pos_ptr,
                           mask_ptr, S, table_ptr, N, rope_ptr, HAS_REAL: tl.constexpr, P: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
        """Row b: its key-mask slot, count, position, mask row and cos/sin row (see the module docstring)."""
        b = tl.program_id(0).to(tl.int64)
        s_S = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        slot = tl.load(slot_ptr).to(tl.int64)
        if HAS_REAL:
            real = tl.load(real_ptr + b * real_sb) != 0
        else:
            real = slot == slot  # True
        km_row = km_ptr + b * km_sb
        in_S = s_S < S
        key_S = tl.load(km_row + s_S * km_ss, mask=in_S, other=0) != 0
        self_S = s_S == slot
        # the new slot's key-mask entry (written below, maybe seen here, maybe not) never decides: it sees itself
        allowed_S = (s_S <= slot) & (key_S | self_S)
        tl.store(mask_ptr + b * S + s_S, allowed_S.to(tl.uint8), mask=in_S)
        if tl.program_id(1) == 0:  # the row's scalars: its first block's program alone
            n = tl.load(num_real_ptr + b * num_real_sb)
            tl.store(pos_ptr + b, n)
            tl.store(num_real_ptr + b * num_real_sb, n + real.to(tl.int64))
            tl.store(km_row + slot * km_ss, real.to(tl.uint8), mask=(slot >= 0) & (slot < K))
            row = tl.minimum(tl.maximum(n, 0), N - 1)
            p_P = tl.arange(0, BLOCK_P)
            values_P = tl.load(table_ptr + row * P + p_P, mask=p_P < P, other=0.0)
            tl.store(rope_ptr + b * P + p_P, values_P, mask=p_P < P)
