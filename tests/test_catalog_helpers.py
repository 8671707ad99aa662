"""Helpers for the catalog tests: a scratch PostgreSQL database per use.

Not a test module (it holds no tests); it is named ``test_catalog_*`` only because the
catalog's test files share that prefix. The server defaults to the one on this machine
(127.0.0.1:5432, user postgres, trust auth); ``MOEFLOW_TEST_PG_URL`` points elsewhere.
In CI (``CI=true``) an unreachable server fails the tests instead of skipping them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

PG_ADMIN_URL = os.environ.get("MOEFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CATALOG_TABLES = ("lineage_edges", "runs", "model_versions", "dataset_versions", "datasets", "projects")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def postgres_unreachable_reason() -> str | None:
    """None when the admin database answers, else why not."""
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any failure means: no usable server
        return f"PostgreSQL at {PG_ADMIN_URL} unreachable: {type(exc).__name__}: {exc}"
    return None


def require_postgres() -> None:
    """Skip (locally) or fail (CI) when there is no PostgreSQL server."""
    reason = postgres_unreachable_reason()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: PostgreSQL is required)")
    pytest.skip(reason)


def _db_url(name: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


@contextlib.contextmanager
def pg_scratch_database() -> Iterator[str]:
    """Create ``moeflow_test_<random>``, yield its URL, drop it (also when connections linger)."""
    import psycopg

    require_postgres()
    name = f"moeflow_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _db_url(name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def truncate_catalog(engine) -> None:
    """Empty every catalog table (keeps the schema), for per-test isolation on a shared DB."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(CATALOG_TABLES)} CASCADE"))
