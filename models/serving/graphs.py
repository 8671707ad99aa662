"""CUDA-graph decode steps for the serving engine, at a few (batch, key-width) buckets.

A decode step of the engine is one model call over the rows [0, n) of the ``SlotCache`` that attends
to the columns [0, cursor + 1). On a GPU at small batch, launching its few hundred kernels costs
more than running them; a captured CUDA graph replays them with one launch. A graph replays fixed
shapes and addresses, so the step is captured per BUCKET: ``b`` rows (n rounded up to a bucket
<= the number of slots) and ``w`` key columns (cursor + 1 rounded up to a bucket <= the cache's
columns). Rows and columns past the live ones are what the eager path also carries: rows that are
free (their token is masked, their output ignored) and columns masked out by ``key_mask_BS``.

The step runs in the cache's STATIC mode (``MLACache``: ``cache_position`` on the device, attention
over all ``w`` columns of the view under the key mask), over views of the slot cache's storage
(``SlotCache.static_view``). Those views are fixed addresses because the slot cache is allocated
once and ``insert`` / ``release`` / ``_rebase`` write it in place. Inputs go through fixed buffers
(the input token per row, which the engine's sampler writes on the device (``tokens_B``), the
real-token flag per row, the cursor); the logits come back in a fixed buffer, valid until the next
replay.

``StaticDecoder(..., capture=False)`` runs the same bucketed static step eagerly: that is the CPU
path of this code (tests check it equals ``generate`` token for token) and the GPU fallback.
``capture=True`` (CUDA) captures each bucket on first use, all buckets in one memory pool.
``compile="inductor"`` runs (and captures) the step compiled by ``generation.compile_decode_step``
instead of the eager model: the fused step that made ``generate``'s graph path ~2x faster. Its
first shapes compile (``capture_all`` does it before traffic); tests check the compiled step equals
the eager one on the CPU (inductor's C++ backend).

Shape suffixes: B rows of a bucket, V vocab.
"""

from __future__ import annotations

import torch

from ..generation import compile_decode_step
from .sampling import host_to_device


def buckets_up_to(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from ``smallest`` below ``limit``, then ``limit`` itself: 1, 2, 4, ..., limit."""
    out, b = [], max(1, smallest)
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket_for(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} is above the largest bucket {buckets[-1]}")


class StaticDecoder:
    """Bucketed static decode steps over a ``SlotCache``, captured as CUDA graphs when ``capture``."""

    def __init__(self, model, slots, *, capture: bool, batch_buckets: list[int] | None = None,
                 width_buckets: list[int] | None = None, min_width: int = 64, compile: str | None = None,
                 tokens_B: torch.Tensor | None = None) -> None:
        """tokens_B: the (num_slots,) int64 device buffer the steps read their input tokens from (the engine's
        ``next_tok_B``); a fresh one (``tokens_B``, write it before ``run``) when None."""
        if capture and slots.cache.key_mask_BS.device.type != "cuda":
            raise ValueError("StaticDecoder: capture=True needs the model and slot cache on CUDA")
        self.model, self.slots, self.capture = model, slots, capture
        self.compile = compile
        self._fn = model if compile is None else compile_decode_step(model, dynamic=None, backend=compile)
        self.batch_buckets = sorted(batch_buckets or buckets_up_to(slots.num_slots))
        self.width_buckets = sorted(width_buckets or buckets_up_to(slots.max_len, min(min_width, slots.max_len)))
        if self.batch_buckets[-1] > slots.num_slots or self.width_buckets[-1] > slots.max_len:
            raise ValueError(f"StaticDecoder: buckets exceed the slot cache ({slots.num_slots} rows, "
                             f"{slots.max_len} columns)")
        dev = slots.cache.key_mask_BS.device
        n = self.batch_buckets[-1]
        if tokens_B is None:
            tokens_B = torch.zeros(slots.num_slots, dtype=torch.long, device=dev)
        self.tokens_B = tokens_B
        self.tok_B1 = tokens_B[:, None]
        self.real_B1 = torch.zeros(n, 1, dtype=torch.bool, device=dev)
        self.slot_1 = torch.zeros(1, dtype=torch.long, device=dev)
        self._real: list[bool] | None = None  # what real_B1 holds (its rows past len(real) are False)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.num_replays = 0

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def bucket(self, num_rows: int, cursor: int) -> tuple[int, int]:
        return bucket_for(num_rows, self.batch_buckets), bucket_for(cursor + 1, self.width_buckets)

    def _step(self, b: int, w: int) -> torch.Tensor:
        view = self.slots.static_view(b, w)
        out = self._fn(self.tok_B1[:b], cache=view, cache_position=self.slot_1,
                       attention_mask_BS=self.real_B1[:b], last_logits_only=True,
                       router_stats=False, decode=True)
        return out.logits[:, -1]

    def run(self, real: list[bool], cursor: int) -> torch.Tensor:
        """One decode step for rows [0, len(real)) (their tokens: ``tokens_B``) writing column ``cursor``;
        logits (>= len(real), V). Rows up to the bucket past ``len(real)`` are computed as not real."""
        b, w = self.bucket(len(real), cursor)
        if real != self._real:  # the running set changed: one small copy (none on most steps)
            self.real_B1[:b, 0].copy_(host_to_device(real + [False] * (b - len(real)), torch.bool, self.real_B1.device))
            self._real = list(real)
        self.slot_1.fill_(cursor)
        if not self.capture:
            return self._step(b, w)
        if (b, w) not in self._graphs:
            self._capture(b, w)
        graph, logits_BV = self._graphs[(b, w)]
        graph.replay()
        self.num_replays += 1
        return logits_BV

    def _capture(self, b: int, w: int) -> None:
        # Warm-up on a side stream (allocator, cuBLAS workspaces), then capture. The warm-up really
        # runs this step: it writes column ``cursor`` (the replay writes the same values again) and
        # advances ``num_real_B``, which is put back so the replay advances it once.
        cache = self.slots.cache
        real_before = cache.num_real_B.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2 if self.compile else 1):  # a compiled step: compile, then one clean run
                self._step(b, w)
                cache.num_real_B.copy_(real_before)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits_BV = self._step(b, w)
        self._graphs[(b, w)] = (graph, logits_BV)

    def capture_all(self) -> int:
        """Capture every bucket now (a server does this before taking traffic); the cache must hold no request."""
        if self.slots.num_live():
            raise RuntimeError("StaticDecoder.capture_all: the slot cache holds live requests")
        for b in self.batch_buckets:
            for w in self.width_buckets:
                self.run([False] * b, w - 1)  # all rows free: writes only masked columns
        return self.num_graphs if self.capture else len(self.batch_buckets) * len(self.width_buckets)
