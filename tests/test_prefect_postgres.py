"""``moeflow up`` runs Prefect on PostgreSQL when ``MOEFLOW_PREFECT_DATABASE_URL`` says so (it always
used SQLite): a scratch database on the machine's PostgreSQL, created and dropped by the test."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import free_port
from test_catalog_helpers import pg_scratch_database

pytestmark = [pytest.mark.service, pytest.mark.slow]


def test_up_runs_prefect_on_postgres(tmp_path):
    import psycopg

    home = tmp_path / "home"
    cli = [sys.executable, "-m", "moeflow.platform.cli"]
    with pg_scratch_database() as url:
        env = {**os.environ, "MOEFLOW_HOME": str(home), "MOEFLOW_PREFECT_PORT": str(free_port()),
               "MOEFLOW_PREFECT_DATABASE_URL": url, "MOEFLOW_MLFLOW_PORT": str(free_port())}
        env.pop("PREFECT_API_URL", None)
        try:
            up = subprocess.run([*cli, "up", "--only", "prefect"], env=env, capture_output=True, text=True, timeout=400)
            assert up.returncode == 0, up.stdout + up.stderr
            with psycopg.connect(url) as conn:
                tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            assert {"flow_run", "deployment", "alembic_version"} <= tables
            assert not (home / "prefect" / "prefect.db").exists()
        finally:
            subprocess.run([*cli, "down", "--only", "prefect"], env=env, capture_output=True, timeout=120)
