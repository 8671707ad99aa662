"""Near-dedup resolution at scale: the sharded, disk-backed resolver vs the in-memory one, same run.

What is measured is the driver's part of near dedup, from per-shard signatures to clusters: the
signatures themselves are computed by the shard tasks (bench_minhash.py measures that step), so
here every shard's (n, 126) uint64 signatures (18 bands x 7 rows, the default banding) are
generated from a seed when the shard is loaded, the stand-in for reading its keys.npz. Planted:
about 1 in 7 documents is a near copy (5-30% of entries changed) of a document of its own or the
previous shard.

- ``old``: what the curate driver did before: every shard's keys in one dict, concatenated,
  ``lsh.clusters_from_signatures``.
- ``new``: ``lsh_sharded.sharded_clusters`` (one shard in memory at a time, bands sorted one by
  one, signatures memory-mapped from disk for verification).

Each implementation runs in its own child process, alternately, ``--repeats`` times; the figures
are wall and CPU seconds and the peak RSS of that process (``wait4``), and the two must return the
same clusters (their count and a hash of them are compared).

Run: ``python benchmarks/bench_dedup_scale.py --num-docs 1000000 [--repeats 2] [--impl old|new|both]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

BANDS, ROWS = 18, 7
H = BANDS * ROWS


def shard_base(seed: int, shard: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, shard, 0]).integers(0, 2**63, size=(n, H), dtype=np.uint64)


def load_shard(seed: int, shard: int, n: int) -> tuple[list[str], np.ndarray]:
    """Shard ``shard``'s ids and signatures, with planted near copies (deterministic)."""
    sigs = shard_base(seed, shard, n)
    rng = np.random.default_rng([seed, shard, 1])
    dst = np.flatnonzero(rng.random(n) < 1 / 7)
    prev = shard_base(seed, shard - 1, n) if shard > 0 else sigs.copy()
    from_prev = rng.random(len(dst)) < 0.5
    src = rng.integers(0, n, size=len(dst))
    sigs[dst] = np.where(from_prev[:, None], prev[src], sigs[src])
    flip = rng.random((len(dst), H)) < rng.uniform(0.05, 0.3, size=(len(dst), 1))
    noise = rng.integers(0, 2**63, size=(len(dst), H), dtype=np.uint64)
    sigs[dst] = np.where(flip, noise, sigs[dst])
    ids = [f"{shard:05d}-{i:06d}-{(shard * 7919 + i) % 999983:06x}" for i in range(n)]
    return ids, sigs


def run_child(impl: str, num_docs: int, shard_docs: int, seed: int, verify: float) -> dict:
    from moeflow.platform.data.lsh import clusters_from_signatures
    from moeflow.platform.data.lsh_sharded import sharded_clusters

    num_shards = -(-num_docs // shard_docs)
    sizes = [min(shard_docs, num_docs - i * shard_docs) for i in range(num_shards)]
    t0 = time.perf_counter()
    if impl == "old":
        keys_by_shard = {i: load_shard(seed, i, sizes[i]) for i in range(num_shards)}
        ids = [d for i in range(num_shards) for d in keys_by_shard[i][0]]
        sigs = np.concatenate([keys_by_shard[i][1] for i in range(num_shards)])
        clusters = clusters_from_signatures(ids, sigs, BANDS, ROWS, threshold=verify)
    else:
        clusters = sharded_clusters(lambda i: load_shard(seed, i, sizes[i]), num_shards, BANDS, ROWS, verify)
    wall = time.perf_counter() - t0
    digest = hashlib.sha256(json.dumps(sorted(sorted(c) for c in clusters)).encode()).hexdigest()[:12]
    return {"impl": impl, "wall_s": round(wall, 2), "clusters": len(clusters),
            "members": sum(map(len, clusters)), "clusters_hash": digest}


def measure(impl: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--num-docs", str(args.num_docs),
           "--shard-docs", str(args.shard_docs), "--seed", str(args.seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{impl} child failed with status {status}")
    result = json.loads(out.strip().splitlines()[-1])
    result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
    result["peak_rss_gb"] = round(usage.ru_maxrss / 2**20, 3)  # ru_maxrss is in KiB on Linux
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-docs", type=int, default=100_000)
    parser.add_argument("--shard-docs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--impl", choices=["old", "new", "both"], default="both")
    parser.add_argument("--child", choices=["old", "new"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.num_docs, args.shard_docs, args.seed, 0.72)))
        return
    impls = ["old", "new"] if args.impl == "both" else [args.impl]
    rows = []
    for _ in range(args.repeats):
        for impl in impls:
            rows.append(measure(impl, args))
            print(json.dumps(rows[-1]), flush=True)
    if len({r["clusters_hash"] for r in rows}) != 1:
        raise SystemExit("the implementations disagree on the clusters")


if __name__ == "__main__":
    main()
