"""Home and store edge cases end in one or two lines naming the path or setting, never a traceback,
are not retried, and a run that could not start is still in the catalog as failed.

Real processes (the console entry), a real read-only file system (a read-only tmpfs mounted for the
test when this user may mount, else a directory without write permission) and a real S3 server
(moto with signature checks on) whose credentials are wrong.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeflow.platform.catalog import Catalog


def _cli(*args: str, env: dict, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeflow.platform.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _env(**values: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEFLOW_S3_")}
    env.pop("PREFECT_API_URL", None)
    env.update(values)
    return env


def _one_or_two_lines(out: subprocess.CompletedProcess) -> list[str]:
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert 1 <= len(lines) <= 2 and "Traceback" not in out.stderr, out.stderr
    return lines


@contextlib.contextmanager
def read_only_dir(path: Path):
    """A directory nobody can write: a read-only tmpfs (as root), else mode 0555."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"root without permission to mount a read-only tmpfs: {mounted.stderr.decode()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_an_empty_moeflow_home_is_refused_not_taken_as_the_current_directory(tmp_path):
    out = _cli("run", "smoke", "--local", env=_env(MOEFLOW_HOME=""), cwd=tmp_path)
    (line,) = _one_or_two_lines(out)
    assert "MOEFLOW_HOME=''" in line and "empty" in line
    assert list(tmp_path.iterdir()) == []  # nothing was created in the current directory
    shown = _cli("config", "show", env=_env(MOEFLOW_HOME=""), cwd=tmp_path)
    assert shown.returncode == 2 and "MOEFLOW_HOME" in shown.stderr


def test_an_uncreatable_home_is_one_line_naming_the_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv in (["run", "smoke", "--local"], ["up", "--only", "dashboard"]):
        out = _cli(*argv, env=_env(MOEFLOW_HOME=str(blocker / "home")))
        (line,) = _one_or_two_lines(out)
        assert f"cannot create {blocker / 'home'}" in line and "MOEFLOW_HOME" in line


def test_a_read_only_store_fails_at_once_without_retries_and_is_recorded(tmp_path):
    home = tmp_path / "home"
    with read_only_dir(tmp_path / "ro") as store:
        out = _cli("run", "smoke", "--local", env=_env(MOEFLOW_HOME=str(home), MOEFLOW_STORE_DIR=str(store)))
    lines = _one_or_two_lines(out)
    assert str(store) in lines[0] and "not writable" in lines[0] and "MOEFLOW_STORE_DIR" in lines[0]
    assert "Retry" not in out.stdout + out.stderr
    with Catalog(f"sqlite:///{home / 'catalog.db'}") as cat:
        (run,) = cat.list_runs()
    assert run["stage"] == "smoke" and run["status"] == "failed" and str(store) in run["error"]
    assert run["id"] in lines[1]


@pytest.mark.slow  # a Prefect test server: ~60 s on 2 loaded cores
def test_a_store_that_turns_read_only_inside_a_stage_fails_it_with_the_reason_and_no_retry(tmp_path, monkeypatch):
    """The stage path (a run started from the Prefect UI skips the CLI's check): the local store's
    refusal is an AuthError naming the directory, the Prefect task does not retry it, the run is failed."""
    from prefect.testing.utilities import prefect_test_harness

    from moeflow.flows.smoke import smoke
    from moeflow.platform.store import AuthError

    home = tmp_path / "home"
    monkeypatch.setenv("MOEFLOW_HOME", str(home))
    monkeypatch.setenv("MOEFLOW_TRACKING", "noop")
    with read_only_dir(tmp_path / "ro") as store:
        monkeypatch.setenv("MOEFLOW_STORE_DIR", str(store))
        with prefect_test_harness(server_startup_timeout=180):
            state = smoke(return_state=True)
            with pytest.raises(AuthError, match=f"cannot write to the store {store}"):
                state.result()
            from prefect import get_client

            with get_client(sync_client=True) as client:
                task_runs = client.read_task_runs()
    assert [tr.run_count for tr in task_runs if tr.name.startswith("smoke-write")] == [1]  # no retries
    with Catalog(f"sqlite:///{home / 'catalog.db'}") as cat:
        (run,) = cat.list_runs()
    assert run["status"] == "failed" and str(store) in run["error"]


@pytest.fixture(scope="module")
def moto():
    from s3server import moto_s3_server

    with moto_s3_server() as server:
        yield server


def test_refused_s3_credentials_are_one_line_and_leave_a_failed_run(moto, tmp_path, monkeypatch):
    from moeflow.platform.settings import get_settings
    from moeflow.platform.stage import stage_run
    from moeflow.platform.store import AuthError

    home = tmp_path / "home"
    s3 = {"MOEFLOW_S3_ENDPOINT": moto.endpoint, "MOEFLOW_S3_REGION": "us-east-1", "MOEFLOW_S3_BUCKET": "refused"}
    with moto.iam_auth() as (access, _secret):
        s3.update(MOEFLOW_S3_ACCESS_KEY=access, MOEFLOW_S3_SECRET_KEY="wrong")
        out = _cli("run", "smoke", "--local", env=_env(MOEFLOW_HOME=str(home), **s3))
        lines = _one_or_two_lines(out)
        assert "credentials refused" in lines[0] and "MOEFLOW_S3_SECRET_KEY" in lines[0]
        # the stage itself (a run from the Prefect UI): the catalog run exists before the store opens
        for key, value in s3.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("MOEFLOW_HOME", str(home))
        monkeypatch.setenv("MOEFLOW_TRACKING", "noop")
        with pytest.raises(AuthError):
            with stage_run("smoke", {"message": "x"}, settings=get_settings()):
                pass
    with Catalog(f"sqlite:///{home / 'catalog.db'}") as cat:
        runs = cat.list_runs()
    assert [r["status"] for r in runs] == ["failed", "failed"]
    assert "credentials refused" in runs[1]["error"] and "AuthError" in runs[0]["error"]
