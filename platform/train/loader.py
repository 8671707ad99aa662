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

Resuming on a different number of ranks (``load_resharded``): the rows the old ranks had not
consumed yet — the rest of every epoch that any old rank had started, as the OLD split planned it —
become a *pending* list of row ranges ``(epoch, world_size, rank, start, stop)`` of those old
plans, dealt round-robin to the new ranks (pending row ``i`` goes to new rank ``i % W'``); after
it, each new rank continues with the next epoch under the new split. The state then also holds
``pending`` (the same on every rank) and ``taken`` (how many of its pending rows this rank has
consumed), so a resharded run can be checkpointed and resharded again.

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
        self._state: dict[str, Any] = {"epoch": 0, "row": 0, "pending": [], "taken": 0}
        self._lengths_cache: dict[tuple[int, int, int], int] = {}
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._sync_iter: Iterator[tuple[np.ndarray, dict]] | None = None

    # ---------------------------------------------------------------- plan and reading
    def rows(self, epoch: int, rank: int | None = None, world_size: int | None = None) -> Iterator[list[Piece]]:
        """The rows of ``epoch`` planned for ``rank`` of ``world_size`` (default: this loader's)."""
        order = rank_document_order(len(self._starts), seed=self.seed, epoch=epoch,
                                    rank=self.rank if rank is None else rank,
                                    world_size=self.world_size if world_size is None else world_size,
                                    shuffle=self.shuffle)
        return plan_rows(order, self._starts, self._lengths, self.seq_len + 1, self.has_bos, self.buffer_size)

    def plan_length(self, epoch: int, rank: int, world_size: int) -> int:
        """How many rows ``rank`` of ``world_size`` has in ``epoch`` (plans the epoch; no tokens read)."""
        key = (epoch, rank, world_size)
        if key not in self._lengths_cache:
            self._lengths_cache[key] = sum(1 for _ in self.rows(epoch, rank, world_size))
        return self._lengths_cache[key]

    def read_row(self, row: list[Piece]) -> np.ndarray:
        parts = []
        for piece in row:
            if piece.extra_bos:
                parts.append(np.array([self.bos_id], dtype=np.int64))
            parts.append(np.asarray(self.ds.tokens(piece.start, piece.length), dtype=np.int64))
        out = np.concatenate(parts)
        assert out.shape == (self.seq_len + 1,), out.shape
        return out

    def _pending_stream(self, pending: list[list[int]], taken: int) -> Iterator[tuple[list[Piece], int]]:
        """(row, taken after it): this rank's share of ``pending`` (global row ``i`` goes to rank
        ``i % world_size``), from its ``taken``-th row on."""
        index, mine = 0, 0  # global pending index; this rank's rows passed so far
        for epoch, world_size, rank, start, stop in pending:
            size = stop - start
            ours = len(range((self.rank - index) % self.world_size, size, self.world_size))
            if mine + ours <= taken:  # every row of ours in this range was consumed: skip planning it
                index, mine = index + size, mine + ours
                continue
            i = -1
            for i, row in enumerate(self.rows(epoch, rank, world_size)):
                if i >= stop:
                    break
                if i < start:
                    continue
                if index % self.world_size == self.rank:
                    if mine >= taken:
                        yield row, mine + 1
                    mine += 1
                index += 1
            if i < stop - 1:
                raise ValueError(f"pending rows {start}..{stop} of epoch {epoch} (rank {rank}/{world_size}) are "
                                 f"past the end of that plan ({i + 1} rows): not this dataset's checkpoint")

    def _row_stream(self, epoch: int, skip: int, pending: list | None = None,
                    taken: int = 0) -> Iterator[tuple[list[Piece], dict]]:
        """(row, state after it) forever: this rank's pending rows, then row ``skip`` of ``epoch`` on."""
        pending = [list(p) for p in pending or []]
        for row, mine in self._pending_stream(pending, taken):
            yield row, {"epoch": epoch, "row": skip, "pending": pending, "taken": mine}
        total = sum(p[4] - p[3] for p in pending)
        taken = len(range(self.rank, total, self.world_size))
        while True:
            count = 0
            for index, row in enumerate(self.rows(epoch)):
                count += 1
                if index >= skip:
                    yield row, {"epoch": epoch, "row": index + 1, "pending": pending, "taken": taken}
            if count == 0:
                raise ValueError(f"rank {self.rank}/{self.world_size}: no full row of {self.seq_len + 1} "
                                 f"tokens in epoch {epoch} (dataset too small for this seq_len / world size)")
            if skip > count:
                raise ValueError(f"loader state row={skip} is past the end of epoch {epoch} ({count} rows)")
            epoch, skip = epoch + 1, 0

    def _batches(self, state: dict) -> Iterator[tuple[np.ndarray, dict]]:
        stream = self._row_stream(state["epoch"], state["row"], state.get("pending"), state.get("taken", 0))
        while True:
            rows = []
            for _ in range(self.batch_size):
                row, state = next(stream)
                rows.append(self.read_row(row))
            yield np.stack(rows), state

    # ---------------------------------------------------------------- background prefetch
    def _producer(self, state: dict, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for item in self._batches(state):
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
                                        args=(dict(self._state), self._queue, self._stop))
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
                self._sync_iter = self._batches(dict(self._state))
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
                "batch_size": self.batch_size, "pending": [list(p) for p in self._state.get("pending", [])],
                "taken": int(self._state.get("taken", 0))}

    def _check_state(self, state: dict[str, Any], keys: tuple[str, ...]) -> None:
        for key in keys:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, this loader has "
                                 f"{key}={getattr(self, key)}; resuming needs the same value")

    def _set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self._sync_iter = None
        self._state = {"epoch": int(state["epoch"]), "row": int(state["row"]),
                       "pending": [[int(x) for x in p] for p in state.get("pending", [])],
                       "taken": int(state.get("taken", 0))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's own saved position (same world size): the exact stream resumes."""
        self._check_state(state, ("seed", "world_size", "seq_len"))
        self._set_state(state)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Resume from the positions of ALL ranks of a run with another number of ranks.

        Guaranteed (rows are the unit; a row is a fixed list of dataset token spans): over the whole
        run, old ranks before the checkpoint plus new ranks after it, every row of every epoch the old
        ranks had started is consumed exactly once — nothing skipped, nothing repeated — as the OLD
        split planned it (``pending``, dealt round-robin to the new ranks); the following epochs use
        the new split. Not kept: which rank sees a row and at which step (so the weights are not those
        of any uninterrupted run), and the epoch boundary of the pending rows (a new rank may start
        the next epoch one row before another). Cost: every old rank's plan of those epochs is
        replayed once (index arithmetic, no tokens read).
        """
        old_world = len(states)
        for state in states:
            self._check_state(state, ("seed", "seq_len"))
            if state.get("world_size", old_world) != old_world:
                raise ValueError(f"loader states of {old_world} ranks, but one was saved with "
                                 f"world_size={state['world_size']}")
        pending = [[int(x) for x in p] for p in states[0].get("pending", [])]
        if any([[int(x) for x in p] for p in s.get("pending", [])] != pending for s in states):
            raise ValueError("loader states disagree on the pending rows: not one run's checkpoint")
        total = sum(p[4] - p[3] for p in pending)
        taken = [int(s.get("taken", 0)) for s in states]
        own = [len(range(q, total, old_world)) for q in range(old_world)]
        # 1. pending rows nobody consumed: global row i was consumed iff i // W < taken[i % W]
        low, high = min(taken) * old_world, min(max(taken) * old_world, total)
        left = _slice_ranges(pending, low, low)  # empty; built up in order below
        for i in range(low, high):
            if i // old_world >= taken[i % old_world]:
                left += _slice_ranges(pending, i, i + 1)
        left += _slice_ranges(pending, high, total)
        # 2. the epochs the old ranks had started under their own split
        positions = [(int(s["epoch"]), int(s["row"])) if taken[q] >= own[q] else (int(s["epoch"]), 0)
                     for q, s in enumerate(states)]
        first, last = min(p[0] for p in positions), max(p[0] for p in positions)
        if all(p == (last, 0) for p in positions):
            next_epoch = last  # nobody started it: the new split takes it whole
        else:
            next_epoch = last + 1
            for epoch in range(first, last + 1):
                for q, (at_epoch, at_row) in enumerate(positions):
                    if at_epoch > epoch:
                        continue
                    start = at_row if at_epoch == epoch else 0
                    stop = self.plan_length(epoch, q, old_world)
                    if start < stop:
                        left.append([epoch, old_world, q, start, stop])
        self._set_state({"epoch": next_epoch, "row": 0, "pending": _merge_ranges(left), "taken": 0})


def _slice_ranges(ranges: list[list[int]], a: int, b: int) -> list[list[int]]:
    """The rows with global index in ``[a, b)`` of a list of ``[epoch, world_size, rank, start, stop]``."""
    out, offset = [], 0
    for epoch, world_size, rank, start, stop in ranges:
        size = stop - start
        lo, hi = max(a - offset, 0), min(b - offset, size)
        if lo < hi:
            out.append([epoch, world_size, rank, start + lo, start + hi])
        offset += size
    return out


def _merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    """Adjacent ranges of the same plan joined (keeps the pending list short)."""
    out: list[list[int]] = []
    for r in ranges:
        if out and out[-1][:3] == r[:3] and out[-1][4] == r[3]:
            out[-1] = [*out[-1][:4], r[4]]
        else:
            out.append(list(r))
    return out


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
