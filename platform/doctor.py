"""``moeflow doctor``: check a cluster configuration before a run finds out the hard way.

Each configured service is checked for the thing a stage would need from it, and each
problem is reported in one line naming the setting to fix:

- object store: S3 endpoint reachable, credentials accepted, bucket exists (or the local
  store directory is writable);
- catalog: the database answers and its schema is at the shipped migration head (an old
  schema means ``alembic upgrade`` has not run; a newer one means an older moeflow);
- MLflow: an ``http(s)://`` tracking server answers ``/health``; a database URI connects;
- Prefect: the API answers ``/health`` and the work pool the deployments use exists;
- Ray: the cluster address answers, and when asked, ``ray.cluster_resources()`` has the
  CPUs/GPUs a run needs.

Checks are independent (one broken service does not hide the others) and bounded by short
timeouts. Nothing is created or changed: doctor only reads.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .settings import Settings

TIMEOUT_S = 3.0


@dataclass
class Check:
    name: str  # store | catalog | mlflow | prefect | ray
    ok: bool
    detail: str  # what was checked, or what is wrong and which setting to fix

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name:<8} {self.detail}"


def _tcp(host: str, port: int, timeout: float = TIMEOUT_S) -> str | None:
    """None when host:port accepts a connection, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _http_json(url: str, timeout: float = TIMEOUT_S) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - configured URL
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        return exc.code, None
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        return status, body.decode(errors="replace")


def _split_host_port(endpoint: str, default_port: int) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host:
        return endpoint, default_port
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- the checks
def check_store(settings: Settings) -> Check:
    from .store import AuthError, BucketNotFoundError, StoreError, s3_config

    if not settings.uses_s3:
        root = settings.store_root
        probe = root / ".doctor-probe"
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return Check("store", False, f"local store {root} is not writable ({exc.strerror}): set MOEFLOW_STORE_DIR")
        return Check("store", True, f"local store {root} is writable")
    try:
        host, port = _split_host_port(settings.s3_endpoint, 443 if settings.s3_secure else 80)
    except ValueError:
        return Check("store", False, f"MOEFLOW_S3_ENDPOINT={settings.s3_endpoint!r} is not host:port")
    if (why := _tcp(host, port)) is not None:
        return Check("store", False, f"S3 endpoint {settings.s3_endpoint} unreachable ({why}): check MOEFLOW_S3_ENDPOINT")
    from dataclasses import replace

    from .store.s3 import RetryPolicy, S3Store

    config = replace(s3_config(settings), connect_timeout_s=TIMEOUT_S, read_timeout_s=TIMEOUT_S,
                     retry=RetryPolicy(tries=1))
    store = S3Store(config, settings.s3_bucket)
    try:
        store.list("doctor-probe-none")  # a signed request: credentials and bucket in one call
    except AuthError:
        return Check("store", False, f"S3 credentials refused by {settings.s3_endpoint}: "
                                     "check MOEFLOW_S3_ACCESS_KEY / MOEFLOW_S3_SECRET_KEY")
    except BucketNotFoundError:
        return Check("store", False, f"bucket s3://{settings.s3_bucket} does not exist on {settings.s3_endpoint}: "
                                     "create it or set MOEFLOW_S3_BUCKET")
    except StoreError as exc:
        return Check("store", False, f"S3 {settings.s3_endpoint}: {str(exc).splitlines()[0]}")
    return Check("store", True, f"s3://{settings.s3_bucket} on {settings.s3_endpoint}: credentials accepted")


def check_catalog(settings: Settings) -> Check:
    from sqlalchemy.exc import SQLAlchemyError

    from .catalog.db import current_revisions, head_revisions, make_engine
    from .settings import _mask_url

    url = settings.catalog_db_url
    shown = _mask_url(url)
    try:
        engine = make_engine(url)
    except Exception as exc:  # noqa: BLE001 - a bad URL is a user error here
        return Check("catalog", False, f"MOEFLOW_CATALOG_URL={shown!r} is not usable: {str(exc).splitlines()[0]}")
    try:
        with engine.connect() as conn:
            current = current_revisions(conn)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        return Check("catalog", False, f"catalog database {shown} unreachable: {reason} (MOEFLOW_CATALOG_URL)")
    finally:
        engine.dispose()
    heads = head_revisions()
    if not current:
        return Check("catalog", True, f"catalog {shown} reachable, no schema yet: the first run migrates it")
    if current != heads:
        return Check("catalog", False, f"catalog {shown} schema at {sorted(current)}, this moeflow needs "
                                       f"{sorted(heads)}: migrate it (or upgrade moeflow)")
    return Check("catalog", True, f"catalog {shown} at migration head {sorted(heads)}")


def check_mlflow(settings: Settings) -> Check:
    uri = settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        try:
            status, _ = _http_json(uri.rstrip("/") + "/health")
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
            return Check("mlflow", False, f"MLflow server {uri} unreachable ({reason}): check MOEFLOW_MLFLOW_TRACKING_URI")
        if status != 200:
            return Check("mlflow", False, f"MLflow server {uri} answered {status} on /health")
        return Check("mlflow", True, f"MLflow server {uri} is healthy")
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    from .settings import _mask_url

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.exists():  # the embedded default before the first run: MLflow creates it
            folder = next((p for p in path.parents if p.exists()), None)
            if folder is None or not os.access(folder, os.W_OK):
                return Check("mlflow", False, f"MLflow backend {uri}: {path.parent} cannot be created")
            return Check("mlflow", True, f"MLflow backend {uri} (created by the first run)")
    try:
        engine = create_engine(uri)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        return Check("mlflow", False, f"MLflow backend {_mask_url(uri)} unreachable: {reason}")
    return Check("mlflow", True, f"MLflow backend {_mask_url(uri)} connects")


def check_prefect(settings: Settings, work_pool: str | None = None) -> Check:
    from .stages import WORK_POOL

    pool = work_pool or WORK_POOL
    api = settings.prefect_url.rstrip("/")
    try:
        status, _ = _http_json(f"{api}/health")
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        return Check("prefect", False, f"Prefect API {api} unreachable ({reason}): check MOEFLOW_PREFECT_API_URL")
    if status != 200:
        return Check("prefect", False, f"Prefect API {api} answered {status} on /health")
    try:
        status, _ = _http_json(f"{api}/work_pools/{pool}")
    except OSError as exc:
        return Check("prefect", False, f"Prefect API {api} failed reading work pool {pool!r}: {exc}")
    if status == 404:
        return Check("prefect", False, f"work pool {pool!r} does not exist on {api}: start the flows service "
                                       "(`moeflow up --only flows`) or the compose `worker`")
    if status != 200:
        return Check("prefect", False, f"Prefect API {api} answered {status} for work pool {pool!r}")
    return Check("prefect", True, f"Prefect API {api} is healthy; work pool {pool!r} exists")


def check_ray(settings: Settings, min_cpus: float = 0, min_gpus: float = 0) -> Check:
    address = settings.ray_address
    if not address:
        return Check("ray", True, "no MOEFLOW_RAY_ADDRESS: each run starts a local Ray")
    if address.startswith("ray://"):
        target = address[len("ray://"):]
        default = 10001
    else:
        target, default = address, 6379
    try:
        host, port = _split_host_port(target, default)
    except ValueError:
        return Check("ray", False, f"MOEFLOW_RAY_ADDRESS={address!r} is not host:port")
    if (why := _tcp(host, port)) is not None:
        return Check("ray", False, f"Ray cluster {address} unreachable ({why}): check MOEFLOW_RAY_ADDRESS")
    if not (min_cpus or min_gpus):
        return Check("ray", True, f"Ray cluster {address} answers")
    resources = ray_resources(address)
    if not resources:
        return Check("ray", False, f"Ray cluster {address} answers but a driver could not connect to read its resources")
    have_cpu, have_gpu = resources.get("CPU", 0), resources.get("GPU", 0)
    if have_cpu < min_cpus or have_gpu < min_gpus:
        return Check("ray", False, f"Ray cluster {address} has {have_cpu:g} CPU / {have_gpu:g} GPU, "
                                   f"need {min_cpus:g} CPU / {min_gpus:g} GPU: add worker nodes")
    return Check("ray", True, f"Ray cluster {address}: {have_cpu:g} CPU / {have_gpu:g} GPU over "
                              f"{resources.get('nodes', '?')} node(s)")


def ray_resources(address: str) -> dict:
    """{CPU, GPU, nodes} of the cluster, read by a short-lived driver in a subprocess (a doctor
    must not leave this process connected to a cluster, or start one)."""
    import subprocess
    import sys

    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); r = ray.cluster_resources(); "
            "print(json.dumps({'CPU': r.get('CPU', 0), 'GPU': r.get('GPU', 0), "
            "'nodes': sum(n['Alive'] for n in ray.nodes())}))" % address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if out.returncode != 0:
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_checks(settings: Settings, min_cpus: float = 0, min_gpus: float = 0, work_pool: str | None = None) -> list[Check]:
    """Every check, each isolated: an unexpected error becomes that check's FAIL line."""
    checks = [("store", lambda: check_store(settings)), ("catalog", lambda: check_catalog(settings)),
              ("mlflow", lambda: check_mlflow(settings)), ("prefect", lambda: check_prefect(settings, work_pool)),
              ("ray", lambda: check_ray(settings, min_cpus, min_gpus))]
    results = []
    for name, fn in checks:
        try:
            results.append(fn())
        except Exception as exc:  # noqa: BLE001 - one line per problem, never a traceback
            results.append(Check(name, False, f"check failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    return results
