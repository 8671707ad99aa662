"""The tracking protocol that library code and tasks see, and the tag keys shared with the stage glue.

Two implementations: ``MLflowTracker`` (``mlflow_tracker.py``) for real runs and ``NoopTracker``
(``noop.py``) that records calls in memory, so model code and unit tests need no server.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

# tag keys shared with the stage glue and the dashboard
TAG_STAGE = "moeflow.stage"
TAG_CATALOG_RUN_ID = "moeflow.catalog_run_id"
TAG_PIPELINE_RUN_ID = "moeflow.pipeline_run_id"
TAG_PREFECT_FLOW_RUN_ID = "moeflow.prefect_flow_run_id"
TAG_CONFIG_HASH = "moeflow.config_hash"
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"  # the key mlflow.start_run(nested=True) writes


@runtime_checkable
class Tracker(Protocol):
    @property
    def active_run_id(self) -> str | None: ...

    def start_run(
        self, name: str, tags: dict | None = None, nested: bool = False, *, parent_run_id: str | None = None
    ) -> contextlib.AbstractContextManager[str]: ...

    def attach_run(self, run_id: str) -> contextlib.AbstractContextManager[str]: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None: ...

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """One-off final values (eval loss, throughput, docs kept): logged once, without a step,
        so MLflow shows them as single values, not as a one-point "series" at step 300."""

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as an image artefact (e.g. the expert-load heatmap)."""

    def set_description(self, markdown: str) -> None:
        """The run page's description (``mlflow.note.content``)."""

    def run_name(self, run_id: str) -> str | None:
        """The display name of a run of this tracker (None when unknown)."""

    def log_input(
        self, uri: str, name: str, context: str = "training", digest: str | None = None,
        schema: dict | None = None, profile: dict | None = None,
    ) -> None: ...

    def log_table(self, rows: list[dict] | dict[str, list], artifact_file: str = "funnel.json") -> None: ...

    def log_dict(self, obj: Any, artifact_file: str) -> None: ...

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def register_model(self, name: str, local_dir: str | os.PathLike, artifact_path: str = "model",
                       alias: str | None = None, tags: Mapping[str, Any] | None = None,
                       description: str | None = None) -> str: ...
