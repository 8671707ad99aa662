"""Re-splitting a loader position over a different number of ranks (``PackedLoader.load_resharded``).

The guarantee under test: rows (fixed lists of token spans) of every epoch that the old ranks had
started are consumed exactly once over the whole run — by the old ranks before the checkpoint or by
the new ranks after it — and the new ranks then continue with the next epoch under the new split.
Rows are identified by their tokens (random documents: rows are distinct).
"""

from __future__ import annotations

from collections import Counter

import pytest

from moeflow.platform.train.loader import PackedLoader
from train_fakes import ArrayTokens, random_docs

BOS, SEQ, BATCH = 1, 8, 2


def _ds(num_docs: int = 65) -> ArrayTokens:
    return ArrayTokens(random_docs(num_docs, seed=5, max_len=30), bos_id=BOS)


def _loaders(ds, world: int) -> list[PackedLoader]:
    return [PackedLoader(ds, seq_len=SEQ, batch_size=BATCH, seed=7, rank=r, world_size=world, bos_id=BOS,
                         prefetch=0) for r in range(world)]


def _take(loader: PackedLoader, batches: int) -> list[tuple]:
    return [tuple(row.tolist()) for _ in range(batches) for row in next(loader)]


def _epoch_rows(loader: PackedLoader, epoch: int, world: int) -> Counter:
    return Counter(tuple(loader.read_row(row).tolist()) for q in range(world) for row in loader.rows(epoch, q, world))


def _pending_total(loader: PackedLoader) -> int:
    return sum(p[4] - p[3] for p in loader.state_dict()["pending"])


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (2, 3)])
def test_resharded_resume_covers_the_started_epoch_exactly_once(old, new):
    ds = _ds()
    before = _loaders(ds, old)
    consumed = Counter()
    for loader in before:
        consumed.update(_take(loader, 3))
    states = [loader.state_dict() for loader in before]
    after = _loaders(ds, new)
    for loader in after:
        loader.load_resharded(states)
    total = _pending_total(after[0])
    assert total > 0 and all(loader.state_dict()["pending"] == after[0].state_dict()["pending"] for loader in after)
    for q, loader in enumerate(after):  # each new rank's share of the pending rows, row by row
        n = len(range(q, total, new))
        loader.batch_size = 1
        consumed.update(_take(loader, n))
        assert loader.state_dict()["taken"] == n
    assert consumed == _epoch_rows(before[0], 0, old)  # epoch 0: nothing skipped, nothing repeated
    # every pending row consumed (ranks took unequal shares when W' does not divide them): resharding
    # once more leaves nothing pending and starts epoch 1 whole
    assert new == 1 or total % new  # unequal shares: the case under test
    again = _loaders(ds, old)[0]
    again.load_resharded([loader.state_dict() for loader in after])
    assert again.state_dict()["pending"] == [] and again.state_dict()["epoch"] == 1
    # then epoch 1 under the new split, from its first row
    for q, loader in enumerate(after):
        assert loader.state_dict()["epoch"] == 1
        expected = [tuple(loader.read_row(r).tolist()) for r in list(loader.rows(1, q, new))[:2]]
        assert _take(loader, 2) == expected


def test_reshard_twice_and_across_an_epoch_boundary():
    """2 ranks run past the end of epoch 0 at different rows; 2 -> 3 mid-pending -> 1: exactly once."""
    ds = _ds(24)
    two = _loaders(ds, 2)
    lengths = [two[0].plan_length(0, q, 2) for q in range(2)]
    assert lengths[0] != lengths[1]  # the ranks cross into epoch 1 at different steps
    steps = (max(lengths) + 3) // BATCH
    consumed = Counter()
    for loader in two:
        consumed.update(_take(loader, steps))
    assert {s["epoch"] for s in (loader.state_dict() for loader in two)} == {1}
    three = _loaders(ds, 3)
    for loader in three:
        loader.load_resharded([loader2.state_dict() for loader2 in two])
    assert three[0].state_dict()["epoch"] == 2
    for loader in three:  # one batch each: mid-pending
        consumed.update(_take(loader, 1))
    one = _loaders(ds, 1)[0]
    one.load_resharded([loader.state_dict() for loader in three])
    one.batch_size = 1
    consumed.update(_take(one, _pending_total(one)))
    assert consumed == _epoch_rows(two[0], 0, 2) + _epoch_rows(two[0], 1, 2)
    assert one.state_dict()["epoch"] == 2 and _take(one, 1) == [tuple(one.read_row(next(one.rows(2))).tolist())]


def test_same_world_state_round_trip_keeps_pending_and_bad_states_are_refused():
    ds = _ds()
    two = _loaders(ds, 2)
    for loader in two:
        _take(loader, 2)
    one = _loaders(ds, 1)[0]
    one.load_resharded([loader.state_dict() for loader in two])
    _take(one, 1)
    again = _loaders(ds, 1)[0]
    again.load_state_dict(one.state_dict())
    assert _take(again, 4) == _take(one, 4)
    bad = [dict(loader.state_dict(), seed=99) for loader in two]
    with pytest.raises(ValueError, match="seed=99"):
        _loaders(ds, 1)[0].load_resharded(bad)
