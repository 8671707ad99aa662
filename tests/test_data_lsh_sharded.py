"""Bucket-sharded, disk-backed near-dedup (issue 9): the same clusters as the in-memory
``clusters_from_signatures`` for any split into shards, with and without verification, with
empty documents, one huge bucket and Ray band tasks; wired into the curate step."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.platform.data.curate import CurateConfig, resolve_global
from moeflow.platform.data.lsh import clusters_from_signatures
from moeflow.platform.data.lsh_sharded import sharded_clusters
from moeflow.platform.data.minhash import EMPTY, compute_signatures

BANDS, ROWS = 9, 7


def planted(num_docs: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Random signatures with planted near copies (a share of entries changed), a few empty
    documents and one bucket of 40 identical documents."""
    rng = np.random.default_rng(seed)
    sigs = rng.integers(0, 2**63, size=(num_docs, BANDS * ROWS), dtype=np.uint64)
    for i in range(0, num_docs - 1, 7):  # near copies of about J 0.6-0.95
        src, dst = int(rng.integers(0, num_docs)), i
        sigs[dst] = sigs[src]
        flip = rng.random(BANDS * ROWS) < rng.uniform(0.05, 0.4)
        sigs[dst, flip] = rng.integers(0, 2**63, size=int(flip.sum()), dtype=np.uint64)
    sigs[3:43] = sigs[2]  # one bucket larger than the all-pairs limit
    sigs[50:53] = EMPTY  # documents without shingles
    ids = [f"{rng.integers(0, 1 << 30):08x}-{i}" for i in range(num_docs)]
    return ids, sigs


@pytest.mark.parametrize("threshold", [None, 0.7])
@pytest.mark.parametrize("num_shards", [1, 3, 17])
def test_same_clusters_as_in_memory(threshold, num_shards, tmp_path):
    ids, sigs = planted(600)
    expected = clusters_from_signatures(ids, sigs, BANDS, ROWS, threshold=threshold)
    assert len(expected) > 20 and any(len(c) >= 40 for c in expected)
    cuts = np.linspace(0, len(ids), num_shards + 1).astype(int)
    load = lambda i: (ids[cuts[i]:cuts[i + 1]], sigs[cuts[i]:cuts[i + 1]])  # noqa: E731
    got = sharded_clusters(load, num_shards, BANDS, ROWS, threshold, workdir=tmp_path)
    assert got == expected
    assert list(tmp_path.iterdir()) == []  # scratch files removed


def test_shards_in_another_order_give_the_same_clusters(tmp_path):
    ids, sigs = planted(300, seed=1)
    perm = np.random.default_rng(2).permutation(len(ids))
    shards = [perm[i::5] for i in range(5)]
    load = lambda i: ([ids[k] for k in shards[i]], sigs[shards[i]])  # noqa: E731
    got = sharded_clusters(load, 5, BANDS, ROWS, 0.7, workdir=tmp_path)
    assert got == clusters_from_signatures(ids, sigs, BANDS, ROWS, threshold=0.7)


def test_real_text_and_edge_cases(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog again"] * 3 + ["something else entirely here", ""]
    ids = ["c", "a", "b", "d", "e"]
    sigs = compute_signatures(texts, num_perm=BANDS * ROWS)
    got = sharded_clusters(lambda i: (ids[i:i + 1], sigs[i:i + 1]), len(ids), BANDS, ROWS, 0.7, workdir=tmp_path)
    assert got == [{"a", "b", "c"}]
    assert sharded_clusters(lambda i: ([], np.zeros((0, BANDS * ROWS), np.uint64)), 2, BANDS, ROWS) == []
    with pytest.raises(ValueError, match="duplicate document id"):
        sharded_clusters(lambda i: (["x"], sigs[:1]), 2, BANDS, ROWS)


def test_band_tasks_on_two_ray_workers(tmp_path):
    pytest.importorskip("ray")
    ids, sigs = planted(400, seed=3)
    load = lambda i: (ids[i * 100:(i + 1) * 100], sigs[i * 100:(i + 1) * 100])  # noqa: E731
    got = sharded_clusters(load, 4, BANDS, ROWS, 0.7, num_workers=2, workdir=tmp_path)
    assert got == clusters_from_signatures(ids, sigs, BANDS, ROWS, threshold=0.7)


def test_curate_near_dedup_step_uses_the_sharded_resolver(monkeypatch):
    import moeflow.platform.data.lsh_sharded as sharded

    calls = []
    real = sharded.sharded_clusters
    monkeypatch.setattr(sharded, "sharded_clusters", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    config = CurateConfig(steps=["near_dedup"])
    bands, rows = config.near_dedup.banding()
    texts = ["alpha beta gamma delta epsilon zeta eta theta"] * 2 + ["one two three four five six seven"]
    sigs = compute_signatures(texts, num_perm=bands * rows)
    keys = {"s0": {"ids": np.array(["b", "a"]), "keys": sigs[:2]}, "s1": {"ids": np.array(["c"]), "keys": sigs[2:]}}
    decisions = resolve_global("near_dedup", keys, config)
    assert calls == [2]
    assert decisions["s0"]["drop"] == {"b": "a"} and decisions["s1"]["drop"] == {}
