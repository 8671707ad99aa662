"""Streaming, BOS-aligned, data-parallel token loader over a ``TokenDataset``.

Packing (documented choice, after nanochat's "BOS-aligned best-fit"):

* Every row holds ``seq_len + 1`` tokens (inputs are ``row[:-1]``, targets ``row[1:]``) and
  **starts with BOS at a document start**; no padding, so every target counts.
* A document longer than a row is **continued**, not thrown away: it is cut into pieces of
  at most one row, and each continuation piece gets a fresh BOS in front (so it, too, can open
  a row; the model sees it as a document without its earlier context).
* Rows are filled best-fit from a small sorted buffer of pieces: repeatedly the longest piece
  that still fits the remaining space. When nothing fits, the shortest buffered piece is
  **cropped** to the exact remaining space and its tail is dropped. Utilisation is 100 %;
  the price is a few cropped tails (tiny with a buffer of a few dozen pieces).
* Documents are shuffled per epoch from ``(seed, epoch)``; data-parallel rank ``r`` of ``W``
  owns documents ``perm[r::W]`` — disjoint slices, each packed independently.

The plan is pure index arithmetic (no tokens read), so restoring a position means replaying
the plan of the saved epoch up to the saved row, then reading tokens from there: the state
``{"epoch", "row"}`` restores the exact stream. A background thread prefetches batches;
``state_dict()`` reflects what the consumer has taken, never what was prefetched.

Shapes: batches are ``(B, T + 1)`` int64 tensors (B rows, T = seq_len).
"""

from __future__ import annotations

import bisect
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np
import torch


class TokenSource(Protocol):
    """The part of ``moeflow.platform.data.shards.TokenDataset`` the loader needs."""

    num_tokens: int
    meta: dict

    @property
    def doc_starts(self) -> np.ndarray: ...

    def tokens(self, start: int, length: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Piece:
    """A run of dataset tokens ``[start, start + length)``, preceded by BOS when ``extra_bos``."""

    start: int
    length: int
    extra_bos: bool

    @property
    def size(self) -> int:
        return self.length + int(self.extra_bos)


def document_spans(doc_starts: np.ndarray, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of every document; empty documents are kept (they yield no pieces)."""
    starts = np.asarray(doc_starts, dtype=np.int64)
    if starts.ndim != 1:
        raise ValueError(f"doc_starts must be 1-D, got shape {starts.shape}")
    if len(starts) and (starts[0] < 0 or np.any(np.diff(starts) < 0) or starts[-1] > num_tokens):
        raise ValueError("doc_starts must be non-decreasing offsets within [0, num_tokens]")
    ends = np.append(starts[1:], num_tokens)
    return starts, ends - starts


def split_document(start: int, length: int, row_len: int, has_bos: bool) -> list[Piece]:
    """Cut one document into row-sized pieces that each begin with BOS."""
    pieces, pos, end, first = [], start, start + length, True
    while pos < end:
        extra = not (first and has_bos)
        take = min(end - pos, row_len - int(extra))
        piece = Piece(pos, take, extra)
        if piece.size >= 2:  # a lone BOS predicts nothing useful
            pieces.append(piece)
        pos, first = pos + take, False
    return pieces


def plan_rows(doc_order: np.ndarray, starts: np.ndarray, lengths: np.ndarray, row_len: int,
              has_bos: bool, buffer_size: int = 64) -> Iterator[list[Piece]]:
    """Yield rows (lists of pieces whose sizes sum to ``row_len``) in a deterministic order."""
    if row_len < 2:
        raise ValueError(f"row_len={row_len}: need at least 2 tokens per row")

    def piece_stream():
        for doc in doc_order:
            yield from split_document(int(starts[doc]), int(lengths[doc]), row_len, has_bos)

    stream = piece_stream()
    keys: list[tuple[int, int]] = []  # sorted (size, arrival) — arrival breaks ties deterministically
    by_key: dict[tuple[int, int], Piece] = {}
    arrival = 0
    exhausted = False

    def refill():
        nonlocal arrival, exhausted
        while not exhausted and len(keys) < buffer_size:
            piece = next(stream, None)
            if piece is None:
                exhausted = True
                return
            key = (piece.size, arrival)
            arrival += 1
            bisect.insort(keys, key)
            by_key[key] = piece

    while True:
        refill()
        if not keys:
            return
        row, remaining = [], row_len
        while remaining > 0:
            refill()
            if not keys:
                return  # the last partial row of the epoch is dropped
            i = bisect.bisect_right(keys, (remaining, float("inf"))) - 1
            if i >= 0:  # longest piece that fits
                key = keys.pop(i)
                piece = by_key.pop(key)
            else:  # nothing fits: crop the shortest piece to the remaining space, drop its tail
                key = keys.pop(0)
                full = by_key.pop(key)
                piece = Piece(full.start, remaining - int(full.extra_bos), full.extra_bos)
            row.append(piece)
            remaining -= piece.size
        yield row


def rank_document_order(num_docs: int, *, seed: int, epoch: int, rank: int, world_size: int,
                        shuffle: bool = True) -> np.ndarray:
    """This rank's documents for ``epoch``: a seeded permutation, strided by rank (disjoint)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} not in [0, world_size={world_size})")
    order = np.random.default_rng([seed, epoch]).permutation(num_docs) if shuffle else np.arange(num_docs)
    return order[rank::world_size]


def detect_bos(ds: TokenSource, bos_id: int, sample: int = 32) -> bool:
    """Whether documents already start with BOS (checked on the first ``sample`` non-empty ones)."""
    starts, lengths = document_spans(ds.doc_starts, ds.num_tokens)
    firsts = [int(ds.tokens(int(s), 1)[0]) for s, n in zip(starts, lengths) if n > 0][:sample]
    flags = {t == bos_id for t in firsts}
    if len(flags) > 1:
        raise ValueError(f"some documents start with BOS ({bos_id}) and some do not; shards are inconsistent")
    return flags == {True}


class PackedLoader:
    """Infinite iterator of ``(B, seq_len + 1)`` batches for one data-parallel rank."""

    def __init__(self, ds: TokenSource, *, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, bos_id: int | None = None,
                 buffer_size: int = 64, prefetch: int = 2) -> None:
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len={seq_len}, batch_size={batch_size}: must be > 0")
        self.ds = ds
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.buffer_size, self.prefetch = buffer_size, prefetch
        if bos_id is None:
            if "bos_id" not in ds.meta:
                raise ValueError("dataset meta has no 'bos_id'; pass bos_id= explicitly")
            bos_id = int(ds.meta["bos_id"])
        self.bos_id = bos_id
        self.has_bos = detect_bos(ds, bos_id)
        self._starts, self._lengths = document_spans(ds.doc_starts, ds.num_tokens)
        self._state = {"epoch": 0, "row": 0}
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._sync_iter: Iterator[tuple[np.ndarray, dict]] | None = None

    # ---------------------------------------------------------------- plan and reading
    def rows(self, epoch: int) -> Iterator[list[Piece]]:
        order = rank_document_order(len(self._starts), seed=self.seed, epoch=epoch, rank=self.rank,
                                    world_size=self.world_size, shuffle=self.shuffle)
        return plan_rows(order, self._starts, self._lengths, self.seq_len + 1, self.has_bos, self.buffer_size)

    def read_row(self, row: list[Piece]) -> np.ndarray:
        parts = []
        for piece in row:
            if piece.extra_bos:
                parts.append(np.array([self.bos_id], dtype=np.int64))
            parts.append(np.asarray(self.ds.tokens(piece.start, piece.length), dtype=np.int64))
        out = np.concatenate(parts)
        assert out.shape == (self.seq_len + 1,), out.shape
        return out

    def _row_stream(self, epoch: int, skip: int) -> Iterator[tuple[list[Piece], int, int]]:
        """(row, epoch, index) forever, starting at row ``skip`` of ``epoch``."""
        while True:
            count = 0
            for index, row in enumerate(self.rows(epoch)):
                count += 1
                if index >= skip:
                    yield row, epoch, index
            if count == 0:
                raise ValueError(f"rank {self.rank}/{self.world_size}: no full row of {self.seq_len + 1} "
                                 f"tokens in epoch {epoch} (dataset too small for this seq_len / world size)")
            if skip > count:
                raise ValueError(f"loader state row={skip} is past the end of epoch {epoch} ({count} rows)")
            epoch, skip = epoch + 1, 0

    def _batches(self, epoch: int, skip: int) -> Iterator[tuple[np.ndarray, dict]]:
        stream = self._row_stream(epoch, skip)
        while True:
            rows, state = [], None
            for _ in range(self.batch_size):
                row, ep, index = next(stream)
                rows.append(self.read_row(row))
                state = {"epoch": ep, "row": index + 1}
            yield np.stack(rows), state

    # ---------------------------------------------------------------- background prefetch
    def _producer(self, epoch: int, skip: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for item in self._batches(epoch, skip):
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer, raised there
            out.put(err)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, self.prefetch))
        self._thread = threading.Thread(target=self._producer, daemon=True, name=f"loader-rank{self.rank}",
                                        args=(self._state["epoch"], self._state["row"], self._queue, self._stop))
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
        self._thread = self._queue = self._stop = None

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.prefetch <= 0:  # synchronous path (debugging, deterministic profiling)
            if self._sync_iter is None:
                self._sync_iter = self._batches(self._state["epoch"], self._state["row"])
            batch, state = next(self._sync_iter)
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            batch, state = item
        self._state = dict(state)
        return torch.from_numpy(batch)

    # ---------------------------------------------------------------- position
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": int(self._state["epoch"]), "row": int(self._state["row"]), "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "seq_len": self.seq_len,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "world_size", "seq_len"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, this loader has "
                                 f"{key}={getattr(self, key)}; exact resume needs the same value")
        self.close()
        self._sync_iter = None
        self._state = {"epoch": int(state["epoch"]), "row": int(state["row"])}


def eval_batches(ds: TokenSource, *, seq_len: int, batch_size: int, num_batches: int, rank: int = 0,
                 world_size: int = 1, bos_id: int | None = None) -> list[torch.Tensor]:
    """Fixed validation batches: documents in file order, the global stream's batches
    ``rank, rank + W, ...`` (so the union over ranks is the same set for any W)."""
    loader = PackedLoader(ds, seq_len=seq_len, batch_size=batch_size, shuffle=False, bos_id=bos_id, prefetch=0)
    rows = loader.rows(epoch=0)
    out = []
    for index in range(num_batches):
        batch_rows = []
        for _ in range(batch_size):
            row = next(rows, None)
            if row is None:
                break
            batch_rows.append(row)
        if len(batch_rows) < batch_size:
            break
        if index % world_size == rank:
            out.append(torch.from_numpy(np.stack([loader.read_row(r) for r in batch_rows])))
    return out
