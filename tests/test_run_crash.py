"""kill -9 of a run: nothing is orphaned, and the run reads "crashed" everywhere on the next start.

The fast tests kill real processes that own catalog runs and check the recovery (catalog, MLflow on
its SQLite backend); the slow one kills a real ``moeflow run curate --local`` mid-run and checks that
its temporary Prefect server died with it and that the next run marks the killed run crashed in the
catalog, MLflow and Prefect.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest


def _dead_owner() -> str:
    """The owner string of a real process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "from moeflow.platform.catalog.owner import this_process; "
                             "print(this_process())"], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    return out.strip()


def test_runs_of_dead_processes_become_crashed_and_others_are_left_alone(tmp_path):
    from sqlalchemy import text

    from moeflow.platform.catalog import Catalog
    from moeflow.platform.catalog.owner import Owner, this_process

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    owner = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                              "from moeflow.platform.catalog import Catalog\n"
                              "cat = Catalog(sys.argv[1]); print(cat.start_run('pretrain', {}), flush=True)\n"
                              "time.sleep(600)", url], stdout=subprocess.PIPE, text=True)
    try:
        killed = owner.stdout.readline().strip()
        with Catalog(url) as cat:
            mine = cat.start_run("sft", {})  # this process: alive
            me = this_process()
            reused = cat.start_run("reward", {}, owner=str(Owner(me.host, me.pid, me.start_time - 100)))
            elsewhere = cat.start_run("align", {}, owner=str(Owner("another-host", 1, 1.0)))
            legacy = cat.start_run("distill", {})
            with cat.engine.begin() as conn:  # a row written before runs had owners
                conn.execute(text("UPDATE runs SET owner = NULL WHERE id = :id"), {"id": legacy})
            finished = cat.start_run("evaluate", {}, owner=_dead_owner())
            cat.finish_run(finished, "succeeded")

            assert {r["id"] for r in cat.mark_dead_runs_crashed()} == {reused}  # the owner process still lives
            os.kill(owner.pid, signal.SIGKILL)
            owner.wait()
            assert {r["id"] for r in cat.mark_dead_runs_crashed()} == {killed}
            status = {r["id"]: r["status"] for r in cat.list_runs()}
            assert status == {killed: "crashed", reused: "crashed", mine: "running", elsewhere: "running",
                              legacy: "running", finished: "succeeded"}
            assert f"pid {owner.pid}" in cat.get_run(killed)["error"]
            assert cat.mark_dead_runs_crashed() == []
    finally:
        owner.kill()
        owner.wait()


def test_recovery_marks_catalog_and_mlflow(tmp_path):
    from moeflow.platform.catalog import Catalog
    from moeflow.platform.recovery import recover_crashed_runs
    from moeflow.platform.tracking.mlflow_tracker import MLflowTracker

    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=(tmp_path / "art").as_uri())
    with Catalog(f"sqlite:///{tmp_path / 'catalog.db'}") as cat:
        run_id = cat.start_run("pretrain", {}, owner=_dead_owner())
        with tracker.start_run("pretrain") as mlflow_run_id:
            cat.set_run_ids(run_id, mlflow_run_id=mlflow_run_id)
        # a killed process never ended its MLflow run: put it back to RUNNING as it was left
        tracker.client.update_run(mlflow_run_id, status="RUNNING")
        alive = cat.start_run("sft", {})
        crashed = recover_crashed_runs(cat, tracker)
        assert [r["id"] for r in crashed] == [run_id]
        row = cat.get_run(run_id)
        assert row["status"] == "crashed" and "ended without finishing" in row["error"] and row["ended_at"]
        assert cat.get_run(alive)["status"] == "running"
        info = tracker.client.get_run(mlflow_run_id)
        assert info.info.status == "KILLED" and info.data.tags["moeflow.status"] == "crashed"
        assert recover_crashed_runs(cat, tracker) == []  # once


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_kill_9_of_moeflow_run_orphans_nothing_and_the_next_run_marks_it_crashed(tmp_path):
    import psutil
    from mlflow.tracking import MlflowClient

    from moeflow.platform.catalog import Catalog

    home = tmp_path / "home"
    env = {**os.environ, "MOEFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    env.pop("PREFECT_API_URL", None)
    cli = [sys.executable, "-m", "moeflow.platform.cli", "run"]
    run = subprocess.Popen([*cli, "curate", "--local"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        running = []
        while not running:  # the stage has started: its catalog run and MLflow run exist
            assert run.poll() is None and time.monotonic() < deadline, "curate ended before it could be killed"
            time.sleep(0.5)
            if (home / "catalog.db").exists():
                with Catalog(f"sqlite:///{home / 'catalog.db'}") as cat:
                    running = [r for r in cat.list_runs(status="running") if r["mlflow_run_id"]]
        children = _descendants(run.pid)
        server = [p for p in children if "prefect.server.api.server:create_app" in " ".join(p.cmdline())]
        assert len(server) == 1, [p.cmdline() for p in children]
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        gone, alive = psutil.wait_procs(server, timeout=30)
        assert not alive, "the temporary Prefect server outlived its killed run"
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    killed = running[0]
    with Catalog(f"sqlite:///{home / 'catalog.db'}") as cat:
        assert cat.get_run(killed["id"])["status"] == "running"  # nobody could say otherwise yet

    after = subprocess.run([*cli, "smoke", "--local"], env=env, capture_output=True, text=True, timeout=400)
    assert after.returncode == 0, after.stdout[-2000:] + after.stderr[-2000:]
    with Catalog(f"sqlite:///{home / 'catalog.db'}") as cat:
        row = cat.get_run(killed["id"])
        assert row["status"] == "crashed" and f"pid {run.pid}" in row["error"], row
    mlflow_run = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}").get_run(killed["mlflow_run_id"])
    assert mlflow_run.info.status == "KILLED"
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        (state,) = db.execute("SELECT state_type FROM flow_run WHERE id = ?",
                              (killed["prefect_flow_run_id"],)).fetchone()
    assert state == "CRASHED"
    leftovers = [p for p in psutil.process_iter(["cmdline", "environ"])
                 if (p.info["environ"] or {}).get("MOEFLOW_HOME") == str(home)]
    assert not leftovers, [p.info["cmdline"] for p in leftovers]


def test_up_marks_runs_of_dead_processes_crashed(tmp_path):
    from conftest import free_port
    from moeflow.platform.catalog import Catalog

    home = tmp_path / "home"
    env = {**os.environ, "MOEFLOW_HOME": str(home), "MOEFLOW_DASHBOARD_PORT": str(free_port())}
    home.mkdir()
    with Catalog(f"sqlite:///{home / 'catalog.db'}") as cat:
        run_id = cat.start_run("pretrain", {}, owner=_dead_owner())
    cli = [sys.executable, "-m", "moeflow.platform.cli"]
    try:
        up = subprocess.run([*cli, "up", "--only", "dashboard"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"run {run_id} (pretrain" in up.stdout and "marked crashed" in up.stdout
    finally:
        subprocess.run([*cli, "down", "--only", "dashboard"], env=env, capture_output=True, timeout=120)
    with Catalog(f"sqlite:///{home / 'catalog.db'}") as cat:
        assert cat.get_run(run_id)["status"] == "crashed"
