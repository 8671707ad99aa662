"""Two OS processes write to one catalog at once (SQLite file and PostgreSQL).

Both open a *fresh* database at the same moment (so they race the migration too), then
wait on a start file and each record runs with lineage, registering the same shared
dataset URI and new versions of the same dataset and model names (so they race the
version numbers). Afterwards no row may be missing and no process may have failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_catalog_helpers import pg_scratch_database

from moeflow.platform.catalog import Catalog

NUM_WORKERS = 2
RUNS_PER_WORKER = 50
SHARED_URI = "file:///shared/raw"

WORKER = r"""
import sys, time
from pathlib import Path
from moeflow.platform.catalog import Catalog

url, worker, num_runs, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
cat = Catalog(url)  # both workers migrate the fresh database at once
Path(f"{go}.ready{worker}").touch()
deadline = time.time() + 60
while not go.exists():
    if time.time() > deadline:
        sys.exit("start file never appeared")
    time.sleep(0.002)
for i in range(num_runs):
    run_id = cat.start_run("work", {"worker": worker, "i": i})
    cat.register_dataset("shared-raw", sys.argv[5], "h-raw")
    out = f"file:///out/{worker}/{i}"
    cat.register_dataset("out", out, f"h-{worker}-{i}", {"i": i})
    cat.add_lineage(run_id, inputs=[sys.argv[5]], outputs=[out])
    cat.register_model("m", f"file:///models/{worker}/{i}", "cfg", metrics={"i": i})
    cat.finish_run(run_id, metrics={"i": i})
cat.close()
print("done", worker)
"""


def _run_workers(url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(w), str(RUNS_PER_WORKER), str(go), SHARED_URI],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for w in range(NUM_WORKERS)
    ]
    try:
        deadline = time.time() + 60
        while not all(Path(f"{go}.ready{w}").exists() for w in range(NUM_WORKERS)):
            if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for w, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"worker {w} failed:\n{err}"
        assert f"done {w}" in out


def _check(url: str) -> None:
    total = NUM_WORKERS * RUNS_PER_WORKER
    with Catalog(url) as cat:
        runs = cat.list_runs(limit=10 * total, stage="work")
        assert len(runs) == total
        assert {r["status"] for r in runs} == {"succeeded"}
        assert {(r["config"]["worker"], r["config"]["i"]) for r in runs} == {
            (str(w), i) for w in range(NUM_WORKERS) for i in range(RUNS_PER_WORKER)
        }
        assert all(r["inputs"] == [SHARED_URI] and len(r["outputs"]) == 1 for r in runs)

        outs = cat.list_datasets(name="out", limit=10 * total)
        assert sorted(d["version"] for d in outs) == list(range(1, total + 1))
        assert len(cat.list_datasets(name="shared-raw")) == 1
        models = cat.list_models(name="m", limit=10 * total)
        assert sorted(m["version"] for m in models) == list(range(1, total + 1))

        down = cat.downstream(SHARED_URI)
        assert sum(n["type"] == "run" for n in down) == total
        assert {n["uri"] for n in down if n["type"] == "artifact"} == {
            f"file:///out/{w}/{i}" for w in range(NUM_WORKERS) for i in range(RUNS_PER_WORKER)
        }


def test_two_processes_write_one_sqlite_catalog(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    _run_workers(url, tmp_path)
    _check(url)


@pytest.mark.service
def test_two_processes_write_one_postgres_catalog(tmp_path):
    with pg_scratch_database() as url:
        _run_workers(url, tmp_path)
        _check(url)


def test_wal_switch_waits_for_a_lock_instead_of_failing(tmp_path):
    """Switching a fresh file to WAL needs an exclusive lock and SQLite's busy handler does not
    wait for it; a second opener must retry rather than fail with "database is locked"."""
    import sqlite3
    import threading
    import time

    from moeflow.platform.catalog.db import _enable_wal

    path = tmp_path / "fresh.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE t (x)")
    threading.Timer(0.4, lambda: holder.execute("COMMIT")).start()
    other = sqlite3.connect(path, timeout=0.05, isolation_level=None, check_same_thread=False)
    t0 = time.monotonic()
    _enable_wal(other.cursor(), timeout_s=10)
    assert time.monotonic() - t0 >= 0.3
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    holder.close()
    other.close()
