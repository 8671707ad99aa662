"""The cluster topology on loopback, for the `slow` cluster tests (test_cluster_topology, test_cluster_faults).

- ``RayNodes``: a Ray head (no CPUs, with its dashboard: Ray's State API and Ray Train's controller
  read through it) and worker nodes of one CPU each, every one a ``ray start --block`` in its own
  process group; ``kill_worker`` SIGKILLs one node's whole group (raylet, object store, workers),
  ``add_worker`` starts a replacement, as KubeRay would start a new pod.
- ``scratch_databases``: fresh databases on the machine's shared PostgreSQL, dropped afterwards.
- ``PrivatePostgres``: a PostgreSQL of our own (``initdb`` + ``pg_ctl`` as the ``postgres`` user, a
  free port, trust auth on loopback) that a test may restart; the machine's shared server is never
  restarted (other sessions use it).
- ``tiny_recipe``: the shortened tiny recipe the cluster tests run, and ``cluster_env``: the
  ``MOEFLOW_*`` settings of the topology (S3, databases, Ray, service ports).

Plain classes and functions; the tests own the fixtures built from them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from s3server import free_port
from test_catalog_helpers import PG_ADMIN_URL, require_postgres

BUCKET = "topology"
RAY = str(Path(sys.executable).parent / "ray")


# ------------------------------------------------------------------ Ray
class RayNodes:
    """A head and worker nodes started with `ray start --block` (each in its own process group, so
    stopping them never touches another Ray on this machine, as `ray stop` would)."""

    def __init__(self, log_dir: Path, env: dict):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_dir, self.env = log_dir, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.num_workers = 0

    def _start(self, name: str, args: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"ray-{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             f"--object-store-memory={100 * 1024 * 1024}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, workers: int = 2) -> "RayNodes":
        # the dashboard serves Ray's State API (list_tasks/list_nodes) and Ray Train's controller polls it
        self._start("head", ["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
                             f"--ray-client-server-port={free_port()}"])
        self._wait_nodes(1)
        for _ in range(workers):  # one at a time: two raylets starting together overload 2 cores
            self.add_worker()
        return self

    def add_worker(self, attempts: int = 3) -> str:
        """Start a worker node of one CPU and wait until it runs. A node whose start fails (on a loaded
        machine its raylet can give up waiting for its dashboard agent) is started again, as KubeRay
        restarts a pod that failed to start."""
        for _ in range(attempts):
            name = f"worker{self.num_workers}"
            self.num_workers += 1
            self._start(name, [f"--address={self.address}", "--num-cpus=1"])
            if self._started(name):
                return name
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.procs[name].pid, signal.SIGKILL)
            self.procs.pop(name).wait(timeout=30)
        raise RuntimeError(f"a Ray worker node did not start in {attempts} attempts; logs in {self.log_dir}")

    def _started(self, name: str, timeout: float = 240) -> bool:
        """`ray start` prints "Ray runtime started" once its node has joined; False if it exits first."""
        log, proc = self.log_dir / f"ray-{name}.log", self.procs[name]
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "Ray runtime started" in log.read_text(errors="replace"):
                return True
            if proc.poll() is not None:
                return False
            time.sleep(1)
        return False

    def alive(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is None]

    def kill_worker(self, name: str) -> None:
        """SIGKILL the node's whole process group: raylet, object store and every worker process on it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def _wait_nodes(self, n: int, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run([RAY, "status", f"--address={self.address}"], capture_output=True, text=True,
                                 env=self.env, timeout=60)
            if out.returncode == 0 and out.stdout.count("node_") >= n:
                return
            time.sleep(2)
        raise RuntimeError(f"Ray cluster did not reach {n} nodes; logs in {self.log_dir}")

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------ PostgreSQL
@contextlib.contextmanager
def scratch_databases(*roles: str, admin_url: str = PG_ADMIN_URL):
    """{role: URL} of fresh databases with unique names on ``admin_url``'s server, dropped afterwards."""
    import psycopg

    if admin_url == PG_ADMIN_URL:
        require_postgres()
    names = {role: f"moeflow_topo_{role}_{uuid.uuid4().hex[:10]}" for role in roles}
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rpartition("/")[0]
    try:
        yield {role: f"{base}/{name}" for role, name in names.items()}
    finally:
        with contextlib.suppress(Exception), psycopg.connect(admin_url, autocommit=True) as conn:
            for name in names.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        import pytest

        pytest.skip(f"PostgreSQL's {name} is not installed")
    return found[-1]


class PrivatePostgres:
    """A PostgreSQL server of this test only: its own data directory and port; restartable.

    The data directory is a fresh folder under the system's temp dir (pytest's are private to root,
    and the server runs as ``postgres`` when we are root), removed by ``stop``."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="moeflow-pg-"))
        self.data = self.root / "pgdata"
        self.port = free_port()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *cmd: str, timeout: float = 120) -> None:
        run_as = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]  # initdb refuses root
        # output to a file, not a pipe: the server that pg_ctl starts inherits it and keeps it open
        with tempfile.TemporaryFile("w+") as out_file:
            out = subprocess.run([*run_as, *cmd], stdout=out_file, stderr=subprocess.STDOUT, text=True,
                                 timeout=timeout)
            out_file.seek(0)
            output = out_file.read()
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {output[-2000:]}")

    def _ctl(self, action: str, *extra: str) -> None:
        self._as_postgres(_pg_bin("pg_ctl"), action, "-D", str(self.data), "-w", "-t", "60", *extra)

    def start(self) -> "PrivatePostgres":
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        if not self.data.exists():
            self._as_postgres(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                              "--no-sync", "-E", "UTF8")
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c fsync=off"
        self._ctl("start", "-o", opts, "-l", str(self.data / "server.log"))
        return self

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every open connection is terminated, the data stays."""
        self._ctl("restart", "-m", "fast", "-l", str(self.data / "server.log"))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# ------------------------------------------------------------------ the recipe and the settings
def tiny_recipe(**overrides):
    """The tiny recipe, shortened for 2 shared cores: 24 files in 3 curation shards (the fan-out),
    8 training steps on 2 Ray Train workers, 2 evaluation batches. ``overrides``: more ``key=value``."""
    from moeflow.platform.recipes import load_recipe

    sets = {"pretrain.max_steps": 8, "pretrain.log_every": 2, "pretrain.val_every": 4, "pretrain.checkpoint_every": 4,
            "pretrain.val_batches": 2, "pretrain.warmup_steps": 2, "pretrain.micro_batch_size": 4,
            "pretrain.seq_len": 64, "evaluate.num_batches": 2, "evaluate.batch_size": 4, "num_workers": 2,
            "train_workers": 2, "tokenize.vocab_size": 512, **overrides}
    recipe = load_recipe("tiny", [f"{k}={v}" for k, v in sets.items()])
    recipe["curate"]["sources"][0]["max_files"] = 24
    recipe["curate"]["files_per_shard"] = 8  # 3 shards: curation fans out
    return recipe


def cluster_env(home: Path, s3_endpoint: str, dbs: dict) -> dict[str, str]:
    """The MOEFLOW_* settings of the topology (``dbs``: catalog, mlflow and optionally prefect URLs)."""
    prefect = {"MOEFLOW_PREFECT_DATABASE_URL": dbs["prefect"]} if "prefect" in dbs else {}
    return {**prefect,
        "MOEFLOW_HOME": str(home), "MOEFLOW_S3_ENDPOINT": s3_endpoint, "MOEFLOW_S3_BUCKET": BUCKET,
        "MOEFLOW_S3_ACCESS_KEY": "k", "MOEFLOW_S3_SECRET_KEY": "s", "MOEFLOW_S3_REGION": "us-east-1",
        "MOEFLOW_CATALOG_URL": dbs["catalog"], "MOEFLOW_MLFLOW_BACKEND_URI": dbs["mlflow"],
        "MOEFLOW_PREFECT_PORT": str(free_port()), "MOEFLOW_MLFLOW_PORT": str(free_port()),
        "MOEFLOW_RAY_PLACEMENT_TIMEOUT_S": "300", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
    }


def ray_node_env() -> dict[str, str]:
    """The environment of `ray start` (raylets wait longer for their workers on a loaded machine)."""
    return {**os.environ, "RAY_raylet_start_wait_time_s": "120", "RAY_USAGE_STATS_ENABLED": "0"}
