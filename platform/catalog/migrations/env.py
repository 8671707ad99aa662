"""Alembic environment of the lineage catalog.

Runs on a connection handed in by ``moeflow.platform.catalog.db.migrate`` (inside its
locked transaction) when there is one; otherwise (the ``alembic`` command line) it builds
an engine from ``-x url=...``, ``sqlalchemy.url`` or the moeflow Settings.
"""

from __future__ import annotations

from alembic import context

from moeflow.platform.catalog.db import make_engine
from moeflow.platform.catalog.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from moeflow.platform.settings import get_settings

    return get_settings().catalog_db_url


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds tables for later revisions
        render_as_batch=connection.dialect.name == "sqlite",
    )


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.begin() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
