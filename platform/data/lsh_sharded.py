"""Near-duplicate clusters that scale: bucket-sharded and disk-backed.

``clusters_from_signatures`` (lsh.py) holds every signature of the corpus in memory (~1 KB per
document at 128 hashes, plus ~3 KB per document while resolving): ~41 GB at 10^7 documents.
``sharded_clusters`` gives the *same* clusters (same ranks, band keys, candidate edges,
verification and union-find, so the result is identical; tests check it) while the driver holds
only a few numbers per document:

1. Per shard (streamed, one shard in memory at a time): band keys are computed and written
   band-major to ``<workdir>/band-<shard>.npy`` and the signatures are appended to one flat file
   ``<workdir>/sigs.u64`` (a memory map later). The driver keeps the ids (as bytes) and the
   per-document "has shingles" flag.
2. The ids are ranked once (argsort of the byte strings): rank = position in id order, so a
   cluster's smallest rank is its smallest id, the document to keep.
3. Per band (``parallel_map``: Ray tasks when ``num_workers > 1``): the band's keys of all shards
   are read from disk, sorted, and each bucket's candidate edges written to ``edges-<band>.npy``.
4. The driver merges the edges (each pair once), verifies them against the memory-mapped
   signatures (rows gathered in sorted order, chunk by chunk), and runs the union-find over the
   ranks.

Memory at N documents, B bands, H hashes (bytes): driver ~ N * (id bytes + 25) + edges, a band task
~ 56 N, disk (B + H) * 8 N. At 10^7 documents with 30-byte ids: driver ~ 0.55 GB (+ the edges),
band task ~ 0.56 GB, disk ~ 11.5 GB. Shape suffixes: N documents, H hashes, B bands, E edges.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .lsh import _bucket_edges, band_keys, connected_components
from .minhash import EMPTY

_VERIFY_CHUNK = 1 << 13  # edges per chunk: at most 2 * 8192 pages of the map resident at a time


@dataclass(frozen=True)
class _BandTask:
    workdir: str
    band: int
    num_shards: int
    all_pairs: bool


def _band_edges(task: _BandTask) -> int:
    """Candidate edges (u < v, as ranks) of one band over all shards; written to disk, count returned."""
    work = Path(task.workdir)
    keys_N = np.concatenate([np.load(work / f"band-{i:05d}.npy", mmap_mode="r")[task.band] for i in range(task.num_shards)])
    rank_N = np.load(work / "rank.npy", mmap_mode="r")
    nonempty_N = np.load(work / "nonempty.npy", mmap_mode="r")
    keep = np.flatnonzero(nonempty_N)
    u_E, v_E = _bucket_edges(keys_N[keep], np.asarray(rank_N[keep]), all_pairs=task.all_pairs)
    np.save(work / f"edges-{task.band:04d}.npy", np.stack([u_E, v_E]).astype(np.int64))
    return len(u_E)


def _verified(path: Path, num_hashes: int, order_N: np.ndarray, u_E: np.ndarray, v_E: np.ndarray,
              threshold: float) -> np.ndarray:
    """Mask of the edges (as ranks) whose estimated Jaccard is >= threshold.

    The signatures are memory-mapped; each chunk's rows are gathered in file order and the
    mapping's pages are released after the chunk (``MADV_DONTNEED``), so the pages touched never
    add up in the process's memory: they stay in the page cache, not in its RSS.
    """
    keep_E = np.zeros(len(u_E), dtype=bool)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        sigs_NH = np.frombuffer(mm, dtype=np.uint64).reshape(-1, num_hashes)
        for lo in range(0, len(u_E), _VERIFY_CHUNK):
            rows_u, rows_v = order_N[u_E[lo : lo + _VERIFY_CHUNK]], order_N[v_E[lo : lo + _VERIFY_CHUNK]]
            su, sv = np.argsort(rows_u), np.argsort(rows_v)
            a = np.empty((len(rows_u), num_hashes), np.uint64)
            b = np.empty_like(a)
            a[su], b[sv] = sigs_NH[rows_u[su]], sigs_NH[rows_v[sv]]
            keep_E[lo : lo + _VERIFY_CHUNK] = (a == b).mean(axis=1) >= threshold
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED)
        del sigs_NH
    return keep_E


def sharded_clusters(
    load_shard: Callable[[int], tuple[Sequence[str], np.ndarray]],
    num_shards: int,
    num_bands: int,
    rows_per_band: int,
    threshold: float | None = None,
    *,
    num_workers: int | None = 1,
    workdir: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[set[str]]:
    """Clusters (sets of >= 2 ids, sorted by smallest id) of the shards' signatures; equal to
    ``clusters_from_signatures`` over all of them concatenated. ``load_shard(i)`` returns the
    ids and (n, H) uint64 signatures of shard i; only one shard is in memory at a time."""
    from moeflow.platform.compute import parallel_map

    with tempfile.TemporaryDirectory(prefix="moeflow-lsh-", dir=workdir) as tmp:
        work = Path(tmp)
        id_parts, nonempty_parts, num_hashes = [], [], num_bands * rows_per_band
        with open(work / "sigs.u64", "wb") as sig_file:
            for i in range(num_shards):
                ids, sigs = load_shard(i)
                sigs = np.asarray(sigs)
                if sigs.dtype != np.uint64 or sigs.ndim != 2 or (len(sigs) and sigs.shape[1] < num_hashes):
                    raise ValueError(f"shard {i}: signatures must be (n, >= {num_hashes}) uint64, got {sigs.dtype} {sigs.shape}")
                if len(ids) != len(sigs):
                    raise ValueError(f"shard {i}: {len(ids)} ids for {len(sigs)} signatures")
                sigs = np.ascontiguousarray(sigs[:, :num_hashes]) if len(sigs) else np.zeros((0, num_hashes), np.uint64)
                np.save(work / f"band-{i:05d}.npy", np.ascontiguousarray(band_keys(sigs, num_bands, rows_per_band).T))
                sig_file.write(sigs.tobytes())
                id_parts.append(np.asarray([d.encode("utf-8") for d in ids], dtype="S") if len(ids) else np.empty(0, "S1"))
                nonempty_parts.append(~(sigs == EMPTY).all(axis=1))
        ids_N = np.concatenate(id_parts) if id_parts else np.empty(0, "S1")
        num_docs = len(ids_N)
        if num_docs == 0:
            return []
        order_N = np.argsort(ids_N, kind="stable")  # rank -> row
        if len(ids_N) > 1 and (dup := np.flatnonzero(ids_N[order_N][1:] == ids_N[order_N][:-1])).size:
            raise ValueError(f"duplicate document id {ids_N[order_N][dup[0]].decode()!r}")
        rank_N = np.empty(num_docs, np.int64)
        rank_N[order_N] = np.arange(num_docs)
        np.save(work / "rank.npy", rank_N)
        np.save(work / "nonempty.npy", np.concatenate(nonempty_parts))
        del nonempty_parts, rank_N

        tasks = [_BandTask(str(work), b, num_shards, threshold is not None) for b in range(num_bands)]
        parallel_map(_band_edges, tasks, num_workers, desc="near dedup bands", progress=progress)
        codes = [np.empty(0, np.int64)]
        for b in range(num_bands):
            u_E, v_E = np.load(work / f"edges-{b:04d}.npy")
            codes.append(np.unique(u_E * num_docs + v_E))  # each pair once per band ...
            os.unlink(work / f"edges-{b:04d}.npy")
        codes_E = np.unique(np.concatenate(codes))  # ... and once over all bands
        del codes
        u_E, v_E = codes_E // num_docs, codes_E % num_docs
        if threshold is not None and len(u_E):
            keep_E = _verified(work / "sigs.u64", num_hashes, order_N, u_E, v_E, threshold)
            u_E, v_E = u_E[keep_E], v_E[keep_E]
        roots_N = connected_components(num_docs, u_E, v_E)
        members = np.flatnonzero(roots_N != np.arange(num_docs))
        if not len(members):
            return []
        members = members[np.lexsort((members, roots_N[members]))]
        member_roots = roots_N[members]
        cut = np.flatnonzero(np.diff(member_roots)) + 1
        ids_of = lambda ranks: [d.decode("utf-8") for d in ids_N[order_N[ranks]]]  # noqa: E731
        return [
            {ids_of([root])[0], *ids_of(group)}
            for root, group in zip(member_roots[np.r_[0, cut]], np.split(members, cut))
        ]
