"""The fast halves of the cluster fault tests (test_cluster_faults.py runs them in the whole topology):

- the S3 retry budget comes from the settings (``MOEFLOW_S3_RETRY_TRIES``, ``..._MAX_DELAY_S``), and a
  store built from them rides out an S3 server restart that the default budget does not; a write that
  fails leaves no visible artefact, and the next one commits it whole;
- the catalog survives a PostgreSQL restart between two writes (its pool is pre-pinged), on a private
  PostgreSQL server of this module (the machine's shared one is never restarted);
- Ray Train's ``FailureConfig`` comes from ``MOEFLOW_RAY_MAX_FAILURES``.
"""

from __future__ import annotations

import sys
import threading
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import MotoS3  # noqa: E402
from topology import PrivatePostgres, scratch_databases  # noqa: E402

from moeflow.platform.settings import Settings
from moeflow.platform.store import open_store, s3_config
from moeflow.platform.store.errors import NotFoundError, TransientError
from moeflow.platform.store.s3 import RetryPolicy


def _settings(endpoint: str, bucket: str, **kw) -> Settings:
    return Settings(s3_endpoint=endpoint, s3_bucket=bucket, s3_access_key="k", s3_secret_key="s",
                    s3_region="us-east-1", **kw)


def test_the_s3_retry_budget_comes_from_the_settings():
    assert s3_config(_settings("h:1", "b")).retry == RetryPolicy()  # defaults unchanged: 4 tries, 5 s cap
    tuned = s3_config(_settings("h:1", "b", s3_retry_tries=9, s3_retry_max_delay_s=1.5))
    assert (tuned.retry.tries, tuned.retry.max_delay_s) == (9, 1.5)
    assert s3_config(_settings("h:1", "b", s3_retry_tries=9), retry=RetryPolicy(tries=1)).retry.tries == 1
    with pytest.raises(ValueError, match="s3_retry_tries"):
        Settings(s3_retry_tries=0)


def _restart_during(moto: MotoS3, store, outage_s: float) -> list[BaseException]:
    """Stop the server, write an artefact while it is down, start it again ``outage_s`` later."""
    errors: list[BaseException] = []
    moto.stop()
    restart = threading.Timer(outage_s, moto.start)
    restart.start()
    try:
        with store.write_artifact("run/out") as w:
            w.put_bytes("a.bin", b"a" * 1000)
            w.put_json("b.json", {"b": 1})
    except TransientError as exc:
        errors.append(exc)
    restart.join()  # the server is back before the caller looks
    return errors


@pytest.mark.service
def test_a_store_from_the_settings_rides_out_an_s3_restart_that_the_default_does_not():
    moto = MotoS3().start()
    try:
        bucket = f"t-{uuid.uuid4().hex[:12]}"
        short = open_store(_settings(moto.endpoint, bucket, s3_retry_tries=2, s3_retry_max_delay_s=0.2),
                           create_bucket=True)
        errors = _restart_during(moto, short, outage_s=1.5)
        assert len(errors) == 1 and "failed after 2 attempt(s)" in str(errors[0])
        with pytest.raises(NotFoundError):  # nothing visible of the failed write
            short.read_artifact("run/out")
        long = open_store(_settings(moto.endpoint, bucket, s3_retry_tries=10, s3_retry_max_delay_s=0.5))
        assert _restart_during(moto, long, outage_s=1.5) == []
        art = long.read_artifact("run/out")
        assert art.get_json("b.json") == {"b": 1} and art.get_bytes("a.bin") == b"a" * 1000
    finally:
        moto.stop()


@pytest.fixture(scope="module")
def private_pg():
    pg = PrivatePostgres().start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.mark.service
def test_the_catalog_reconnects_after_a_postgres_restart(private_pg):
    from moeflow.platform.catalog import Catalog

    with scratch_databases("catalog", admin_url=private_pg.admin_url) as dbs:
        catalog = Catalog(dbs["catalog"])
        try:
            run_id = catalog.start_run("curate", {"a": 1})  # a pooled connection now exists
            private_pg.restart()  # ... and the server has closed it
            catalog.add_lineage(run_id, outputs=["s3://b/datasets/x"])
            catalog.finish_run(run_id, status="succeeded")
            run = catalog.get_run(run_id)
            assert run["status"] == "succeeded"
        finally:
            catalog.close()


def test_ray_train_failure_config_comes_from_the_settings(monkeypatch):
    from moeflow.platform.train.ray_launch import failure_config

    assert failure_config(Settings()).max_failures == 2
    monkeypatch.setenv("MOEFLOW_RAY_MAX_FAILURES", "5")
    assert failure_config(Settings()).max_failures == 5
    assert failure_config(Settings(), max_failures=0).max_failures == 0
    with pytest.raises(ValueError, match="ray_max_failures"):
        Settings(ray_max_failures=-2)
