"""Start a real MLflow tracking server for tests (a plain context manager, reusable as a fixture).

    with mlflow_server(tmp_dir) as url:      # url = "http://127.0.0.1:<free port>"
        MLflowTracker(url, "exp")...

The server gets one worker and no job execution (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=
false``): MLflow 3's default takes ~1.8 GB, this ~0.5 GB. It runs in its own process
group so stopping it also stops the uvicorn worker it spawns. Start-up costs several
seconds (importing MLflow, migrating a fresh SQLite backend): start it once per module or
session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def mlflow_server(
    root: str | os.PathLike,
    *,
    backend_uri: str | None = None,
    artifact_root: str | None = None,
    port: int | None = None,
    start_timeout_s: float = 120.0,
) -> Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1 with its state under ``root``; yield its URL.

    ``backend_uri`` defaults to ``sqlite:///<root>/mlflow.db`` and ``artifact_root`` to
    ``<root>/artifacts`` (clients write artefacts there directly: same machine).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    backend_uri = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
    artifact_root = artifact_root or (root / "artifacts").resolve().as_uri()
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--default-artifact-root", artifact_root,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]
    log_path = root / f"mlflow-server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-4000:]
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "timed out"
                raise RuntimeError(f"MLflow server at {url} {state}; log {log_path}:\n{tail}")
            time.sleep(0.25)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # the group we created: the server and its worker
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
