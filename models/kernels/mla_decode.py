"""Absorbed-MLA attention over the latent cache for decode-sized steps, flash-decoding style (inference only).

Why: a serving decode step at batch 1 is launch-bound (issue 13). ``MLA._absorbed``'s decode-sized branch runs,
between the absorbed query and the value up-projection, 8 kernels a layer: the cat of the latent query and its
RoPE part, the bmm of the scores, a cast to fp32, masked_fill, the scale, softmax, a cast back and the bmm with
the latent. Here they are one launch (two when the keys are split, see below), reading the queries' two parts and
the cache buffer in place. With ``w_uv_HVR`` given, the value up-projection that follows (the einsum of o_lat with
W_uv) runs in the same launches too: one launch a layer fewer again ("The value up-projection" below).

The function (shape suffixes: B batch, H heads, T new tokens, S keys = ``num_keys``, R kv_lora_rank, P rope dim,
M = H·T query rows of one batch row, m = h·T + t as in the formula's ``(B, H·T, R + P)`` view; NS key splits):
    score[m, s] = (q_lat[b, h, t] · kv[b, s, :R] + q_rot[b, t, h] · kv[b, s, R:]) · scale   (fp32 sums)
    score[m, s] = −inf where not mask[b, 0, t, s]
    o_lat[b, h, t] = Σ_s p[m, s] · kv[b, s, :R] / Σ_s p[m, s]   (fp32 sums, an IEEE division (``div_rn``, not the
                                                                 GPU's approximate one), rounded once at the end)
with p the softmax's numerators exp(score − running max), taken in fp32 (online softmax) and NOT rounded to the
value dtype: each is split into three values of it (hi + mid + lo = p exactly in bf16, 3 × 8 bits) for three
tensor-core dots (an fp32 cache: one, p itself).
What differs from the formula, besides the order of the fp32 sums:
- the scores are not rounded: the formula's first bmm returns them in the queries' dtype (bf16: 8 bits, an error
  of ~|score|·2⁻⁹, the formula's largest) before casting them to fp32; here they stay fp32, so the kernel is
  closer to float64 than the formula is (tests/test_mla_decode_kernel.py holds both against float64);
- the probabilities are not rounded either (the formula rounds its normalised ones to the value dtype before its
  second bmm); the numerators are divided by the fp32 sum after the product, as flash attention does.

Layout invariance: a row's output must not depend on where its keys sit among the cache's columns, or the serving
engine and generate() compute different tokens for one request: the engine's slot rows are right-aligned at a
shared cursor (a request's keys at [c − n, c) of a bucket of S columns, other requests' columns masked), generate()
holds the same keys at [0, n). The formula has this (its softmax uses the row's max; masked keys add exact zeros;
the engine == generate() GPU tests pass with it). So here (1) the splits and key blocks start at the first key any
of a program's queries may see, found by a pass over its mask rows, not at column 0: the same keys share a block
in both layouts, the running maxima and the dots are the same, and blocks or splits past the row's keys add exact
zeros; (2) the numerators are carried whole (above). With blocks at column 0, numerators rounded once relative to
the running max parted 1.5-7 % of bf16 outputs between the two layouts in the interpreter (the graphed engine left
generate()'s greedy tokens on an H100, 2026-12-07); (2) alone made the interpreter bit-equal but not the H100's
engine test; (1) alone (``exact_p=False``) is bit-equal in the interpreter too (tests/test_mla_decode_kernel.py:
``test_a_rows_output_does_not_depend_on_where_its_keys_sit``); both together are not yet measured on a GPU.

The value up-projection (``w_uv_HVR``, what ``MLA._absorbed`` passes): out[b, t, h] = o_lat[b, h, t] · W_uv[h]ᵀ
(B, T, H, V), the formula's ``einsum("bhtr,hvr->bthv", o_lat, w_uv)`` with its rounding points: o_lat rounded to
the dtype first (as above: the einsum takes the rounded o_lat), the products summed in fp32 (exact in fp32 for the
16-bit dtypes), rounded once. So it equals "o_lat from the kernel, then the einsum" up to the order of the fp32
sums over R (bit for bit in bf16 in the interpreter, tested). W_uv is any strided (H, V, R) view
(``MLA.absorbed_weights``: rows of kv_b_proj.weight), read in place.
Where it runs: without a key split in the attention kernel's epilogue, with one in the combine kernel, both
through ``_mla_project_rows`` on the same block of BLOCK_M rows with the same tiles and warps. That sameness is
what keeps the layout invariance: generate()'s n keys may take one split where the engine's wider bucket splits
(S 50 against 130 in the test), and the two o_lat are the same bits; a projection computed otherwise in each (a
first version summed a row's products with ``tl.sum`` in a per-row combine, and a tensor-core dot in the epilogue)
parted 1 output in 512 between the layouts. The combine therefore takes the attention kernel's row blocks (it
took one row a program) and adds the splits one after another (it summed them as a tree): o_lat's bits change
within the fp32 sum order, the same with or without the projection. A block of rows spans several heads, each
with its own W_uv[h]: one tensor-core dot of the whole rounded block with W_uv[h]ᵀ per head, keeping that head's
rows (BLOCK_M / T times the products kept: a few hundred thousand MACs at bench_ref's size, nothing for the
tensor cores). The heads are shared out among programs of at most ``GROUP_BYTES`` = 64 KB of W_uv each
(bench_ref: 8 programs of 2 heads a block of rows), each computing the block's attention again without a split
(≤ 128 keys: ≤ 74 KB of cache, from L2 after the first; the same bits in every program) and reading only its
heads' partials with one: one program reading all of W_uv (512 KB at bench_ref) would stream it through one SM
at batch 1, at one SM's share of L2 or HBM bandwidth (tens of GB/s: µs, as much as the launch it saves). Guesses
from bandwidth figures, not timed: the extra attention work at batch 32 (8 programs a batch row) may want fewer
groups. W_uv is read once a batch row (bench_ref: 512 KB; at batch 32, 16 MB of mostly L2 reads a layer, where
the einsum read it once). Registers: the epilogue runs after the key loop (its accumulator dead by then),
holding the rounded block and a BLOCK_R × ``CHUNK_V`` tile of W_uv (``projection_config``: at most 16K values, 64
registers a thread at bench_ref's 4 warps); tests/test_mla_decode_kernel.py builds the fused kernels for sm_90
(Triton's ptxas, no GPU) and checks registers and spills. The bit-equality of the two paths on a GPU rests on
the same dot code giving the same bits in two kernels: not yet run on one.

Occupancy and the split (flash-decoding): the latent is ONE key/value head shared by all heads, so a program
takes a batch row's H·T query rows together (the M side of tensor-core dots, ≥ 16 rows: bench_ref's 16 heads
at T = 1 fill exactly one m16 tile) against a block of keys, reading each key once for all heads. So at batch 1
there is one program per key split, and without a split a batch-1 call of 2,048 keys is one SM walking 32 key
blocks one after the other while 131 SMs idle. The call reads little (2,048 × 576 B = 1.2 MB a layer, under a µs
at the H100's bandwidth): it is bound by that serial walk, not by bandwidth, so what the split buys is a short
walk per program rather than every SM busy. The keys are split (``key_splits``: up to ``MAX_SPLITS`` = 16 splits
of at least ``MIN_KEYS_PER_SPLIT`` = 128 keys, i.e. two blocks of 64 a program up to 2,048 keys) and a second
launch combines the splits' (max, sum, accumulator) rows; a call of one split (up to 128 keys: the engine's first
two width buckets) writes its output directly, one launch. At batch 32 the B × NS programs (512 at 2,048 keys)
fill the GPU anyway; there the splits cost a write and a read of NS · M · R fp32 partials per batch row (at
S = 2,048: 16 × 16 × 256 × 4 B = 256 KB, against its 1.2 MB of cache). The split depends on S only, never on B:
a row's result (its sum order) does not depend on how many rows the call has, so a batch of requests gets each
request's batch-1 values bit for bit (tested). These are first guesses, not timed: benchmarks/bench_mla_decode.py
--sweep times other splits, key blocks and warps.

Capture-safe: no host synchronisation (every size comes from shapes and ``num_keys``, a Python int), outputs and
partials allocated by the caller's allocator (a CUDA graph's pool); W_uv's strides are arguments (no copy). Under
``torch.compile`` ``MLA`` calls it as the custom op ``torch.ops.moeflow.mla_decode_attention``, opaque to the
compiler (its fake gives the output's shape, (B, T, H, V) with W_uv; at run time it is this launcher, with concrete
sizes, so symbolic shapes of the engine's buckets need nothing here): inductor has no fused kernel for the formula's
two bmm's, and the compiled engine step then runs the same launches as the eager one. No autograd formula: ``MLA``
takes it only when no gradient is needed.

Triton is optional: without it ``HAS_TRITON`` is False and ``MLA`` keeps the formula. On a CPU, set
``TRITON_INTERPRET=1`` before this module is imported to run the kernels in Triton's interpreter (the tests do;
its dot misreads bf16, so there the tiles go through the dot in fp32: bf16 products are exact in fp32).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency: MLA then never takes the kernel
    triton = tl = None

HAS_TRITON = triton is not None

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# one program holds its rows' latent accumulator (BLOCK_M × R fp32) and queries in registers: R up to 512
# (DeepSeek-V3's kv_lora_rank; bench_ref's is 256), the rope part up to 128 (V3: 64, bench_ref: 32)
MAX_R = 512
MAX_P = 128
# The model takes the kernel for one-token decode steps only (the kernel itself computes up to 16 new tokens a row,
# called directly). With more, how a prompt is chunked would decide the path: the engine's 8-token prefill chunks
# took the kernel where generate()'s whole 17-30-token prompts took the formula, and in bf16 the two parted in greedy
# output (the kernel's fp32 scores against the formula's bf16 ones; seen on an H200 and in the interpreter,
# 2026-12-07). Prefill keeps the formula's bmm's, whose tensor-core tiles suit many query rows anyway.
MAX_T = 1
# the value up-projection folded into the kernel (``w_uv_HVR``): V up to 256 (V3's v_head_dim is 128, bench_ref's 64),
# walked in chunks of output columns so that W_uv's tile stays small (see ``projection_config``)
MAX_V = 256
# without a key split, the W_uv bytes one program projects with (its block of rows' attention computed again in each:
# see "The value up-projection" in the module docstring). A first guess, not timed
GROUP_BYTES = 64 * 1024
# the key split (a function of S alone, see the module docstring): at least this many keys a split, at most
# this many splits. First guesses for bench_ref on an H100, not yet timed: benchmarks/bench_mla_decode.py
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 16
MASK_BLOCK = 1024  # mask columns a program reads at once looking for its row's first allowed key


def kernel_applies(q_lat_BHTR: torch.Tensor, q_rot_BTHP: torch.Tensor, kv_BSX: torch.Tensor,
                   mask_B1TS: torch.Tensor, num_keys: int, w_uv_HVR: torch.Tensor | None = None) -> bool:
    """Whether ``mla_decode_attention`` computes this call: Triton importable; no gradient needed (the kernel has
    no backward); q_lat (B, H, T, R), q_rot (B, T, H, P), the cache buffer kv (B, S_max, R + P) with
    0 < num_keys ≤ S_max, all one dtype in ``DTYPES`` (the formula casts the cache to the queries' dtype: the
    kernel does not) on one device; the mask bool, exactly (B, 1, T, num_keys) (the formula broadcasts; the
    kernel does not); T ≤ ``MAX_T``, R ≤ ``MAX_R``, P ≤ ``MAX_P``, nothing empty; ``w_uv_HVR`` where given
    (the value up-projection in the kernel) (H, V, R) with 0 < V ≤ ``MAX_V``, any strides, the same dtype and
    device. Shapes, dtypes and flags only: no host sync."""
    tensors = (q_lat_BHTR, q_rot_BTHP, kv_BSX) + (() if w_uv_HVR is None else (w_uv_HVR,))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad or not HAS_TRITON or q_lat_BHTR.dim() != 4 or q_rot_BTHP.dim() != 4 or kv_BSX.dim() != 3:
        return False
    B, H, T, R = q_lat_BHTR.shape
    P = q_rot_BTHP.shape[-1]
    return (q_lat_BHTR.numel() > 0 and P > 0 and 0 < num_keys <= kv_BSX.shape[1] and T <= MAX_T and R <= MAX_R
            and P <= MAX_P and tuple(q_rot_BTHP.shape) == (B, T, H, P) and tuple(kv_BSX.shape[::2]) == (B, R + P)
            and q_lat_BHTR.dtype in DTYPES and all(t.dtype == q_lat_BHTR.dtype for t in tensors)
            and mask_B1TS.dtype == torch.bool and tuple(mask_B1TS.shape) == (B, 1, T, num_keys)
            and all(t.device == q_lat_BHTR.device for t in (*tensors, mask_B1TS))
            and (w_uv_HVR is None or (w_uv_HVR.dim() == 3 and tuple(w_uv_HVR.shape[::2]) == (H, R)
                                      and 0 < w_uv_HVR.shape[1] <= MAX_V)))


def key_splits(S: int, keys_per_split: int | None = None) -> tuple[int, int]:
    """(keys a split, number of splits) for S keys: at most ``MAX_SPLITS`` splits of at least
    ``MIN_KEYS_PER_SPLIT`` keys, a multiple of the key block, or ``keys_per_split`` if given. S alone decides."""
    if keys_per_split is None:
        num = min(MAX_SPLITS, triton.cdiv(S, MIN_KEYS_PER_SPLIT))
        keys_per_split = triton.cdiv(triton.cdiv(S, num), 64) * 64
    if keys_per_split <= 0 or keys_per_split % 64:
        raise ValueError(f"keys_per_split={keys_per_split}: a positive multiple of 64 (whole key blocks)")
    return keys_per_split, triton.cdiv(S, keys_per_split)


def launch_config(num_rows: int, R: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M query rows, BLOCK_S keys, num_warps) of the attention kernel: all of a batch row's H·T rows up to
    64 (32 for R > 256), at least 16 (a tensor-core tile); 64 keys a block (32 in fp32: twice the bytes); 4 warps,
    8 from a 64 × 256 fp32 accumulator (64 registers a thread). ptxas (sm_90, bench_ref's decode): 255 registers
    at 4 warps, no spills; 8 warps take 224, 8 warps of 32-key blocks 160 (first guesses, not yet timed)."""
    block_m = min(max(16, triton.next_power_of_2(num_rows)), 64 if R <= 256 else 32)
    block_r = max(16, triton.next_power_of_2(R))
    return block_m, 32 if dtype == torch.float32 else 64, 8 if block_m * block_r >= 16384 else 4


def combine_config(num_splits: int) -> int:
    """BLOCK_N of the combine kernel: every split's running max of a block of rows in one tile (their max first);
    the accumulators are then added one split after another (BLOCK_M × R at a time)."""
    return triton.next_power_of_2(num_splits)


def projection_config(H: int, T: int, V: int, R: int, dtype: torch.dtype, block_m: int, fuse_v: bool
                      ) -> tuple[int, int, int, int]:
    """(BLOCK_V, W_uv columns a chunk, heads a program, programs a block of rows) of the value up-projection (and of
    the combine's rows without it). The tile of W_uv[h]ᵀ (BLOCK_R × chunk) at most 16K values (bench_ref's R 256:
    all 64 columns at once, 64 registers a thread at 4 warps; V3's R 512: 32 columns). The heads of a block of
    rows (at most ⌈(BLOCK_M − 1) / T⌉ + 1) go to programs of at most ``GROUP_BYTES`` of W_uv each (bench_ref: 8
    programs of 2 heads at batch 1), or without the projection one head a combine program (its partials only): see
    "The value up-projection" in the module docstring."""
    block_v, block_r = max(16, triton.next_power_of_2(V)), max(16, triton.next_power_of_2(R))
    block_heads = min(H, block_m, -(-(block_m - 1) // T) + 1)
    group_heads = max(1, min(block_heads, GROUP_BYTES // (V * R * dtype.itemsize))) if fuse_v else 1
    return block_v, min(block_v, max(16, 16384 // block_r)), group_heads, triton.cdiv(block_heads, group_heads)


def mla_decode_attention(q_lat_BHTR: torch.Tensor, q_rot_BTHP: torch.Tensor, kv_BSX: torch.Tensor,
                         mask_B1TS: torch.Tensor, num_keys: int, scale: float, w_uv_HVR: torch.Tensor | None = None,
                         keys_per_split: int | None = None, block_s: int | None = None,
                         num_warps: int | None = None, exact_p: bool = True) -> torch.Tensor:
    """o_lat (B, H, T, R), contiguous, in the queries' dtype: the formula of the module docstring over the cache
    slots [0, num_keys) (see ``kernel_applies`` for the inputs); with ``w_uv_HVR`` (W_uv (H, V, R), any strides:
    ``MLA.absorbed_weights``' view of kv_b_proj.weight) o_lat's up-projection instead, (B, T, H, V) contiguous:
    ``einsum("bhtr,hvr->bthv", o_lat, w_uv)`` in the same launches ("The value up-projection" in the module
    docstring). ``keys_per_split`` overrides ``key_splits``, ``block_s`` (a power of two from 16 dividing the
    split) and ``num_warps`` ``launch_config``: the benchmark's sweep (benchmarks/bench_mla_decode.py).
    ``exact_p=False`` rounds each numerator to the value dtype once (one tensor-core dot instead of three; the
    tests' control for the block alignment, see "Layout invariance")."""
    if not HAS_TRITON:
        raise RuntimeError("the fused MLA decode attention needs triton, which is not importable here")
    B, H, T, R = q_lat_BHTR.shape
    P = q_rot_BTHP.shape[-1]
    M = H * T
    fuse_v = w_uv_HVR is not None
    V = w_uv_HVR.shape[1] if fuse_v else 1
    if fuse_v and (tuple(w_uv_HVR.shape[::2]) != (H, R) or w_uv_HVR.dtype != q_lat_BHTR.dtype):
        raise ValueError(f"w_uv_HVR {tuple(w_uv_HVR.shape)} {w_uv_HVR.dtype}: (H, V, R) = ({H}, V, {R}) in "
                         f"{q_lat_BHTR.dtype}, the queries' dtype")
    out_shape = (B, T, H, V) if fuse_v else (B, H, T, R)
    out = torch.empty(out_shape, dtype=q_lat_BHTR.dtype, device=q_lat_BHTR.device)
    # unfused: any pointer of the dtype, never read (FUSE_V is off)
    w_uv = w_uv_HVR if fuse_v else q_lat_BHTR
    w_strides = w_uv_HVR.stride() if fuse_v else (0, 0, 0)
    split_len, num_splits = key_splits(num_keys, keys_per_split)
    block_m, default_block_s, warps = launch_config(M, R, q_lat_BHTR.dtype)
    block_s, warps = block_s or default_block_s, num_warps or warps
    if split_len % block_s or block_s < 16 or block_s & (block_s - 1):
        raise ValueError(f"block_s={block_s}: a power of two from 16 dividing the split's {split_len} keys")
    block_r, block_p = max(16, triton.next_power_of_2(R)), max(16, triton.next_power_of_2(P))
    ieee = q_lat_BHTR.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") == "1"
    if num_splits > 1:
        m_BNM = torch.empty((B, num_splits, M), dtype=torch.float32, device=q_lat_BHTR.device)
        l_BNM = torch.empty_like(m_BNM)
        acc_BNMR = torch.empty((B, num_splits, M, R), dtype=torch.float32, device=q_lat_BHTR.device)
    else:  # not written (SPLIT is off): any fp32 pointer
        m_BNM = l_BNM = acc_BNMR = torch.empty(1, dtype=torch.float32, device=q_lat_BHTR.device)
    mask_B1TS = mask_B1TS.view(torch.uint8)  # the same bytes, a pointer type Triton loads on every backend
    block_v, chunk_v, group_heads, groups = projection_config(H, T, V, R, q_lat_BHTR.dtype, block_m, fuse_v)
    # axis 1: the key splits, or without a split (and with the projection) the head groups of a block of rows
    grid = (B, num_splits if num_splits > 1 or not fuse_v else groups, triton.cdiv(M, block_m))
    _mla_decode_kernel[grid](
        q_lat_BHTR, *q_lat_BHTR.stride(), q_rot_BTHP, *q_rot_BTHP.stride(), kv_BSX, *kv_BSX.stride(),
        mask_B1TS, mask_B1TS.stride(0), mask_B1TS.stride(2), mask_B1TS.stride(3), w_uv, *w_strides,
        out, m_BNM, l_BNM, acc_BNMR, float(scale), num_keys, num_splits, T, H, M, SPLIT_LEN=split_len, R=R, P=P,
        V=V, BLOCK_M=block_m, BLOCK_S=block_s, BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_V=block_v,
        CHUNK_V=chunk_v, GROUP_HEADS=group_heads, BLOCK_F=MASK_BLOCK, F_BLOCKS=triton.cdiv(num_keys, MASK_BLOCK),
        SPLIT=num_splits > 1, FUSE_V=fuse_v, IEEE=ieee, EXACT_P=exact_p, num_warps=warps)
    if num_splits > 1:  # the attention kernel's row blocks and warps: the projection's dots are the same code
        _mla_combine_kernel[(B, groups, triton.cdiv(M, block_m))](
            m_BNM, l_BNM, acc_BNMR, w_uv, *w_strides, out, num_splits, T, H, M, R=R, V=V, BLOCK_M=block_m,
            BLOCK_N=combine_config(num_splits), BLOCK_R=block_r, BLOCK_V=block_v, CHUNK_V=chunk_v,
            GROUP_HEADS=group_heads, FUSE_V=fuse_v, IEEE=ieee, num_warps=warps)
    return out


if HAS_TRITON:
    from .triton_rounding import fp32_dot, rounded

    @torch.library.custom_op("moeflow::mla_decode_attention", mutates_args=())
    def mla_decode_attention_op(q_lat_BHTR: torch.Tensor, q_rot_BTHP: torch.Tensor, kv_BSX: torch.Tensor,
                                mask_B1TS: torch.Tensor, num_keys: int, scale: float,
                                w_uv_HVR: torch.Tensor | None = None) -> torch.Tensor:
        """``mla_decode_attention`` as an op ``torch.compile`` keeps opaque (the launcher, looked up at call time)."""
        return mla_decode_attention(q_lat_BHTR, q_rot_BTHP, kv_BSX, mask_B1TS, num_keys, scale, w_uv_HVR)

    @mla_decode_attention_op.register_fake
    def _mla_decode_attention_fake(q_lat_BHTR, q_rot_BTHP, kv_BSX, mask_B1TS, num_keys, scale, w_uv_HVR=None):
        if w_uv_HVR is None:
            return q_lat_BHTR.new_empty(q_lat_BHTR.shape)  # contiguous (B, H, T, R) in the queries' dtype
        B, H, T, _ = q_lat_BHTR.shape
        return q_lat_BHTR.new_empty((B, T, H, w_uv_HVR.shape[1]))  # contiguous (B, T, H, V)

    @triton.jit
    def _mla_decode_kernel(ql_ptr, ql_sb, ql_sh, ql_st, ql_sr, qr_ptr, qr_sb, qr_st, qr_sh, qr_sp,
                          kv_ptr, kv_sb, kv_ss, kv_sx, mask_ptr, mask_sb, mask_st, mask_ss, wuv_ptr, wuv_sh, wuv_sv,
                          wuv_sr, out_ptr, m_ptr, l_ptr, acc_ptr, scale, S, num_splits, T, H, M,
                          SPLIT_LEN: tl.constexpr, R: tl.constexpr, P: tl.constexpr, V: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_V: tl.constexpr, CHUNK_V: tl.constexpr, GROUP_HEADS: tl.constexpr,
                          BLOCK_F: tl.constexpr,
                          F_BLOCKS: tl.constexpr, SPLIT: tl.constexpr, FUSE_V: tl.constexpr, IEEE: tl.constexpr,
                          EXACT_P: tl.constexpr):
        """One program per (batch row b, key split, block of query rows): the online softmax over the split's keys
        [split · SPLIT_LEN, min(S, (split + 1) · SPLIT_LEN)); the normalised rows (rounded to the queries' dtype;
        with FUSE_V times W_uv of their heads, rounded again: out (B, T, H, V)), or with SPLIT the split's running
        max, sum and fp32 accumulator for ``_mla_combine_kernel``. Without SPLIT, axis 1 is the group of
        GROUP_HEADS heads whose rows this program projects with FUSE_V (one group otherwise): every group's program
        computes the block's attention alike (the same keys, blocks and sums: the same bits)."""
        b = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1) if SPLIT else 0
        m_M = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # query row m = h·T + t
        h_M, t_M = (m_M // T).to(tl.int64), m_M % T
        rows_M = m_M < M
        r_R, p_P = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_P)
        ty = kv_ptr.dtype.element_ty
        q_lat_MR = tl.load(ql_ptr + b * ql_sb + h_M[:, None] * ql_sh + t_M[:, None] * ql_st + r_R[None, :] * ql_sr,
                           mask=rows_M[:, None] & (r_R < R)[None, :], other=0.0)
        q_rot_MP = tl.load(qr_ptr + b * qr_sb + t_M[:, None] * qr_st + h_M[:, None] * qr_sh + p_P[None, :] * qr_sp,
                           mask=rows_M[:, None] & (p_P < P)[None, :], other=0.0)
        mask_row_M = mask_ptr + b * mask_sb + t_M * mask_st
        kv_b = kv_ptr + b * kv_sb
        max_M = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        sum_M = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc_MR = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        # the first key any of the program's queries may see: the splits and key blocks start there, not at column 0,
        # so a row's keys fall into the same blocks wherever its columns sit (the engine's right-aligned slot rows vs
        # generate()'s [0, n)): the same running maxima, the same dots (see "Layout invariance"). Keys before it are
        # masked for every query here: skipping them changes nothing. None allowed: first = S, no key.
        first = S
        for f in range(F_BLOCKS):  # a constexpr count (the interpreter takes no range from runtime values)
            f_F = f * BLOCK_F + tl.arange(0, BLOCK_F)
            seen_MF = tl.load(mask_row_M[:, None] + f_F[None, :] * mask_ss,
                              mask=rows_M[:, None] & (f_F < S)[None, :], other=0) != 0
            first = tl.minimum(first, tl.min(tl.min(tl.where(seen_MF, f_F[None, :], S), axis=1), axis=0))
        start = first + split * SPLIT_LEN
        end = tl.minimum(S, start + SPLIT_LEN)
        # the split's blocks (the last split's tail blocks past S load nothing and add 0). Bounds from arguments
        # only: the interpreter takes no range from runtime values, and a for loop (not a while) is what Triton
        # software-pipelines on the GPU. SPLIT_LEN is a constexpr: a few values (multiples of 64) per process
        for s0 in range(0, SPLIT_LEN, BLOCK_S):
            s_S = start + s0 + tl.arange(0, BLOCK_S)
            keys_S = s_S < end
            kv_S = kv_b + s_S.to(tl.int64)[:, None] * kv_ss
            lat_SR = tl.load(kv_S + r_R[None, :] * kv_sx, mask=keys_S[:, None] & (r_R < R)[None, :], other=0.0)
            rot_SP = tl.load(kv_S + (R + p_P)[None, :] * kv_sx, mask=keys_S[:, None] & (p_P < P)[None, :], other=0.0)
            score_MS = fp32_dot(q_lat_MR, tl.trans(lat_SR), tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32), IEEE)
            score_MS = fp32_dot(q_rot_MP, tl.trans(rot_SP), score_MS, IEEE) * scale
            allowed_MS = tl.load(mask_row_M[:, None] + s_S[None, :] * mask_ss,
                                 mask=rows_M[:, None] & keys_S[None, :], other=0) != 0
            score_MS = tl.where(allowed_MS, score_MS, float("-inf"))
            new_max_M = tl.maximum(max_M, tl.max(score_MS, axis=1))
            # a row with no allowed key so far keeps max −inf: exponentiate against 0 there (exp(−inf) = 0, not
            # exp(−inf + inf) = NaN), so its sum and accumulator stay 0
            base_M = tl.where(new_max_M == float("-inf"), 0.0, new_max_M)
            alpha_M = tl.exp(max_M - base_M)
            p_MS = tl.exp(score_MS - base_M[:, None])
            sum_M = sum_M * alpha_M + tl.sum(p_MS, axis=1)
            # p · latent with p unrounded: p = hi + mid + lo, three values of the latent's dtype (3 × 8 bits hold
            # fp32's 24 in bf16), three tensor-core dots. Rounding p to that dtype once (as the formula rounds its
            # probabilities) would round it relative to the running max, which depends on where a row's keys sit
            # among the blocks: the engine's slot columns and generate()'s dense ones then parted (see the module
            # docstring, "Layout invariance").
            if IEEE:
                p_hi = rounded(p_MS, ty)  # the value dtype's value, held in fp32 for the fp32 dot
                rest_MS = p_MS - p_hi
                p_mid = rounded(rest_MS, ty)
                p_lo = rounded(rest_MS - p_mid, ty)
            else:
                p_hi = p_MS.to(ty)  # cvt.rn: the same rounding (to nearest, ties to even)
                rest_MS = p_MS - p_hi.to(tl.float32)
                p_mid = rest_MS.to(ty)
                p_lo = (rest_MS - p_mid.to(tl.float32)).to(ty)
            acc_MR = fp32_dot(p_hi, lat_SR, acc_MR * alpha_M[:, None], IEEE)
            if EXACT_P and ty != tl.float32:  # fp32: p_hi is p already
                acc_MR = fp32_dot(p_mid, lat_SR, acc_MR, IEEE)
                acc_MR = fp32_dot(p_lo, lat_SR, acc_MR, IEEE)
            max_M = new_max_M
        out_ty = out_ptr.dtype.element_ty
        if SPLIT:
            part_M = (b * num_splits + split) * M + m_M
            tl.store(m_ptr + part_M, max_M, mask=rows_M)
            tl.store(l_ptr + part_M, sum_M, mask=rows_M)
            tl.store(acc_ptr + part_M.to(tl.int64)[:, None] * R + r_R[None, :], acc_MR,
                     mask=rows_M[:, None] & (r_R < R)[None, :])
        else:  # a row without an allowed key: 0 / 0 = NaN, as the formula's softmax (padding rows divide by 1)
            o_MR = rounded(tl.math.div_rn(acc_MR, tl.where(rows_M, sum_M, 1.0)[:, None]), out_ty)
            if FUSE_V:
                head0 = tl.program_id(2) * BLOCK_M // T + tl.program_id(1) * GROUP_HEADS
                _mla_project_rows(o_MR, b, h_M, t_M, rows_M, head0, wuv_ptr, wuv_sh, wuv_sv, wuv_sr, out_ptr, T, H,
                                  R, V, BLOCK_M, BLOCK_R, BLOCK_V, CHUNK_V, GROUP_HEADS, IEEE)
            else:
                tl.store(out_ptr + (b * M + m_M)[:, None] * R + r_R[None, :], o_MR.to(out_ty),
                         mask=rows_M[:, None] & (r_R < R)[None, :])

    @triton.jit
    def _mla_project_rows(o_MR, b, h_M, t_M, rows_M, head0, wuv_ptr, wuv_sh, wuv_sv, wuv_sr, out_ptr, T, H,
                          R: tl.constexpr, V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_V: tl.constexpr, CHUNK_V: tl.constexpr, GROUP_HEADS: tl.constexpr,
                          IEEE: tl.constexpr):
        """out[b, t, h] = o_lat[b, h, t] · W_uv[h]ᵀ for the rows of a block whose head is one of the group's
        [head0, head0 + GROUP_HEADS), stored into (B, T, H, V) contiguous. Both kernels call this with the same
        block of rows, tiles and warps, so a row's projection is the same code wherever its o_lat comes from (the
        attention kernel without a split, the combine with one): the same bits, as the layout invariance needs
        (the engine's bucket may split where generate()'s keys do not).
        The rows are several heads, each with its own W_uv[h], so one tensor-core dot per head of the group (m =
        h·T + t): all rows against W_uv[h], keeping the rows of head h (the others' products are thrown away: a few
        hundred thousand MACs a program at bench_ref's size, nothing for the tensor cores; a row's dot does not
        depend on the other rows). o_MR holds values of the output dtype (rounded by the caller: the formula's
        einsum takes the rounded o_lat), so the cast is exact; the products are exact in fp32 (16-bit dtypes),
        summed in fp32, rounded once."""
        out_ty = out_ptr.dtype.element_ty
        o_MR = o_MR.to(out_ty)
        r_R = tl.arange(0, BLOCK_R)
        mine_M = rows_M & (h_M >= head0) & (h_M < head0 + GROUP_HEADS)
        out_row_M = (b * T + t_M) * H + h_M
        for v0 in tl.static_range(0, BLOCK_V, CHUNK_V):  # W_uv's tile CHUNK_V columns at a time
            v_C = v0 + tl.arange(0, CHUNK_V)
            y_MC = tl.zeros((BLOCK_M, CHUNK_V), dtype=tl.float32)
            for j in tl.static_range(GROUP_HEADS):
                h = (head0 + j).to(tl.int64)
                w_RC = tl.load(wuv_ptr + h * wuv_sh + v_C[None, :] * wuv_sv + r_R[:, None] * wuv_sr,
                               mask=(h < H) & (r_R < R)[:, None] & (v_C < V)[None, :], other=0.0)
                y_MC = tl.where((h_M == h)[:, None],
                                fp32_dot(o_MR, w_RC, tl.zeros((BLOCK_M, CHUNK_V), dtype=tl.float32), IEEE), y_MC)
            tl.store(out_ptr + out_row_M[:, None] * V + v_C[None, :], rounded(y_MC, out_ty).to(out_ty),
                     mask=mine_M[:, None] & (v_C < V)[None, :])

    @triton.jit
    def _mla_combine_kernel(m_ptr, l_ptr, acc_ptr, wuv_ptr, wuv_sh, wuv_sv, wuv_sr, out_ptr, num_splits, T, H, M,
                            R: tl.constexpr, V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK_V: tl.constexpr,
                            GROUP_HEADS: tl.constexpr, FUSE_V: tl.constexpr, IEEE: tl.constexpr):
        """One program per (batch row b, group of GROUP_HEADS heads, block of BLOCK_M query rows: the attention
        kernel's): for the block's rows of the group's heads (the others are left 0), the splits' accumulators
        rescaled to their common max and added in split order, divided by the sums rescaled alike, rounded to the
        output dtype: o_lat (B, H, T, R), or with FUSE_V its projection (``_mla_project_rows``). A split without
        an allowed key adds 0; a row without any: 0 / 0 = NaN, as the formula's softmax."""
        b = tl.program_id(0).to(tl.int64)
        head0 = tl.program_id(2) * BLOCK_M // T + tl.program_id(1) * GROUP_HEADS
        m_M = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        h_M, t_M = (m_M // T).to(tl.int64), m_M % T
        rows_M = m_M < M
        mine_M = rows_M & (h_M >= head0) & (h_M < head0 + GROUP_HEADS)
        n_N, r_R = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_R)
        part_NM = (b * num_splits + n_N[:, None]) * M + m_M[None, :]
        top_M = tl.max(tl.load(m_ptr + part_NM, mask=(n_N < num_splits)[:, None] & mine_M[None, :],
                               other=float("-inf")), axis=0)
        top_M = tl.where(top_M == float("-inf"), 0.0, top_M)
        total_M = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc_MR = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n in range(BLOCK_N):  # a constexpr count (the interpreter takes no range from runtime values)
            live_M = mine_M & (n < num_splits)
            part_M = (b * num_splits + n) * M + m_M
            max_M = tl.load(m_ptr + part_M, mask=live_M, other=float("-inf"))
            weight_M = tl.where(max_M == float("-inf"), 0.0, tl.exp(max_M - top_M))
            total_M += weight_M * tl.load(l_ptr + part_M, mask=live_M, other=0.0)
            acc_MR += weight_M[:, None] * tl.load(acc_ptr + part_M.to(tl.int64)[:, None] * R + r_R[None, :],
                                                  mask=live_M[:, None] & (r_R < R)[None, :], other=0.0)
        out_ty = out_ptr.dtype.element_ty
        o_MR = rounded(tl.math.div_rn(acc_MR, tl.where(mine_M, total_M, 1.0)[:, None]), out_ty)
        if FUSE_V:
            _mla_project_rows(o_MR, b, h_M, t_M, rows_M, head0, wuv_ptr, wuv_sh, wuv_sv, wuv_sr, out_ptr, T, H, R, V,
                              BLOCK_M, BLOCK_R, BLOCK_V, CHUNK_V, GROUP_HEADS, IEEE)
        else:
            tl.store(out_ptr + (b * M + m_M)[:, None] * R + r_R[None, :], o_MR.to(out_ty),
                     mask=mine_M[:, None] & (r_R < R)[None, :])
