"""Read-only handles on what the dashboard shows: the lineage catalog, MLflow and the object store.

The dashboard must never write: opening it on a fresh ``MOEFLOW_HOME`` must create nothing. The
platform's constructors are built for writers (``Catalog`` migrates the schema and creates the
SQLite folder, an ``MlflowClient`` on a ``sqlite:///`` URI creates the database), so each handle
here first checks that the thing exists and returns ``None`` when it does not; pages then show an
empty state naming the command that fills it. Every handle is built in a function (nothing at
import time) and cached by the Streamlit layer (``st.cache_resource``), not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeflow.platform.settings import Settings


def _sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other databases and in-memory SQLite)."""
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            rest = url[len(prefix):].split("?", 1)[0]
            return None if rest in ("", ":memory:") else Path(rest)
    return None


def database_exists(url: str) -> bool:
    """False only for a SQLite file that is not there yet; servers are assumed to exist."""
    path = _sqlite_path(url)
    return path is None or path.is_file()


_UNOPENED = object()


@dataclass
class Sources:
    """The three read-only sources of one home (``None`` where a source does not exist yet).

    The MLflow client is opened on first use: importing MLflow is most of a cold page's time
    (benchmarks/RESULTS.md), and the Overview, Data, Lineage and Serving pages never read it.
    """

    settings: Settings
    catalog: Any | None      # moeflow.platform.catalog.Catalog
    store: Any | None        # moeflow.platform.store.ObjectStore
    _mlflow: Any = field(default=_UNOPENED, repr=False)

    @property
    def mlflow(self):
        """The ``mlflow.MlflowClient`` of the home (None while its database does not exist)."""
        if self._mlflow is _UNOPENED:
            self._mlflow = open_mlflow(self.settings)
        return self._mlflow

    @property
    def mlflow_missing(self) -> bool:
        """Opened and found no database (a later run may create it)."""
        return self._mlflow is None

    @property
    def empty(self) -> bool:
        return self.catalog is None


def open_catalog(settings: Settings):
    if not database_exists(settings.catalog_db_url):
        return None
    from moeflow.platform.catalog import Catalog

    return Catalog(settings.catalog_db_url, project=settings.project, migrate_schema=False)


def open_mlflow(settings: Settings):
    uri = settings.tracking_uri
    if not database_exists(uri):
        return None
    from moeflow.platform.tracking import MLflowTracker, s3_env_for_mlflow

    if settings.uses_s3:
        s3_env_for_mlflow(settings)
    # the platform's tracker owns the client (and MLflow's quiet environment); reading through
    # ``.client`` never touches ``experiment_id``, which would create the experiment
    return MLflowTracker(uri, settings.project).client


def open_store(settings: Settings):
    if not settings.uses_s3 and not settings.store_root.is_dir():
        return None
    from moeflow.platform.store import open_store as platform_open_store

    return platform_open_store(settings, create_bucket=False)


def open_sources(settings: Settings) -> Sources:
    return Sources(settings, open_catalog(settings), open_store(settings))
