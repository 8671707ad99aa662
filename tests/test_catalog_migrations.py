"""Catalog schema migrations on SQLite and PostgreSQL.

upgrade head -> downgrade base -> upgrade head must work, and the ORM metadata must
match what the migrations build (Alembic autogenerate finds no differences). A fresh
database per test: downgrading would break any other test sharing it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from test_catalog_helpers import CATALOG_TABLES, pg_scratch_database

from moeflow.platform.catalog import Catalog, make_engine
from moeflow.platform.catalog import db as catalog_db
from moeflow.platform.catalog.models import Base


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.service)])
def fresh_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
    else:
        with pg_scratch_database() as url:
            yield url


def _tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def _diffs(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def test_upgrade_downgrade_upgrade_and_metadata_matches(fresh_url):
    engine = make_engine(fresh_url)
    try:
        catalog_db.migrate(engine)
        assert _tables(engine) == set(CATALOG_TABLES)
        with engine.connect() as conn:
            assert catalog_db.current_revisions(conn) == catalog_db.head_revisions()
        assert _diffs(engine) == []

        catalog_db.downgrade(engine, "base")
        assert _tables(engine) == set()
        with engine.connect() as conn:
            assert catalog_db.current_revisions(conn) == set()

        catalog_db.migrate(engine)
        assert _tables(engine) == set(CATALOG_TABLES)
        assert _diffs(engine) == []
    finally:
        engine.dispose()
    with contextlib.closing(Catalog(fresh_url)) as cat:  # usable after the round trip
        run_id = cat.start_run("curate", {})
        cat.add_lineage(run_id, inputs=["file:///a"], outputs=["file:///b"])
        assert [n["id"] for n in cat.upstream("file:///b")] == [run_id, None]


def test_metadata_differs_when_orm_changes(fresh_url):
    """The comparison is sharp: an extra ORM column is reported."""
    from sqlalchemy import Column, Integer, MetaData

    engine = make_engine(fresh_url)
    try:
        catalog_db.migrate(engine)
        changed = MetaData(naming_convention=Base.metadata.naming_convention)
        for table in Base.metadata.tables.values():
            table.to_metadata(changed)
        changed.tables["runs"].append_column(Column("extra", Integer, nullable=True))
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), changed)
        assert [(d[0], d[3].name) for d in diffs] == [("add_column", "extra")]
    finally:
        engine.dispose()


def test_alembic_command_line_works_from_any_directory(tmp_path):
    """Migrations ship inside the package: the CLI finds them by the ini path, not the cwd."""
    db_path = tmp_path / "cli.db"
    ini = catalog_db.MIGRATIONS_DIR.parent / "alembic.ini"
    cmd = [sys.executable, "-m", "alembic", "-c", str(ini), "-x", f"url=sqlite:///{db_path}"]
    for args in (["upgrade", "head"], ["check"], ["current"]):
        result = subprocess.run(cmd + args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    assert "(head)" in result.stdout
    engine = make_engine(f"sqlite:///{db_path}")
    try:
        assert _tables(engine) == set(CATALOG_TABLES)
    finally:
        engine.dispose()


def test_reopening_at_head_takes_no_migration_lock(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    Catalog(url).close()
    calls = []
    monkeypatch.setattr(catalog_db, "_take_migration_lock", lambda conn: calls.append(conn))
    Catalog(url).close()
    assert calls == []
