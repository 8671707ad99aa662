"""``get_tracker``: which tracker a process uses, decided by the settings (and ``MOEFLOW_TRACKING``)."""

from __future__ import annotations

import os

from .mlflow_env import s3_env_for_mlflow
from .mlflow_tracker import MLflowTracker
from .noop import NoopTracker
from .protocol import Tracker


def get_tracker(settings=None) -> Tracker:
    """``MOEFLOW_TRACKING=noop`` gives a NoopTracker; else MLflow at ``settings.tracking_uri``.

    When the tracking URI is a database or the local server of ``moeflow up`` (both read the
    same SQLite backend), the experiment is created with its artefacts in the object store
    under ``settings.mlflow_artifacts_root``: the same location then works with and without
    the server, where a server-created ``mlflow-artifacts:/`` location would break direct
    logging, and MLflow's default ``./mlruns`` would depend on the working directory. A
    remote tracking server keeps its own (proxied) artefact location.
    """
    if os.environ.get("MOEFLOW_TRACKING", "").strip().lower() in ("noop", "none", "off"):
        return NoopTracker()
    from moeflow.platform.settings import get_settings

    settings = settings or get_settings()
    uri = settings.tracking_uri
    artifact_location = None
    if not uri.startswith(("http://", "https://", "databricks")) or uri == settings.mlflow_server_url:
        artifact_location = settings.mlflow_artifacts_root
        if settings.uses_s3:
            s3_env_for_mlflow(settings)
    return MLflowTracker(uri, experiment=settings.project, artifact_location=artifact_location)
