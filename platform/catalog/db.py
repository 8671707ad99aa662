"""Engines and schema migrations for the catalog database (SQLite or PostgreSQL).

Concurrency is the point of most choices here, because several processes (Prefect task
workers, Ray workers, the dashboard) open the same catalog at once:

* SQLite runs in WAL mode (readers never block the writer) with a busy timeout, and every
  transaction starts with ``BEGIN IMMEDIATE``. pysqlite's default deferred transactions
  take the write lock only at the first write, and in WAL mode a reader that then wants to
  write after someone else committed fails at once with ``SQLITE_BUSY`` (the busy timeout
  does not help there). Taking the write lock up front makes writers queue instead.
* ``postgresql://`` URLs get the psycopg 3 driver.
* ``upgrade head`` runs inside one transaction that first takes a database-wide lock
  (``BEGIN IMMEDIATE`` on SQLite, ``pg_advisory_xact_lock`` on PostgreSQL), so two
  processes opening a fresh database at once migrate it exactly once; the second waits,
  then finds the schema at head and does nothing.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 60.0
# an arbitrary constant shared by every process that migrates a moeflow catalog
_PG_MIGRATION_LOCK_KEY = 0x6D6F65666C6F77  # "moeflow"


class CatalogError(RuntimeError):
    """Base error of the lineage catalog."""


def normalize_url(url: str) -> str:
    """Pick the psycopg 3 driver for PostgreSQL URLs; other URLs pass unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine for ``url`` with the concurrency settings described in the module doc."""
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with a terse message
        raise CatalogError(f"invalid catalog database URL {url!r}: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed, echo=echo)
        if _is_memory(parsed.database):
            return engine  # the one connection *is* the database: keep it in a forked child
    else:
        engine = create_engine(parsed, echo=echo, pool_pre_ping=True)
    _forget_pool_after_fork(engine)
    return engine


def _is_memory(database: str | None) -> bool:
    return not database or database == ":memory:" or "mode=memory" in database


def _forget_pool_after_fork(engine: Engine) -> None:
    """A forked child must not reuse the parent's pooled connections (they share sockets)."""
    ref = weakref.ref(engine)

    def in_child() -> None:
        child_engine = ref()
        if child_engine is not None:
            child_engine.dispose(close=False)

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=in_child)


def _sqlite_engine(parsed, *, echo: bool) -> Engine:
    database = parsed.database
    memory = _is_memory(database)
    if not memory and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        parsed,
        echo=echo,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        # an in-memory database lives in one connection: share it (single-threaded use only)
        poolclass=StaticPool if memory else None,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # take transaction control away from pysqlite; the "begin" hook below issues BEGIN
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        if not memory:
            _enable_wal(cursor)
            # NORMAL is durable across application crashes in WAL mode; only power loss
            # can drop the last commits, and it saves one fsync per commit
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _enable_wal(cursor, timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> None:
    """Switch the database file to WAL (persistent, so usually already done).

    The switch needs an exclusive lock and SQLite does not run its busy handler for it: a
    second process opening a fresh database at the same moment gets "database is locked"
    at once (seen in CI). Retry with backoff until the busy timeout instead.
    """
    import sqlite3
    import time

    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def alembic_config(url: str | None = None):
    """Alembic ``Config`` that finds the migrations in the installed package (not the cwd)."""
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR.parent / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # '%' is configparser's interpolation character (URL-encoded passwords contain it)
        cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


@functools.lru_cache(maxsize=1)
def _heads() -> frozenset[str]:
    from alembic.script import ScriptDirectory

    return frozenset(ScriptDirectory.from_config(alembic_config()).get_heads())


def head_revisions() -> set[str]:
    """Head revision(s) of the shipped migrations (read once per process: they cannot change)."""
    return set(_heads())


def current_revisions(conn: Connection) -> set[str]:
    from alembic.runtime.migration import MigrationContext

    return set(MigrationContext.configure(conn).get_current_heads())


def _take_migration_lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY})
    # SQLite: the transaction began with BEGIN IMMEDIATE, which already is the lock


def migrate(engine: Engine, revision: str = "head") -> None:
    """``alembic upgrade <revision>`` on ``engine``, serialised across processes."""
    from alembic import command

    heads = head_revisions()
    if revision == "head":
        with engine.connect() as conn:
            if current_revisions(conn) == heads:
                return  # the common case: nothing to do, and no lock taken
    with engine.begin() as conn:
        _take_migration_lock(conn)
        cfg = alembic_config()
        # env.py runs on this connection inside our transaction (and our lock)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    log.info("catalog schema at %s (%s)", revision, engine.url.render_as_string(hide_password=True))


def downgrade(engine: Engine, revision: str = "base") -> None:
    """``alembic downgrade <revision>`` on ``engine`` (tests and manual repairs)."""
    from alembic import command

    with engine.begin() as conn:
        _take_migration_lock(conn)
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
