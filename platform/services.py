"""Local services: the Prefect server, the MLflow server, the dashboard and a Ray head.

``moeflow up`` starts each as a detached process (its own session, so it outlives the
CLI), with its log and pid file under ``$MOEFLOW_HOME``; it is idempotent (a healthy
service is left alone, a dead pid file is cleaned up) and health-checked over HTTP.
The environment every service and every flow run shares comes from one function,
``service_env``, so the Prefect server and a flow run always agree on ``PREFECT_HOME``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .compute import RAY_ADDRESS_FILE
from .settings import Settings

OFFLINE_ENV = {
    # Nothing may phone home: this machine (and many clusters) have no internet.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def prefect_env(settings: Settings) -> dict[str, str]:
    """Prefect settings shared by the server and every flow run of this home."""
    env = {
        "PREFECT_HOME": str(settings.prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": settings.prefect_db_url,
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
        # a loaded 2-core machine needs more than the default 20 s to start the embedded server
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # the library's own logging (steps, loss, funnel) goes to the flow run's logs and the terminal
        "PREFECT_LOGGING_EXTRA_LOGGERS": "moeflow",
        "PREFECT_LOCAL_STORAGE_PATH": str(settings.prefect_home / "results"),
    }
    if settings.prefect_api_url:
        env["PREFECT_API_URL"] = settings.prefect_api_url
    return env


def service_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.update(prefect_env(settings))
    env["MOEFLOW_HOME"] = str(settings.home)
    return env


@dataclass
class Service:
    name: str
    command: list[str]
    health_url: str | None
    url: str
    env: dict[str, str] = field(default_factory=dict)
    health_tcp: tuple[str, int] | None = None  # healthy when this port accepts connections
    # other services of this home whose processes may hold this one's port: Ray Serve's HTTP proxy is an
    # actor of the Ray head that `moeflow up` started, not a descendant of the `moeflow serve` process
    port_shared_with: tuple[str, ...] = ()

    @property
    def port(self) -> int | None:
        """The TCP port this service listens on (the flows worker has none of its own)."""
        if self.health_tcp is not None:
            return self.health_tcp[1]
        if self.name == "flows":
            return None
        rest = self.url.split("://", 1)[-1].split("/", 1)[0]
        return int(rest.rsplit(":", 1)[1]) if ":" in rest else None

    def pid_file(self, settings: Settings) -> Path:
        return settings.run_dir / f"{self.name}.pid"

    def log_file(self, settings: Settings) -> Path:
        return settings.log_dir / f"{self.name}.log"


def _python_bin(name: str) -> str:
    """The console script of the running interpreter's environment, else PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def services(settings: Settings) -> dict[str, Service]:
    host = settings.host
    mlflow_env = {}
    if settings.uses_s3:
        mlflow_env = {
            "MLFLOW_S3_ENDPOINT_URL": ("https://" if settings.s3_secure else "http://") + settings.s3_endpoint,
            "AWS_ACCESS_KEY_ID": settings.s3_access_key.get_secret_value() if settings.s3_access_key else "",
            "AWS_SECRET_ACCESS_KEY": settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else "",
        }
    ray_port = settings.ray_port
    flows_env = {
        "PREFECT_API_URL": f"http://{host}:{settings.prefect_port}/api",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # the worker polls its pool this often (default 10 s)
        "MOEFLOW_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri or settings.mlflow_server_url,
    }
    return {
        "prefect": Service(
            name="prefect",
            command=[_python_bin("prefect"), "server", "start", "--host", host, "--port", str(settings.prefect_port),
                     "--analytics-off", "--no-late-runs"],
            health_url=f"http://{host}:{settings.prefect_port}/api/health",
            url=f"http://{host}:{settings.prefect_port}",
        ),
        "mlflow": Service(
            name="mlflow",
            command=[_python_bin("mlflow"), "server", "--backend-store-uri", settings.mlflow_backend,
                     "--artifacts-destination", settings.mlflow_artifacts_root, "--serve-artifacts",
                     "--host", host, "--port", str(settings.mlflow_port), "--workers", "1",
                     "--allowed-hosts", f"{host}:{settings.mlflow_port},localhost:{settings.mlflow_port},{host},localhost"],
            health_url=f"{settings.mlflow_server_url}/health",
            url=settings.mlflow_server_url,
            env=mlflow_env,
        ),
        "dashboard": Service(
            name="dashboard",
            # the server module imports what the pages use before it binds the port, so the health
            # check answers when a first visit is fast (dashboard/server.py)
            command=[sys.executable, "-m", "moeflow.dashboard.server", "--server.port",
                     str(settings.dashboard_port), "--server.address", host, "--server.headless", "true",
                     "--browser.gatherUsageStats", "false"],
            health_url=f"{settings.dashboard_url}/_stcore/health",
            url=settings.dashboard_url,
        ),
        # --block keeps `ray start` in the foreground as the parent of the head's processes, so
        # `moeflow down` stops exactly this head (by process group) and never another Ray on the
        # machine, as `ray stop` would (it kills every Ray of the user, a test's driver included).
        "ray": Service(
            name="ray",
            command=[_python_bin("ray"), "start", "--head", "--block", f"--port={ray_port}",
                     "--include-dashboard=false", f"--node-ip-address={host}",
                     f"--object-store-memory={settings.ray_object_store_mb * 1024 * 1024}", "--disable-usage-stats"]
                    + ([f"--num-cpus={settings.ray_num_cpus}"] if settings.ray_num_cpus else []),
            health_url=None,
            url=f"{host}:{ray_port}",
            health_tcp=(host, ray_port),
            # Ray 2.60 turns token auth on for new clusters, and a driver decides its own mode
            # when it first imports ray; a client that imported ray before setting the mode is
            # then refused. The local head is for this machine's flows only, so it runs without
            # tokens (any client can join); a cluster head configures auth itself.
            env={"RAY_AUTH_MODE": "disabled"},
        ),
        # Every stage's flow as a deployment on a process work pool, and the Prefect worker that
        # runs them, so the UI (and `moeflow run`) can start runs. The module path is a string on
        # purpose: platform/ never imports flows/.
        "flows": Service(
            name="flows",
            command=[sys.executable, "-m", "moeflow.flows.deployments"],
            health_url=f"http://{host}:{settings.prefect_port}/api/deployments/name/pipeline/local",
            url=f"http://{host}:{settings.prefect_port}/deployments",
            env=flows_env,
        ),
        **({"serve": serving} if (serving := _recorded_serving(settings)) else {}),
    }


SERVE_FILE = "serve.json"  # what `moeflow up --serve` serves (model reference, port): status and down read it


def serve_service(settings: Settings, model_ref: str, port: int) -> Service:
    """The OpenAI-compatible gateway, ``moeflow serve --model <ref>``, as a service of ``moeflow up``: it
    serves on the Ray head that ``moeflow up`` started (or its own local Ray without one)."""
    host = settings.host
    return Service(
        name="serve",
        command=[sys.executable, "-m", "moeflow.platform.cli", "serve", "--model", model_ref, "--host", host,
                 "--port", str(port)],
        health_url=f"http://{host}:{port}/health",
        url=f"http://{host}:{port}/v1",
        port_shared_with=("ray",),
    )


def start_serving(settings: Settings, model_ref: str, port: int, timeout: float = 180.0) -> dict:
    """Start (or keep) the serving gateway; recorded first, so ``down`` finds it even if the start fails."""
    settings.ensure_dirs()
    (settings.run_dir / SERVE_FILE).write_text(json.dumps({"model_ref": model_ref, "port": port}))
    return start_service(serve_service(settings, model_ref, port), settings, timeout)


def _recorded_serving(settings: Settings) -> Service | None:
    path = settings.run_dir / SERVE_FILE
    try:
        return serve_service(settings, **json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass(frozen=True)
class PortHolder:
    """The process listening on a port (pid None: a process of another user, or not visible)."""

    port: int
    pid: int | None
    command: str

    def describe(self) -> str:
        who = f"pid {self.pid} ({self.command})" if self.pid is not None else "a process this user cannot see"
        return f"port {self.port} is held by {who}"


def port_holder(port: int) -> PortHolder | None:
    """Who listens on TCP ``port`` (any address), from the kernel's socket table (psutil reads
    /proc/net/tcp{,6} and maps socket inodes to pids); None when nobody does."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return PortHolder(port, conn.pid, _command_line(conn.pid))
    return None


def _command_line(pid: int | None, limit: int = 120) -> str:
    import psutil

    if pid is None:
        return "?"
    try:
        line = " ".join(" ".join(psutil.Process(pid).cmdline()).split()) or psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return "?"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def owns(pid: int, holder: PortHolder) -> bool:
    """Whether ``holder`` belongs to the service we started as ``pid``: that process itself, or a
    process of its session (each service starts in a session of its own, so its servers, workers
    and Ray's GCS share the session id ``pid``) or one of its descendants.

    A live pid plus a URL that answers is not enough: another home's server on the same port
    answers too, while our process fails to bind (or has not bound yet)."""
    import psutil

    if holder.pid is None:
        return False
    if holder.pid == pid:
        return True
    try:
        if os.getsid(holder.pid) == pid:
            return True
        return any(p.pid == pid for p in psutil.Process(holder.pid).parents())
    except (OSError, psutil.Error):
        return False


def service_status(svc: Service, settings: Settings) -> dict:
    """pid file and process, health check, and who holds the port: healthy means our process is
    the one listening and its health check answers. A port held by another process (another home's
    ``moeflow up``, an unrelated server) is named with its pid and command."""
    pid = _read_pid(svc.pid_file(settings))
    running = pid is not None and _pid_alive(pid)
    port = svc.port
    holder = port_holder(port) if port else None
    owners = [pid] + [p for name in svc.port_shared_with
                      if (p := _read_pid(settings.run_dir / f"{name}.pid")) is not None and _pid_alive(p)]
    foreign = holder is not None and not (running and any(owns(o, holder) for o in owners))
    healthy = running and not foreign
    if healthy and port and holder is None:
        healthy = False  # our process has not bound its port (yet)
    if healthy and svc.health_url is not None:
        healthy = http_ok(svc.health_url)
    if healthy and svc.health_tcp is not None:
        healthy = tcp_ok(*svc.health_tcp)
    port_open = (holder is not None) if port else None
    if foreign:
        note = f"{holder.describe()}, not by this home's {svc.name}"
    elif running:
        note = "" if healthy else ("starting or unhealthy" if port_open else "running, port not answering")
    else:
        note = ""
    return {"name": svc.name, "running": running, "healthy": healthy, "pid": pid if running else None,
            "port": port or "", "port_open": port_open, "url": svc.url, "note": note,
            "holder": holder if foreign else None}


def tcp_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start_service(svc: Service, settings: Settings, timeout: float = 120.0) -> dict:
    """Start ``svc`` unless it is already healthy; wait until it answers its health check."""
    settings.ensure_dirs()
    status = service_status(svc, settings)
    if status["holder"] is not None and not status["running"]:
        raise PortTaken(svc.name, status["holder"])
    if status["healthy"]:
        return {**status, "started": False}
    if status["running"]:  # alive but unhealthy: maybe still starting
        if _wait_healthy(svc, settings, timeout):
            return {**service_status(svc, settings), "started": False}
        stop_service(svc, settings)
    svc.pid_file(settings).unlink(missing_ok=True)
    env = service_env(settings)
    env.update(svc.env)
    log = svc.log_file(settings).open("ab")
    log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(svc.command)}\n".encode())
    log.flush()
    proc = subprocess.Popen(svc.command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=settings.home)
    svc.pid_file(settings).write_text(str(proc.pid))
    if not _wait_healthy(svc, settings, timeout, proc):
        foreign = service_status(svc, settings)["holder"]
        stop_service(svc, settings)
        if foreign is not None:  # another process took the port while ours started
            raise PortTaken(svc.name, foreign)
        tail = svc.log_file(settings).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{svc.name} did not become healthy within {timeout:.0f}s; log {svc.log_file(settings)}:\n{tail}")
    if svc.name == "ray":  # flows connect to this head instead of starting their own Ray
        (settings.run_dir / RAY_ADDRESS_FILE).write_text(svc.url)
    return {**service_status(svc, settings), "started": True}


class PortTaken(RuntimeError):
    """A service's port is held by a process that is not ours: starting would report someone else's server."""

    def __init__(self, name: str, holder: PortHolder):
        super().__init__(f"cannot start {name}: {holder.describe()}; stop it, or give this home another port "
                         f"(MOEFLOW_{name.upper()}_PORT)")
        self.holder = holder


def _wait_healthy(svc: Service, settings: Settings, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        status = service_status(svc, settings)
        if status["healthy"]:
            return True
        if status["holder"] is not None:  # another process listens there: ours cannot bind
            return False
        time.sleep(0.5)
    return False


def stop_service(svc: Service, settings: Settings, timeout: float = 20.0) -> bool:
    """Stop ``svc`` (its whole process group); returns whether something was running."""
    if svc.name == "ray":
        (settings.run_dir / RAY_ADDRESS_FILE).unlink(missing_ok=True)
    if svc.name == "serve":
        (settings.run_dir / SERVE_FILE).unlink(missing_ok=True)
    pid = _read_pid(svc.pid_file(settings))
    svc.pid_file(settings).unlink(missing_ok=True)
    if pid is None or not _pid_alive(pid):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                _reap(pid)
                return True
            _reap(pid)
            time.sleep(0.2)
    return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    It survives the exec, so the server goes with the ``moeflow run`` that started it even when that
    run is killed with SIGKILL and no cleanup code of ours can run."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


@contextlib.contextmanager
def temporary_prefect_server(settings: Settings, timeout: float = 180.0) -> Iterator[str]:
    """A Prefect API server over this home's database for one in-process run; yields its API URL.

    Prefect would start one by itself (its "ephemeral" server) as an ordinary child process: when the
    run is killed with SIGKILL that server is orphaned and lives on (~240 MB each), invisible to
    ``moeflow down``/``status``. This one is the same server (Prefect's app under uvicorn, no UI) but
    started with a parent-death signal, so the kernel ends it with its parent, however the parent ends.
    """
    port = _free_port(settings.host)
    env = service_env(settings)
    env.update({"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"})
    env.pop("PREFECT_API_URL", None)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.log_dir / "prefect-temporary.log"
    command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
               "--host", settings.host, "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    with log_path.open("ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} run pid {os.getpid()}: {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=settings.home, preexec_fn=_die_with_parent)
    api = f"http://{settings.host}:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while not http_ok(f"{api}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the temporary Prefect server did not start within {timeout:.0f}s; "
                                   f"log {log_path}:\n{tail}")
            time.sleep(0.2)
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def up(settings: Settings, names: list[str] | None = None, timeout: float = 180.0) -> list[dict]:
    table = services(settings)
    return [start_service(table[n], settings, timeout) for n in (names or list(table))]


def down(settings: Settings, names: list[str] | None = None) -> list[dict]:
    table = services(settings)
    # the gateway first: it shuts its Serve applications down through the Ray head stopped after it
    order = names or sorted(table, key=lambda n: n != "serve")
    return [{"name": n, "stopped": n in table and stop_service(table[n], settings)} for n in order]


def status(settings: Settings) -> list[dict]:
    return [service_status(svc, settings) for svc in services(settings).values()]


def mlflow_server_healthy(settings: Settings) -> bool:
    return service_status(services(settings)["mlflow"], settings)["healthy"]


def prefect_server_healthy(settings: Settings) -> bool:
    return service_status(services(settings)["prefect"], settings)["healthy"]


def effective_tracking_uri(settings: Settings) -> str:
    """The MLflow URI runs actually log to: the configured one, else the local server when
    ``moeflow up`` runs it, else the SQLite backend directly (the server serves the same file)."""
    if settings.mlflow_tracking_uri:
        return settings.mlflow_tracking_uri
    if mlflow_server_healthy(settings):
        return settings.mlflow_server_url
    return settings.tracking_uri


def prefect_api_url(settings: Settings) -> str | None:
    """The Prefect API runs report to: the configured one, else the local server when healthy;
    None means the embedded (ephemeral) server over this home's database."""
    if settings.prefect_api_url:
        return settings.prefect_api_url
    if prefect_server_healthy(settings):
        return f"http://{settings.host}:{settings.prefect_port}/api"
    return None


def deployments_available(settings: Settings) -> bool:
    """Whether ``moeflow up``'s flows service (deployments + worker) is up for runs to go through."""
    return prefect_server_healthy(settings) and service_status(services(settings)["flows"], settings)["healthy"]
