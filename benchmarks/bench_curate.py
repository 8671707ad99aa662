"""CPU benchmark: full curation of the ``python-stdlib`` corpus (time, peak memory, funnel).

    python benchmarks/bench_curate.py [--workers 1] [--max-files N] [--no-tests] [--json out.json]

Runs ``run_curation`` with the ``stdlib`` preset (every .py file of the running
interpreter's standard library, test packages included, site-packages excluded) into a
temporary local store, and prints wall time, throughput, peak RSS, per-step CPU seconds
(wall seconds summed over tasks) and the funnel. With ``--workers 1`` everything runs in this process,
so ``ru_maxrss`` is the whole pipeline's peak memory; with more workers Ray worker
processes are not included in that figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import resource
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-files", type=int, default=None)
    parser.add_argument("--no-tests", action="store_true", help="exclude the stdlib test packages")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-curate-") as tmp:
        os.environ.setdefault("MOEFLOW_HOME", str(Path(tmp) / "home"))
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        from moeflow.platform.data.curate import CurateConfig, run_curation
        from moeflow.platform.data.sources import STDLIB, SourceConfig
        from moeflow.platform.store import LocalStore

        source = SourceConfig(uri=STDLIB, include_tests=not args.no_tests, max_files=args.max_files)
        config = CurateConfig.preset("stdlib", sources=[source])
        store = LocalStore(Path(tmp) / "store")
        t0 = time.perf_counter()
        result = run_curation(config, store, output_prefix=f"datasets/stdlib/curated/{config.config_hash()[:8]}",
                              num_workers=args.workers, progress=False)
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        peak_mib = usage.ru_maxrss / 1024
        cpu_s = usage.ru_utime + usage.ru_stime
        stats = result.stats
        report = {
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "machine": f"{os.cpu_count()}-core CPU, {_platform.machine()}, Python {_platform.python_version()}",
            "workers": args.workers,
            "num_shards": result.num_shards,
            "wall_s": round(wall, 2),
            "cpu_s_this_process": round(cpu_s, 2),  # on a shared machine, CPU time is the steadier figure
            "input_docs": stats["input"]["records"],
            "input_mb": round(stats["input"]["bytes"] / 1e6, 2),
            "docs_per_s": round(stats["input"]["records"] / wall, 1),
            "mb_per_s": round(stats["input"]["bytes"] / 1e6 / wall, 3),
            "peak_rss_mib": round(peak_mib, 1),
            "output_docs": stats["output"]["docs"],
            "output_mb": round(stats["output"]["bytes"] / 1e6, 2),
            "quarantined": stats["quarantined"],
            "step_seconds": result.timings,
            "funnel": [
                {"step": s["step"], "docs_in": s["docs_in"], "docs_out": s["docs_out"], "excluded": s["excluded"]}
                for s in stats["steps"]
            ],
            "by_domain": stats["output"]["by_domain"],
            "by_ppl_bucket": stats["output"]["by_ppl_bucket"],
            "pii": {k: v for s in stats["steps"] if s["step"] == "pii" for k, v in s["counters"].items()},
            "content_hash": result.content_hash,
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
