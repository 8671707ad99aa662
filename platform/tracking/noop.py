"""``NoopTracker``: the tracker for unit tests and offline boxes; records every call in memory.

Like nanochat's ``DummyWandb``, but it keeps what it was given, so a test can assert on the
params, metrics and runs a stage logged without an MLflow server.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .values import flatten_params, metric_values, table_columns


class NoopTracker:
    """Records calls in memory; needs no server. Logging outside a run is allowed here.

    ``params``, ``tags`` and ``inputs`` hold one dict per call, ``metrics`` holds
    ``(metrics, step)`` pairs, ``tables``/``dicts`` hold ``(columns_or_obj, artifact_file)``,
    ``artifacts`` holds ``(local_path, artifact_path)``; ``runs`` holds the started runs.
    ``summary`` holds the values of ``log_summary`` (not in ``metrics``: they are not series),
    ``figures`` the artefact names of ``log_figure``, ``descriptions`` every description set.
    ``events`` has every call in order as ``(kind, run_id, payload)``.
    """

    def __init__(self) -> None:
        self.runs: list[dict] = []
        self.params: list[dict] = []
        self.metrics: list[tuple[dict, int | None]] = []
        self.inputs: list[dict] = []
        self.tables: list[tuple[dict, str]] = []
        self.dicts: list[tuple[Any, str]] = []
        self.artifacts: list[tuple[str, str | None]] = []
        self.tags: list[dict] = []
        self.summary: dict[str, float] = {}
        self.figures: list[str] = []
        self.descriptions: list[str] = []
        self.events: list[tuple[str, str | None, Any]] = []
        self._stack: list[str] = []

    @property
    def active_run_id(self) -> str | None:
        return self._stack[-1] if self._stack else None

    @contextlib.contextmanager
    def start_run(self, name, tags=None, nested=False, *, parent_run_id=None) -> Iterator[str]:
        parent = parent_run_id or (self.active_run_id if nested else None)
        # a plain uuid, not the catalog's id helper: trackers also run where SQLAlchemy is absent (GPU box)
        run = {"run_id": uuid.uuid4().hex, "name": name, "tags": dict(tags or {}), "nested": nested,
               "parent_run_id": parent, "status": "RUNNING"}
        self.runs.append(run)
        self._record("start_run", run)
        self._stack.append(run["run_id"])
        try:
            yield run["run_id"]
        except BaseException:
            run["status"] = "FAILED"
            raise
        else:
            run["status"] = "FINISHED"
        finally:
            self._stack.pop()

    @contextlib.contextmanager
    def attach_run(self, run_id: str) -> Iterator[str]:
        self._record("attach_run", run_id)
        self._stack.append(run_id)
        try:
            yield run_id
        finally:
            self._stack.pop()

    def _record(self, kind: str, payload: Any) -> None:
        self.events.append((kind, self.active_run_id, payload))

    def log_params(self, params):
        flat = flatten_params(params)
        self.params.append(flat)
        self._record("params", flat)

    def log_metrics(self, metrics, step=None):
        values = metric_values(metrics)
        self.metrics.append((values, step))
        self._record("metrics", (values, step))

    def log_summary(self, metrics):
        values = metric_values(metrics)
        self.summary.update(values)
        self._record("summary", values)

    def log_figure(self, figure, artifact_file):
        if not hasattr(figure, "savefig"):
            raise TypeError(f"log_figure needs a matplotlib figure, got {type(figure).__name__}")
        self.figures.append(artifact_file)
        self._record("figure", artifact_file)

    def set_description(self, markdown):
        self.descriptions.append(str(markdown))
        self._record("description", str(markdown))

    def run_name(self, run_id):
        return next((r["name"] for r in self.runs if r["run_id"] == run_id), None)

    def log_input(self, uri, name, context="training", digest=None, schema=None, profile=None):
        entry = {"uri": uri, "name": name, "context": context, "digest": digest, "schema": schema, "profile": profile}
        self.inputs.append(entry)
        self._record("input", entry)

    def log_table(self, rows, artifact_file="funnel.json"):
        columns = table_columns(rows)
        self.tables.append((columns, artifact_file))
        self._record("table", (columns, artifact_file))

    def log_dict(self, obj, artifact_file):
        self.dicts.append((obj, artifact_file))
        self._record("dict", (obj, artifact_file))

    def log_artifact(self, local_path, artifact_path=None):
        if not Path(local_path).exists():
            raise FileNotFoundError(f"log_artifact: {local_path} does not exist")
        self.artifacts.append((str(local_path), artifact_path))
        self._record("artifact", (str(local_path), artifact_path))

    def set_tags(self, tags):
        tags = {str(k): str(v) for k, v in tags.items()}
        self.tags.append(tags)
        self._record("tags", tags)

    def register_model(self, name, local_dir, artifact_path="model", alias=None, tags=None, description=None):
        self.log_artifact(local_dir, artifact_path)
        version = str(1 + sum(1 for kind, _, p in self.events if kind == "model" and p["name"] == name))
        self._record("model", {"name": name, "version": version, "artifact_path": artifact_path, "alias": alias,
                               "tags": dict(tags or {}), "description": description})
        return version

    # conveniences for assertions
    def all_params(self) -> dict[str, str]:
        return {k: v for p in self.params for k, v in p.items()}

    def metric_history(self, key: str) -> list[tuple[int | None, float]]:
        return [(step, values[key]) for values, step in self.metrics if key in values]
