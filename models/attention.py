"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3) and its latent KV cache.

Two ways to compute the same function:

- **Expanded (training) path**, used when no cache is given: the latent is up-projected to
  per-head keys/values and fed to ``F.scaled_dot_product_attention(is_causal=True)``. MLA's value
  head (v_head_dim) may be smaller than the query/key head (qk_nope + qk_rope). torch 2.11 on the
  H100 runs that directly on cuDNN's flash kernel, which measured ~2 % faster for a whole
  bench_ref step than zero-padding the value to the q/k size (as the older flash kernel needs);
  ``MLA.pad_v_on_cuda = True`` switches padding on (padded columns are zero and sliced off).
- **Absorbed (inference) path**, used with an ``MLACache``: kv_b_proj splits into the key
  up-projection W_uk (H, nope, R) and the value up-projection W_uv (H, v, R). W_uk is folded into
  the query (q_lat = q_nope · W_uk) and W_uv into the output, so attention runs directly over the
  cached latent (R = kv_lora_rank values, post-RMSNorm) plus the shared RoPE key (P values):
  R + P values per token per layer. The latent acts as one key/value head shared by all heads:
  decode-sized calls use two plain bmm's over it, long prefills a fused SDPA kernel. Writing a step's latent and
  RoPE key into the cache (and rotating the queries) may take one Triton launch (``MLA.fused_cache_write``).

Parameter names are Hugging Face DeepseekV3's (q_proj | q_a_proj, q_a_layernorm, q_b_proj;
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj), so export is a key copy.

Shape suffixes: B batch, T new tokens, S key slots, H heads, C q/k head dim (nope + rope),
N nope dim, P rope dim, V value head dim, R kv_lora_rank, D hidden.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm, RotaryEmbedding


class MLACache:
    """Latent KV cache: per layer one buffer ``kv[l]`` (B, S_max, R + P): the latent ``kv_latent[l]`` (B, S_max, R)
    and the RoPE key ``k_rope[l]`` (B, S_max, P) are views of its two column ranges. Attention reads the whole
    row as the key (latent ‖ RoPE) and its first R columns as the value, so a decode step concatenates
    nothing (two separate buffers cost a copy of the cache's live width per layer and step: 29 µs of a
    1.6 ms compiled decode step at batch 32 on an H100, benchmarks/profile_decode.py).

    Slots are filled left to right, all rows in step. Padding is per row: ``key_mask_BS`` marks
    slots holding real tokens (1 in the ``attention_mask_BS`` passed to the model), and
    ``num_real_B`` counts each row's real tokens so far (the next RoPE position of that row).
    Two ways to advance:

    - dynamic (default): the model writes slots [length, length + T) and attends over
      [0, length + T); ``length`` (a Python int) then grows by T.
    - static (CUDA-graph friendly): the caller passes ``cache_position`` (T,) int64 on the device;
      the model writes those slots and attends over all S_max slots (unwritten ones are masked
      out by ``key_mask_BS``). ``length`` is not touched: the caller owns the position.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.batch_size, self.max_len = batch_size, max_len
        self.kv = [torch.zeros(batch_size, max_len, kv_lora_rank + rope_dim, device=device, dtype=dtype)
                   for _ in range(num_layers)]
        self.split_views(kv_lora_rank)
        self.key_mask_BS = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.num_real_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        # 0..max_len-1 once: a step's slots and the mask's key slots are views of it (no arange launch a step)
        self.slot_ids_S = torch.arange(max_len, device=device)
        self.length = 0

    def split_views(self, kv_lora_rank: int) -> None:
        """(Re)derive ``kv_latent`` / ``k_rope`` from ``kv`` (after ``kv`` was replaced by views of it)."""
        self.kv_latent = [t[..., :kv_lora_rank] for t in self.kv]
        self.k_rope = [t[..., kv_lora_rank:] for t in self.kv]

    @classmethod
    def for_config(cls, cfg: ModelConfig, batch_size: int, max_len: int, device=None,
                   dtype: torch.dtype = torch.float32, include_mtp: bool = False) -> "MLACache":
        num_layers = cfg.num_layers + (cfg.mtp_depth if include_mtp else 0)
        return cls(num_layers, batch_size, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, device, dtype)

    def bytes_per_token(self) -> int:
        """Cache bytes per token, all layers (MLA: (R + P) × layers × element size)."""
        per_layer = self.kv_latent[0].shape[-1] + self.k_rope[0].shape[-1]
        return per_layer * len(self.kv_latent) * self.kv_latent[0].element_size()

    def reset(self) -> None:
        self.key_mask_BS.zero_()
        self.num_real_B.zero_()
        self.length = 0


@dataclass
class CacheStep:
    """What one forward does with a cache: write new tokens to ``slots_T``, attend over [0, num_keys)."""

    cache: MLACache
    slots_T: torch.Tensor
    num_keys: int
    mask_B1TS: torch.Tensor  # bool, True = may attend
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # the step's (cos, sin) where the fused cache step made them
    # the caller's word that this step appends one generated token a row (generate()'s and the serving engine's decode
    # steps), not prompt tokens: only such a step may take the fused decode attention (``MLA.fused_decode_attention``)
    decode: bool = False


def prepare_attention(input_ids_BT: torch.Tensor, positions: torch.Tensor | None,
                      attention_mask_BS: torch.Tensor | None, cache: MLACache | None,
                      cache_position: torch.Tensor | None, document_ids_BT: torch.Tensor | None = None,
                      rotary: RotaryEmbedding | None = None, decode: bool = False):
    """RoPE positions (B, T), the boolean attention mask (B, 1, T, S) or None (plain causal), and the
    cache step (None without a cache). With a cache this also writes the key mask / real-token counts
    and advances ``cache.length`` (dynamic mode). See ``MoETransformer`` for the argument semantics.

    A one-token cache step with ``rotary`` given may take one Triton launch (kernels/cache_step.py) for the key
    mask, the counts, the positions, the mask and the step's RoPE cos/sin (then in ``CacheStep.rope``), see
    ``MLA.fused_cache_step``; positions not given.
    Bit-equal: integers and booleans, and cos/sin rows copied from ``RotaryEmbedding.table``."""
    B, T = input_ids_BT.shape
    dev = input_ids_BT.device
    if document_ids_BT is not None:
        if cache is not None or attention_mask_BS is not None:
            raise ValueError("document_ids_BT is for packed training rows: not with a cache or attention_mask_BS")
        return document_attention(document_ids_BT.to(dev), positions)
    if cache is None:
        if attention_mask_BS is None:
            pos = positions if positions is not None else torch.arange(T, device=dev).expand(B, T)
            return pos, None, None
        real_BT = attention_mask_BS.to(device=dev, dtype=torch.bool)
        if real_BT.shape != (B, T):
            raise ValueError(f"attention_mask_BS shape {tuple(real_BT.shape)} != input_ids {(B, T)} (no cache)")
        pos = positions if positions is not None else (real_BT.long().cumsum(1) - 1).clamp_min(0)
        q_T = torch.arange(T, device=dev)
        return pos, _attention_mask(q_T, q_T, real_BT), None
    if cache_position is None:
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"cache full: {start} + {T} tokens > max_len {cache.max_len}")
        slots_T, num_keys = _slot_ids(cache, dev)[start:start + T], start + T
        cache.length = start + T
    else:
        slots_T, num_keys = cache_position.to(dev), cache.max_len
    if positions is None and T == 1 and rotary is not None:
        fused = _fused_cache_step(attention_mask_BS, slots_T, cache, num_keys, rotary)
        if fused is not None:
            positions, mask, cos, sin = fused
            return positions, mask, CacheStep(cache, slots_T, num_keys, mask, (cos, sin), decode)
    new_real_BT = (attention_mask_BS[:, -T:].to(device=dev, dtype=torch.bool) if attention_mask_BS is not None
                   else torch.ones(B, T, dtype=torch.bool, device=dev))
    cache.key_mask_BS.index_copy_(1, slots_T, new_real_BT)
    if positions is None:
        # one token: the cumsum term is 0, the position is the count (copied: the counts advance below)
        positions = (cache.num_real_B[:, None].clone() if T == 1
                     else cache.num_real_B[:, None] + (new_real_BT.long().cumsum(1) - 1).clamp_min(0))
    cache.num_real_B.add_(new_real_BT[:, 0] if T == 1 else new_real_BT.sum(1))
    mask = _attention_mask(slots_T, _slot_ids(cache, dev)[:num_keys], cache.key_mask_BS[:, :num_keys])
    return positions, mask, CacheStep(cache, slots_T, num_keys, mask, None, decode)


def _slot_ids(cache: MLACache, device: torch.device) -> torch.Tensor:
    """0..max_len-1 on ``device``: the cache's (a view of it, no launch) where it has them there."""
    ids = getattr(cache, "slot_ids_S", None)
    if ids is None or ids.device != device or ids.shape[0] < cache.max_len:
        return torch.arange(cache.max_len, device=device)
    return ids


def _fused_cache_step(attention_mask_BS, slots_T, cache: MLACache, num_keys: int, rotary: RotaryEmbedding):
    """kernels.cache_step's (positions, mask, cos, sin) of a one-token step, or None where it does not apply
    (then nothing was written)."""
    dev = cache.key_mask_BS.device
    # is_compiling first: under torch.compile nothing else is read, so no guard on the switch
    if torch.compiler.is_compiling() or not MLA.fused_cache_step or dev.type not in MLA.kernel_devices:
        return None
    from .kernels import cache_step  # imports triton, an optional dependency CPU training need not load

    real_B1 = attention_mask_BS[:, -1:] if attention_mask_BS is not None else None
    # positions < the cache's slots (a row's real tokens each hold one): a table of max_len rows covers them
    table_NP = rotary.table(cache.max_len, dev) if cache_step.HAS_TRITON else None
    if table_NP is None or not cache_step.kernel_applies(real_B1, slots_T, cache.key_mask_BS, cache.num_real_B,
                                                         num_keys, table_NP):
        return None
    return cache_step.cache_step(real_B1, slots_T, cache.key_mask_BS, cache.num_real_B, num_keys, table_NP)


def document_attention(document_ids_BT: torch.Tensor, positions: torch.Tensor | None = None):
    """Packed rows of several documents: block-diagonal causal mask and per-document positions.

    A token attends only to earlier tokens of its own document, and RoPE positions restart at 0 at
    each document start, so every document computes exactly what it would alone. Documents are
    runs of equal ids (a change of id starts a new one). Returns (positions (B, T), mask, None): the
    mask is a bool (B, 1, T, T) tensor for SDPA, or on the flex path (``MLA.document_kernel``; by
    default on CUDA) a FlexAttention ``BlockMask``, which skips the blocks between documents instead of
    materialising T×T booleans and losing SDPA's fused causal kernels.
    """
    B, T = document_ids_BT.shape
    dev = document_ids_BT.device
    starts_BT = torch.ones(B, T, dtype=torch.bool, device=dev)
    starts_BT[:, 1:] = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
    run_BT = starts_BT.long().cumsum(dim=1)  # 1, 1, 2, 2, 2, 3, ...: a repeated id later is a new document
    if positions is None:
        idx_BT = torch.arange(T, device=dev).expand(B, T)
        # index of each token's document start: running max of the start positions
        start_idx_BT = torch.where(starts_BT, idx_BT, torch.zeros_like(idx_BT)).cummax(dim=1).values
        positions = idx_BT - start_idx_BT
    if _use_flex(dev):
        return positions, _document_block_mask(run_BT), None
    same_BTT = run_BT[:, :, None] == run_BT[:, None, :]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    return positions, (same_BTT & causal_TT[None])[:, None], None


def _use_flex(device: torch.device) -> bool:
    kernel = MLA.document_kernel
    if kernel not in ("auto", "flex", "sdpa"):
        raise ValueError(f"MLA.document_kernel={kernel!r}: expected 'auto', 'flex' or 'sdpa'")
    return kernel == "flex" or (kernel == "auto" and device.type == "cuda")


def _document_block_mask(run_BT: torch.Tensor):
    """FlexAttention BlockMask of the block-diagonal causal mask over document runs (B, T)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = run_BT.shape

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (run_BT[b, q_idx] == run_BT[b, kv_idx])

    return create_block_mask(same_document_causal, B, None, T, T, device=run_BT.device)


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process (its fused kernel); built on first use, not at import."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


FLEX_MIN_HEAD_DIM = 16  # flex's Triton kernel refuses head dims below this ("NYI: ... at least 16")


def _flex_attention(q_BHTC, k_BHTC, v_BHTV, block_mask, scale: float) -> torch.Tensor:
    """flex_attention: compiled on CUDA; eager elsewhere (a slow but exact reference, used by the CPU tests).

    Head dims under 16 (small test and toy configs) are zero-padded to 16, which is exact: zero
    columns add nothing to q·k (the scale is passed explicitly) and give zero output columns of v,
    which are cut off again.
    """
    V = v_BHTV.shape[-1]
    if q_BHTC.shape[-1] < FLEX_MIN_HEAD_DIM:
        pad = FLEX_MIN_HEAD_DIM - q_BHTC.shape[-1]
        q_BHTC, k_BHTC = F.pad(q_BHTC, (0, pad)), F.pad(k_BHTC, (0, pad))
    if V < FLEX_MIN_HEAD_DIM:
        v_BHTV = F.pad(v_BHTV, (0, FLEX_MIN_HEAD_DIM - V))
    if q_BHTC.device.type != "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        out_BHTV = flex_attention(q_BHTC, k_BHTC, v_BHTV, block_mask=block_mask, scale=scale)
    else:
        out_BHTV = _compiled_flex()(q_BHTC, k_BHTC, v_BHTV, block_mask=block_mask, scale=scale)
    return out_BHTV[..., :V]


def _attention_mask(q_slots_T, k_slots_S, key_real_BS) -> torch.Tensor:
    """Causal over slots, keys limited to real tokens, but every query always sees its own slot."""
    causal_TS = k_slots_S[None, :] <= q_slots_T[:, None]
    self_TS = k_slots_S[None, :] == q_slots_T[:, None]
    return (causal_TS[None] & (key_real_BS[:, None, :] | self_TS[None]))[:, None]


class MLA(nn.Module):
    pad_v_on_cuda = False
    # document-masked training rows: "auto" = FlexAttention BlockMask on CUDA, dense SDPA mask elsewhere;
    # "flex" / "sdpa" force one (tests compare the two; the GPU benchmark measures both)
    document_kernel = "auto"
    absorbed_bmm_max_scores = 2**25  # absorbed path: explicit bmm attention up to this many scores
    # A cache step's latent write (kv_a_layernorm, the shared key's RoPE, cat, cast, index_copy_) and the queries'
    # RoPE in one Triton launch (kernels/mla_prep.py) instead of 21 (5 with the fused RoPE) where it is safe, the
    # rules of ``RMSNorm.fused_inference``: a cache step (the training / expanded path never takes it), no gradient
    # needed, a device in ``kernel_devices``, not while torch.compile traces (inductor fuses the formula; the kernel
    # is no op it could trace), Triton importable (``kernels.mla_prep.kernel_applies`` has the rest). Bit-equal to
    # the unfused path with the fused RMSNorm (the same norm arithmetic; RoPE, cat, cast and copy are exact), and
    # generate() and the serving engine both take it, so greedy engine output still equals generate()'s. On by
    # default since it ran on a GPU (H200, 2026-12-07, RESULTS.md "Serving"): its GPU tests passed (bit-equal), and
    # the default graph engine step ran 942 vs 773 tok/s at batch 1 and 18,253 vs 15,541 at batch 32 with it (same
    # call). benchmarks/bench_decode.py "+nocachewrite" is the row without it.
    fused_cache_write: bool = True
    # Decode-sized absorbed attention (the bmm branch: cat, bmm, cast, masked_fill, scale, softmax, cast, bmm: 8
    # kernels a layer, and the einsum with W_uv after them) as one Triton launch, two with a key split
    # (kernels/mla_decode.py), where it is safe, the rules of ``RMSNorm.fused_inference`` (no gradient needed, a
    # device in ``kernel_devices``, Triton importable, one-token decode steps (``mla_decode.MAX_T``):
    # ``kernel_applies`` has the rest), and under torch.compile too, as a custom op opaque to the compiler (inductor
    # has no fused kernel for the two bmm's). The same function up to
    # fp32 sum order, except that its scores stay fp32 where the formula rounds them to the queries' dtype (closer
    # to float64, tested); generate() and the serving engine both take it. Measured on a GPU (H200, 2026-12-07,
    # RESULTS.md "Serving"): the default graph engine step ran 838 vs 773 tok/s at batch 1 and 16,712 vs 15,541 at
    # batch 32 with it (same call), and its GPU tests passed except engine == generate(), which failed while
    # multi-token prefill chunks took the kernel (hence MAX_T = 1 since; the interpreter test of exactly that
    # passes). With MAX_T = 1 (H100, 2026-12-07 late) the row gained again (1,396 vs 1,213 tok/s at batch 1, 22,488
    # vs 20,577 at 32) but engine == generate() still failed (request 3, a 30-token prompt prefilled in 8-token
    # chunks, parted at its fourth token). The cause: the kernel's output depended on where a row's keys sit among
    # the cache's columns (the engine's right-aligned slot rows vs generate()'s [0, n); kernels/mla_decode.py
    # "Layout invariance"). Unrounded numerators alone (the next H100 call: 1,380 vs 1,216 tok/s, 22,365 vs 20,502)
    # still failed both engine tests; the key blocks now also start at the row's first allowed key. On the H100
    # (2026-12-08) that made the layout test bit-equal on the GPU too (and the row 1,617 vs 1,472 tok/s at batch 1,
    # 23,721 vs 22,214 at 32 against the new defaults), but both engine tests still failed: not the layout, the
    # path. The engine's prefill planner gives a prompt a 1-token chunk where one token of a step's budget is left;
    # T = 1 took the kernel there while generate()'s whole-prompt prefill took the formula. So only calls marked
    # ``decode=True`` take it now (``CacheStep.decode``: generate()'s and the engine's decode steps; a CPU test
    # counts no kernel call in any prefill chunk). Not yet re-run on a GPU. The value up-projection after it (the
    # einsum of o_lat with W_uv) now runs in the same launches (``w_uv_HVR``: in the combine with a key split, in the
    # attention kernel's epilogue without; ``fused_value_projection``): one launch a layer fewer (a bench_ref step
    # 103 -> 95 counted on the CPU, benchmarks/count_decode_launches.py --modes +mla), its output that einsum's up to
    # fp32 sum order (its rounding points: o_lat rounded first), not yet measured on a GPU. Off by default until the
    # engine tests pass on a GPU: `bash benchmarks/gpu_kernels.sh`, engine modes "+mla", "+mla+novproj".
    fused_decode_attention: bool = False
    # With the fused decode attention: the value up-projection in its launches (above) or the einsum after it
    # (False: benchmarks/bench_decode.py "+mla+novproj", the row that says what the fold buys on a GPU).
    fused_value_projection: bool = True
    # A one-token cache step's bookkeeping before the first layer (the key mask's slot, the real-token counts, the
    # RoPE positions, the boolean mask: 13 kernels) and its RoPE cos/sin (6 more, ``RotaryEmbedding.forward``) as one
    # Triton launch (kernels/cache_step.py, ``prepare_attention``), where it is safe, the rules of
    # ``RMSNorm.fused_inference`` (a device in ``kernel_devices``, not while torch.compile traces, Triton importable;
    # ``kernel_applies`` has the rest). Bit-equal (integers and booleans; cos/sin rows copied from
    # ``RotaryEmbedding.table``, the formula's own values), generate() and the serving engine both take it. On by
    # default (bit-equal). On a GPU (H100, 2026-12-07 late): the default graph engine step ran 1,213 vs 1,187 tok/s
    # at batch 1 and 20,577 vs 20,130 at batch 32 with it, its 128 tokens × 32 rows equal to the row without it, and
    # the other kernels' graphed engine == generate() GPU tests passed with it on; its own GPU tests
    # (tests/test_cache_step_kernel.py) all passed on the H100 on 2026-12-08 (bit-equal, no sync, graph replay,
    # graphed engine == generate() and == the switch off): +2.4 % at batch 1, +2.2 % at 32 that call.
    # benchmarks/bench_decode.py "+nocachestep" is the row without it.
    fused_cache_step: bool = True
    # where those kernels may run; the CPU tests add "cpu" to run them in Triton's interpreter
    kernel_devices: tuple[str, ...] = ("cuda",)

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.softmax_scale = cfg.softmax_scale()
        d, h = cfg.hidden_size, cfg.num_heads
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)
            # HF builds q_a_layernorm and kv_a_layernorm with the default eps (1e-6), not rms_norm_eps.
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * self.qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d, h * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=False)

    # ------------------------------------------------------------------ shared projections
    def _queries(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries' no-RoPE and (not yet rotated) RoPE parts, views of one projection."""
        B, T, _ = x_BTD.shape
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        else:
            q = self.q_proj(x_BTD)
        q_BTHC = q.view(B, T, self.num_heads, self.qk_dim)
        q_nope_BTHN, q_rope_BTHP = q_BTHC.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope_BTHN, q_rope_BTHP

    def _latent(self, kv_a_BTX: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        kv_lat_BTR, k_rot_BTP = kv_a_BTX.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(kv_lat_BTR), RotaryEmbedding.rotate(k_rot_BTP, cos, sin)

    def _fused_cache_write(self, kv_a_BTX, q_rope_BTHP, cos, sin, step: CacheStep | None) -> torch.Tensor | None:
        """The rotated query RoPE part, the new tokens' latent and RoPE key written to the cache in the same launch;
        None where the kernel does not apply (see ``fused_cache_write``): then nothing was written."""
        # is_compiling first: under torch.compile nothing else is read, so no guard on the switch
        if (torch.compiler.is_compiling() or step is None or not self.fused_cache_write
                or kv_a_BTX.device.type not in self.kernel_devices):
            return None
        from .kernels import mla_prep  # imports triton, an optional dependency CPU training need not load

        norm, cache_BSX = self.kv_a_layernorm, step.cache.kv[self.layer_idx]
        if not mla_prep.kernel_applies(kv_a_BTX, q_rope_BTHP, norm.weight, cos, sin, cache_BSX, step.slots_T):
            return None
        return mla_prep.mla_prep(kv_a_BTX, q_rope_BTHP, norm.weight, norm.eps, cos, sin, cache_BSX, step.slots_T)

    def forward(self, x_BTD: torch.Tensor, cos_BTp: torch.Tensor, sin_BTp: torch.Tensor,
                mask_B1TS: torch.Tensor | None = None, step: CacheStep | None = None) -> torch.Tensor:
        """mask_B1TS (bool, True = attend) replaces the causal mask when given; step selects the absorbed path."""
        q_nope, q_rope = self._queries(x_BTD)
        kv_a_BTX = self.kv_a_proj_with_mqa(x_BTD)
        q_rot = self._fused_cache_write(kv_a_BTX, q_rope, cos_BTp, sin_BTp, step)
        if q_rot is not None:
            kv_lat = k_rot = None  # in the cache already
        else:
            q_rot = RotaryEmbedding.rotate(q_rope, cos_BTp, sin_BTp)
            kv_lat, k_rot = self._latent(kv_a_BTX, cos_BTp, sin_BTp)
        if step is not None:
            out_BTHV = self._absorbed(q_nope, q_rot, kv_lat, k_rot, step)
        else:
            out_BTHV = self._expanded(q_nope, q_rot, kv_lat, k_rot, mask_B1TS)
        B, T = x_BTD.shape[:2]
        return self.o_proj(out_BTHV.reshape(B, T, self.num_heads * self.v_dim))

    # ------------------------------------------------------------------ training path
    def _expanded(self, q_nope_BTHN, q_rot_BTHP, kv_lat_BTR, k_rot_BTP, mask_B1TS) -> torch.Tensor:
        B, T, H, _ = q_nope_BTHN.shape
        kv_BTHX = self.kv_b_proj(kv_lat_BTR).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope_BTHN, v_BTHV = kv_BTHX.split([self.nope_dim, self.v_dim], dim=-1)
        q_BTHC = torch.cat([q_nope_BTHN, q_rot_BTHP], dim=-1)
        k_BTHC = torch.cat([k_nope_BTHN, k_rot_BTP[:, :, None, :].expand(B, T, H, self.rope_dim)], dim=-1)
        if mask_B1TS is not None and not torch.is_tensor(mask_B1TS):  # a BlockMask: the flex path
            out_BHTV = _flex_attention(q_BTHC.transpose(1, 2), k_BTHC.transpose(1, 2), v_BTHV.transpose(1, 2),
                                       mask_B1TS, self.softmax_scale)
            return out_BHTV.transpose(1, 2)
        pad = self.qk_dim - self.v_dim if (q_BTHC.is_cuda and self.pad_v_on_cuda) else 0
        if pad > 0:
            v_BTHV = F.pad(v_BTHV, (0, pad))
        out_BHTV = F.scaled_dot_product_attention(
            q_BTHC.transpose(1, 2), k_BTHC.transpose(1, 2), v_BTHV.transpose(1, 2),
            attn_mask=mask_B1TS, is_causal=mask_B1TS is None, scale=self.softmax_scale)
        out_BTHV = out_BHTV.transpose(1, 2)
        return out_BTHV[..., : self.v_dim] if pad > 0 else out_BTHV

    # ------------------------------------------------------------------ inference path
    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk (H, N, R) and W_uv (H, V, R), views of kv_b_proj.weight."""
        w_HXR = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w_HXR[:, : self.nope_dim], w_HXR[:, self.nope_dim:]

    def _absorbed(self, q_nope_BTHN, q_rot_BTHP, kv_lat_BTR, k_rot_BTP, step: CacheStep) -> torch.Tensor:
        cache, i = step.cache, self.layer_idx
        if kv_lat_BTR is not None:  # else MLA._fused_cache_write wrote them
            cache.kv[i].index_copy_(1, step.slots_T, torch.cat([kv_lat_BTR, k_rot_BTP], dim=-1).to(cache.kv[i].dtype))
        k_BSX = cache.kv[i][:, : step.num_keys].to(q_nope_BTHN.dtype)  # the key: latent ‖ RoPE key, one view
        kv_lat_BSR = k_BSX[..., : self.kv_lora_rank]                     # the value: the latent columns of it
        w_uk_HNR, w_uv_HVR = self.absorbed_weights()
        q_lat_BHTR = torch.einsum("bthn,hnr->bhtr", q_nope_BTHN, w_uk_HNR)
        w_uv_fused = w_uv_HVR if self.fused_value_projection else None
        fused = self._fused_decode(q_lat_BHTR, q_rot_BTHP, cache.kv[i], w_uv_fused, step)
        if fused is not None:  # the block below (cat → second bmm) and the final einsum in one or two launches
            out = fused(q_lat_BHTR, q_rot_BTHP, cache.kv[i], step.mask_B1TS, step.num_keys, self.softmax_scale,
                        w_uv_fused)
            return out if w_uv_fused is not None else torch.einsum("bhtr,hvr->bthv", out, w_uv_HVR)
        q_BHTX = torch.cat([q_lat_BHTR, q_rot_BTHP.transpose(1, 2)], dim=-1)
        B, H, T, X = q_BHTX.shape
        if B * H * T * step.num_keys <= self.absorbed_bmm_max_scores:
            # Decode-sized: two bmm's over the single latent "kv head" (no per-head copies) and an
            # fp32 masked softmax; far fewer kernel launches than SDPA's math fallback.
            scores_BHTS = torch.bmm(q_BHTX.reshape(B, H * T, X), k_BSX.transpose(1, 2)).view(B, H, T, -1)
            scores_BHTS = scores_BHTS.to(torch.promote_types(scores_BHTS.dtype, torch.float32))
            # where(mask, s, −inf): masked_fill(~mask, −inf)'s values in one launch (no inverted mask)
            scores_BHTS = torch.where(step.mask_B1TS, scores_BHTS, float("-inf")) * self.softmax_scale
            probs_BQS = scores_BHTS.softmax(dim=-1).to(kv_lat_BSR.dtype).view(B, H * T, -1)
            o_lat_BHTR = torch.bmm(probs_BQS, kv_lat_BSR).view(B, H, T, -1)
        else:  # long prefill: a fused kernel, heads expanded as views
            o_lat_BHTR = F.scaled_dot_product_attention(
                q_BHTX, k_BSX[:, None].expand(B, H, -1, X), kv_lat_BSR[:, None].expand(B, H, -1, self.kv_lora_rank),
                attn_mask=step.mask_B1TS, scale=self.softmax_scale)
        return torch.einsum("bhtr,hvr->bthv", o_lat_BHTR, w_uv_HVR)

    def _fused_decode(self, q_lat_BHTR, q_rot_BTHP, kv_BSX, w_uv_HVR, step: CacheStep):
        """The fused decode attention (kernels/mla_decode.py), with the value up-projection where
        ``fused_value_projection`` (``w_uv_HVR`` None: without), where ``fused_decode_attention`` may take this call
        (a decode step, decode-sized: the bmm branch's bound, and ``kernel_applies``): its launcher, or under
        torch.compile its custom op (opaque to the compiler); else None."""
        if (not self.fused_decode_attention or not step.decode or q_lat_BHTR.device.type not in self.kernel_devices
                or q_lat_BHTR.numel() // q_lat_BHTR.shape[-1] * step.num_keys > self.absorbed_bmm_max_scores):
            return None
        from .kernels import mla_decode  # imports triton, an optional dependency CPU training need not load

        if not mla_decode.kernel_applies(q_lat_BHTR, q_rot_BTHP, kv_BSX, step.mask_B1TS, step.num_keys, w_uv_HVR):
            return None
        return mla_decode.mla_decode_attention_op if torch.compiler.is_compiling() else mla_decode.mla_decode_attention
