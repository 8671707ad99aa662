"""Port ownership of ``moeflow up``/``status``: a live pid and a URL that answers is not ownership.

A second home whose ports are held by another server (another home's ``moeflow up``, or anything
else) must not report "started" or "healthy": the check is who listens on the port (pid and its
session), with real processes on real ports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port

# An HTTP server that answers 200 on every path, as another home's Prefect/MLflow would on /api/health.
ANSWERS_EVERYTHING = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"""


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    from moeflow.platform.services import tcp_ok

    deadline = time.monotonic() + timeout
    while not tcp_ok("127.0.0.1", port):
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.1)


@pytest.fixture
def other_server():
    """A real server of someone else on a free port: (port, pid)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", ANSWERS_EVERYTHING, str(port)])
    try:
        _wait_listening(port)
        yield port, proc.pid
    finally:
        proc.kill()
        proc.wait()


def _cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeflow.platform.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_up_fails_naming_the_port_and_its_holder_when_another_server_holds_it(other_server, tmp_path):
    port, holder_pid = other_server
    env = {**os.environ, "MOEFLOW_HOME": str(tmp_path / "home"), "MOEFLOW_PREFECT_PORT": str(port)}
    out = _cli("up", "--only", "prefect", env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "started" not in out.stdout and "already running" not in out.stdout
    assert f"port {port} is held by pid {holder_pid}" in out.stderr and "python" in out.stderr
    assert not (tmp_path / "home" / "run" / "prefect.pid").exists()  # nothing of ours left behind


def test_status_is_not_fooled_by_a_live_pid_and_an_answering_url(other_server, tmp_path, monkeypatch):
    """Our pid file names a live process of ours, the health URL answers, but someone else listens."""
    from moeflow.platform import services
    from moeflow.platform.settings import get_settings

    port, holder_pid = other_server
    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MOEFLOW_MLFLOW_PORT", str(port))
    settings = get_settings()
    settings.ensure_dirs()
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        svc = services.services(settings)["mlflow"]
        svc.pid_file(settings).write_text(str(ours.pid))
        assert services.http_ok(svc.health_url)  # what the old check trusted
        row = services.service_status(svc, settings)
        assert row["running"] and not row["healthy"]
        assert f"port {port} is held by pid {holder_pid}" in row["note"]
        out = _cli("status", env={**os.environ, "MOEFLOW_HOME": str(tmp_path / "home"),
                                  "MOEFLOW_MLFLOW_PORT": str(port)})
        line = next(x for x in out.stdout.splitlines() if x.startswith("mlflow"))
        assert line.split()[2] == "False" and f"pid {holder_pid}" in line
    finally:
        ours.kill()
        ours.wait()


def test_a_listener_in_our_process_session_is_ours(tmp_path):
    """The service's server is often a child (uvicorn worker, Ray's GCS): its session says it is ours."""
    from moeflow.platform.services import owns, port_holder

    port = free_port()
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]])",
                               ANSWERS_EVERYTHING, str(port)], start_new_session=True)
    stranger = None
    try:
        _wait_listening(port)
        holder = port_holder(port)
        assert holder is not None and holder.pid not in (None, parent.pid)
        assert owns(parent.pid, holder)
        stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        assert not owns(stranger.pid, holder)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
        if stranger is not None:
            stranger.kill()
            stranger.wait()
