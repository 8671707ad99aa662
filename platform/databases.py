"""The MLflow and Prefect databases of a home are created and migrated once, by one process.

MLflow creates its tables on first use and Prefect's server migrates its database on start; two
flows started together on a fresh home then run both migrations twice at once on the same SQLite
files ("No such index ...", "table ... already exists"). ``init_databases`` does both under a file
lock in ``$MOEFLOW_HOME/run``; the others wait, then find a marker saying it is done for these
URLs and library versions and do nothing. (The catalog serialises its own migrations in its
database: ``catalog/db.py``.)
"""

from __future__ import annotations

import json
import logging
import subprocess
from importlib.metadata import version

from .settings import Settings

log = logging.getLogger(__name__)
LOCK_TIMEOUT_S = 600.0


def _wanted(settings: Settings) -> dict:
    from .services import prefect_env

    return {"mlflow": settings.mlflow_backend, "mlflow_version": version("mlflow"),
            "prefect": prefect_env(settings)["PREFECT_API_DATABASE_CONNECTION_URL"],
            "prefect_version": version("prefect")}


def init_databases(settings: Settings) -> bool:
    """Create/migrate this home's MLflow backend and Prefect database unless done; returns whether it
    did the work. Remote ones (an MLflow server URL, a Prefect API URL) are left to their servers."""
    from filelock import FileLock

    settings.ensure_dirs()
    marker = settings.run_dir / "databases.json"
    wanted = _wanted(settings)
    if _done(marker, wanted):
        return False
    with FileLock(str(settings.run_dir / "databases.lock"), timeout=LOCK_TIMEOUT_S):
        if _done(marker, wanted):  # another process did it while we waited
            return False
        if settings.mlflow_backend.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
            _init_mlflow(settings)
        if not settings.prefect_api_url:
            _init_prefect(settings)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(wanted, indent=2))
        tmp.replace(marker)
    return True


def _done(marker, wanted: dict) -> bool:
    try:
        return json.loads(marker.read_text()) == wanted
    except (OSError, ValueError):
        return False


def _init_mlflow(settings: Settings) -> None:
    from .tracking.mlflow_env import quiet_mlflow_env

    quiet_mlflow_env()
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    chatty = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic.runtime.migration")]
    levels = [logger.level for logger in chatty]
    for logger in chatty:  # "Creating initial MLflow database tables..." is ours to say, once, at INFO
        logger.setLevel(logging.WARNING)
    try:
        store = SqlAlchemyStore(settings.mlflow_backend, settings.mlflow_artifacts_root)  # creates + migrates
        store.engine.dispose()
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)
    log.info("MLflow database ready: %s", settings.mlflow_backend)


def _init_prefect(settings: Settings) -> None:
    """``prefect server database upgrade`` in a child with the home's Prefect settings (this process may
    have imported Prefect with other settings, e.g. a test harness)."""
    from .services import _python_bin, service_env

    out = subprocess.run([_python_bin("prefect"), "server", "database", "upgrade", "-y"], env=service_env(settings),
                         capture_output=True, text=True, timeout=LOCK_TIMEOUT_S, cwd=settings.home)
    if out.returncode != 0:
        raise RuntimeError(f"migrating the Prefect database failed:\n{(out.stdout + out.stderr)[-2000:]}")
    log.info("Prefect database ready under %s", settings.prefect_home)
