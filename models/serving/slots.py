"""SlotCache: a preallocated latent (MLA) cache whose rows are slots that requests take and give back.

``MLACache`` advances all rows in step: one decode call writes the same column of every row. That
is kept, so a decode step stays one fixed-shape model call over ``MLACache``'s absorbed path. Rows
hold sequences of different lengths by being RIGHT-ALIGNED at a shared cursor ``c`` (the next
column to write): row b occupies columns [c - len_b, c); earlier columns are masked out
(``key_mask_BS`` False) and RoPE positions come from ``num_real_B`` = len_b, exactly as a
left-padded row of ``generate`` behaves.

- A request's prompt is prefilled in its own batch-1 staging cache (in chunks), then
  ``insert`` copies its latents into a free row, right-aligned at the cursor. The cursor moves
  every decode step, so the final columns are known only when prefill ends; the copy is
  prompt × (kv_lora_rank + rope_dim) × layers values, small beside the prefill itself.
- When the cursor would pass the end (or is left of a longer new prompt), ``_rebase`` shifts
  every row so the cursor sits at the longest live row: the cache is compacted, no row is lost.
  With ``max_len`` = 2 × the context this happens at most once per context-length of steps.
- ``rows_view(n)`` is an ``MLACache`` over rows [0, n) (views, not copies), so a decode step
  skips trailing free rows; free rows below n are computed and ignored (masked, never attended).
  ``static_view(n, w)`` also cuts the columns to [0, w), for the static (CUDA-graph) step: its
  addresses do not move with the cursor, because every write here is in place.

Shape suffixes: B slots, S columns, R kv_lora_rank, P rope dim.
"""

from __future__ import annotations

import torch

from ..attention import MLACache


class SlotCache:
    def __init__(self, model, num_slots: int, context_len: int, max_len: int | None = None,
                 device=None, dtype: torch.dtype | None = None) -> None:
        self.context_len = context_len
        self.max_len = max_len or 2 * context_len
        if self.max_len < context_len + 1:
            raise ValueError(f"SlotCache: max_len {self.max_len} must exceed the context {context_len}")
        self.cache: MLACache = model.new_cache(num_slots, self.max_len, device=device, dtype=dtype)
        self.num_slots = num_slots
        self.cursor = 0
        self.lengths = [0] * num_slots        # tokens held per row (0 = free)
        self.live = [False] * num_slots
        self.num_rebases = 0                  # cursor moves (statistics)
        self.num_compactions = 0              # ... of them leftwards, to make room

    # ------------------------------------------------------------------ slots
    def free_slot(self) -> int | None:
        """The lowest free row (lowest first keeps ``rows_view`` short)."""
        for b, used in enumerate(self.live):
            if not used:
                return b
        return None

    def num_live(self) -> int:
        return sum(self.live)

    def release(self, b: int) -> None:
        self.live[b] = False
        self.lengths[b] = 0
        self.cache.key_mask_BS[b].zero_()
        self.cache.num_real_B[b] = 0

    def insert(self, b: int, staging: MLACache, num_tokens: int, row: int = 0, start: int = 0) -> None:
        """Copy ``num_tokens`` prefilled columns of ``staging`` (row ``row`` from column ``start``: a
        left-padded batch prefill keeps a prompt at the right end of its row) into row b, right-aligned
        at the cursor."""
        if self.live[b]:
            raise ValueError(f"SlotCache.insert: slot {b} is in use")
        if num_tokens > self.context_len:
            raise ValueError(f"SlotCache.insert: {num_tokens} tokens > context {self.context_len}")
        if self.cursor < num_tokens or self.cursor + 1 > self.max_len:
            self._rebase(max([num_tokens] + [n for n, up in zip(self.lengths, self.live) if up]))
        c, n = self.cursor, num_tokens
        for dst, src in zip(self.cache.kv, staging.kv):
            dst[b, c - n: c] = src[row, start: start + n].to(dst.dtype)
        self.cache.key_mask_BS[b].zero_()
        self.cache.key_mask_BS[b, c - n: c] = True
        self.cache.num_real_B[b] = n
        self.lengths[b], self.live[b] = n, True

    def prepare_step(self) -> None:
        """Make room for one more column before a decode step."""
        if self.cursor + 1 > self.max_len:
            self._rebase(max(n for n, up in zip(self.lengths, self.live) if up))

    def advance(self, live_rows: list[int]) -> None:
        """After a decode step wrote column ``cursor`` for ``live_rows``."""
        self.cursor += 1
        for b in live_rows:
            self.lengths[b] += 1

    def rows_view(self, num_rows: int) -> MLACache:
        """An MLACache over rows [0, num_rows) sharing this cache's storage, positioned at the cursor."""
        c = self.cache
        view = MLACache.__new__(MLACache)
        view.batch_size, view.max_len = num_rows, c.max_len
        view.kv = [t[:num_rows] for t in c.kv]
        view.split_views(c.kv_latent[0].shape[-1])
        view.key_mask_BS = c.key_mask_BS[:num_rows]
        view.num_real_B = c.num_real_B[:num_rows]
        view.slot_ids_S = c.slot_ids_S
        view.length = self.cursor
        return view

    def static_view(self, num_rows: int, num_cols: int) -> MLACache:
        """An MLACache over rows [0, num_rows) and columns [0, num_cols) for the STATIC mode (the caller
        passes ``cache_position``): fixed addresses whatever the cursor, so a CUDA graph can replay it."""
        if num_cols > self.max_len or num_rows > self.num_slots:
            raise ValueError(f"SlotCache.static_view: {num_rows} x {num_cols} exceeds {self.num_slots} x {self.max_len}")
        view = self.rows_view(num_rows)
        view.max_len = num_cols
        view.kv = [t[:, :num_cols] for t in view.kv]
        view.split_views(self.cache.kv_latent[0].shape[-1])
        view.key_mask_BS = view.key_mask_BS[:, :num_cols]
        return view

    # ------------------------------------------------------------------ compaction
    def _rebase(self, new_cursor: int) -> None:
        """Shift every row so that the cursor becomes ``new_cursor`` (>= the longest live row)."""
        width = max([0] + [n for n, up in zip(self.lengths, self.live) if up])
        if new_cursor < width or new_cursor > self.max_len:
            raise ValueError(f"SlotCache._rebase: cursor {new_cursor} cannot hold {width} tokens in {self.max_len}")
        old = self.cursor
        c = self.cache
        for t in c.kv:
            block = t[:, old - width: old].clone()
            t[:, new_cursor - width: new_cursor] = block
        mask = c.key_mask_BS[:, old - width: old].clone()
        c.key_mask_BS.zero_()
        c.key_mask_BS[:, new_cursor - width: new_cursor] = mask
        self.cursor = new_cursor
        self.num_rebases += 1
        self.num_compactions += new_cursor < old
