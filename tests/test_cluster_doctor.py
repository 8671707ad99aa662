"""``moeflow doctor`` against real services: a moto S3 server, PostgreSQL scratch databases (the
catalog, MLflow's backend), an MLflow server, Prefect's test server; each also misconfigured (wrong
port, wrong credentials, missing bucket, unmigrated schema, missing work pool), one line naming it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlflow_server import mlflow_server  # noqa: E402
from s3server import free_port, moto_s3_server  # noqa: E402
from test_catalog_helpers import pg_scratch_database  # noqa: E402

from moeflow.platform import doctor  # noqa: E402
from moeflow.platform.settings import get_settings  # noqa: E402

pytestmark = [pytest.mark.service, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def moto():
    with moto_s3_server() as server:
        yield server


def _s3(moto, **kw):
    values = dict(s3_endpoint=moto.endpoint, s3_access_key="k", s3_secret_key="s", s3_region="us-east-1",
                  s3_bucket="doctor")
    values.update(kw)
    return get_settings(**values)


def test_store_checks(moto, tmp_path):
    from moeflow.platform.store import open_store

    missing = doctor.check_store(_s3(moto))
    assert not missing.ok and "bucket s3://doctor does not exist" in missing.detail and "MOEFLOW_S3_BUCKET" in missing.detail
    open_store(_s3(moto), create_bucket=True)
    good = doctor.check_store(_s3(moto))
    assert good.ok, good.detail
    port = free_port()
    down = doctor.check_store(_s3(moto, s3_endpoint=f"127.0.0.1:{port}"))
    assert not down.ok and f"127.0.0.1:{port} unreachable" in down.detail and "MOEFLOW_S3_ENDPOINT" in down.detail
    with moto.iam_auth() as (access, secret):
        assert doctor.check_store(_s3(moto, s3_access_key=access, s3_secret_key=secret)).ok
        bad = doctor.check_store(_s3(moto, s3_access_key=access, s3_secret_key="wrong"))
        assert not bad.ok and "credentials refused" in bad.detail and "MOEFLOW_S3_SECRET_KEY" in bad.detail
    local = doctor.check_store(get_settings(store_dir=tmp_path / "store"))
    assert local.ok and "writable" in local.detail


def test_catalog_checks_migrations_on_postgres():
    from moeflow.platform.catalog.db import make_engine, migrate

    with pg_scratch_database() as url:
        fresh = doctor.check_catalog(get_settings(catalog_url=url))
        assert fresh.ok and "no schema yet" in fresh.detail  # the first run migrates it
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        ok = doctor.check_catalog(get_settings(catalog_url=url))
        assert ok.ok and "migration head" in ok.detail, ok.detail
        with make_engine(url).begin() as conn:  # an older moeflow's schema revision
            from sqlalchemy import text

            conn.execute(text("UPDATE alembic_version SET version_num = 'oldrev'"))
        stale = doctor.check_catalog(get_settings(catalog_url=url))
        assert not stale.ok and "schema at ['oldrev']" in stale.detail
        port = free_port()
        wrong = url.replace(":5432/", f":{port}/")
        down = doctor.check_catalog(get_settings(catalog_url=wrong))
        assert not down.ok and "unreachable" in down.detail and "MOEFLOW_CATALOG_URL" in down.detail
        nouser = doctor.check_catalog(get_settings(catalog_url=url.replace("postgres@", "nosuchuser@")))
        assert not nouser.ok and "nosuchuser" in nouser.detail


def test_mlflow_checks_a_server_on_postgres(tmp_path):
    with pg_scratch_database() as backend, mlflow_server(tmp_path / "mlflow", backend_uri=backend) as url:
        assert doctor.check_mlflow(get_settings(mlflow_tracking_uri=url)).ok
        port = free_port()
        down = doctor.check_mlflow(get_settings(mlflow_tracking_uri=f"http://127.0.0.1:{port}"))
        assert not down.ok and "unreachable" in down.detail and "MOEFLOW_MLFLOW_TRACKING_URI" in down.detail
        assert doctor.check_mlflow(get_settings(mlflow_tracking_uri=backend)).ok  # a database URI connects
    assert doctor.check_mlflow(get_settings(home=tmp_path / "home")).ok  # the embedded SQLite default


def test_prefect_checks_health_and_the_work_pool(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    from moeflow.flows.deployments import ensure_work_pool

    api = PREFECT_API_URL.value()
    settings = get_settings(prefect_api_url=api)
    missing = doctor.check_prefect(settings, work_pool="doctor-pool")
    assert not missing.ok and "work pool 'doctor-pool' does not exist" in missing.detail
    ensure_work_pool("doctor-pool")
    assert doctor.check_prefect(settings, work_pool="doctor-pool").ok
    port = free_port()
    down = doctor.check_prefect(get_settings(prefect_api_url=f"http://127.0.0.1:{port}/api"))
    assert not down.ok and "unreachable" in down.detail and "MOEFLOW_PREFECT_API_URL" in down.detail


def test_ray_unreachable_and_unset():
    assert doctor.check_ray(get_settings()).ok
    port = free_port()
    down = doctor.check_ray(get_settings(ray_address=f"127.0.0.1:{port}"))
    assert not down.ok and "unreachable" in down.detail and "MOEFLOW_RAY_ADDRESS" in down.detail


def test_cli_doctor_one_line_each_and_exit_status(moto, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from moeflow.platform.cli import app

    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MOEFLOW_S3_ENDPOINT", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("MOEFLOW_PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert [ln.split()[1] for ln in lines] == ["store", "catalog", "mlflow", "prefect", "ray"]
    assert [ln.split()[0] for ln in lines] == ["FAIL", "ok", "ok", "FAIL", "ok"]
    assert "Traceback" not in result.output
