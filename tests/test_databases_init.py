"""The MLflow and Prefect databases of a fresh home are migrated once, however many runs start together.

Two ``moeflow run`` started at the same moment on a fresh home used to run MLflow's and Prefect's
migrations concurrently on the same SQLite files ("No such index ...", "table ... already exists").
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

INIT = ("import sys; from moeflow.platform.databases import init_databases; "
        "from moeflow.platform.settings import get_settings; print(init_databases(get_settings()))")


def _env(home) -> dict:
    env = {**os.environ, "MOEFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    env.pop("PREFECT_API_URL", None)
    return env


def test_a_waiting_process_skips_what_the_lock_holder_did(tmp_path, monkeypatch):
    from filelock import FileLock

    from moeflow.platform.databases import _wanted
    from moeflow.platform.settings import get_settings

    home = tmp_path / "home"
    monkeypatch.setenv("MOEFLOW_HOME", str(home))
    settings = get_settings()
    settings.ensure_dirs()
    with FileLock(str(settings.run_dir / "databases.lock")):
        child = subprocess.Popen([sys.executable, "-c", INIT], env=_env(home), stdout=subprocess.PIPE, text=True)
        time.sleep(8)
        assert child.poll() is None  # it waits for the holder
        (settings.run_dir / "databases.json").write_text(json.dumps(_wanted(settings)))  # the holder's work
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0 and out.strip().splitlines()[-1] == "False"
    assert not (home / "mlflow.db").exists() and not (home / "prefect" / "prefect.db").exists()


@pytest.mark.slow
def test_three_processes_on_a_fresh_home_migrate_once(tmp_path):
    home = tmp_path / "home"
    procs = [subprocess.Popen([sys.executable, "-c", INIT], env=_env(home), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert sorted(out.strip().splitlines()[-1] for out, _ in results) == ["False", "False", "True"]
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall()
    with sqlite3.connect(home / "mlflow.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("attempt", [1, 2])
def test_two_runs_started_together_on_a_fresh_home_both_succeed(tmp_path, attempt):
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "moeflow.platform.cli", "run", "smoke", "--local"]
    procs = [subprocess.Popen(cmd, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
