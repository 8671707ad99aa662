"""Experiment tracking behind a small protocol: MLflow for real, a no-op for tests.

``Tracker`` is what library code and tasks see. ``MLflowTracker`` logs through an
``MlflowClient`` bound to its own tracking URI (never MLflow's process-global "active
run"), so several trackers, threads and Prefect tasks can log side by side. Which run is
active is kept in a ``ContextVar`` stack: a stage run started with ``nested=True`` inside
a pipeline run (same thread, or a Prefect task that inherited the context) becomes its
child through MLflow's ``mlflow.parentRunId`` tag, exactly what ``mlflow.start_run(nested=
True)`` writes. ``NoopTracker`` records every call in memory so tests can assert on them.

MLflow is imported lazily: it takes seconds to import and starts a telemetry client on
import, which we switch off first (the platform runs offline).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
import time
import warnings
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

# tag keys shared with the stage glue and the dashboard
TAG_STAGE = "moeflow.stage"
TAG_CATALOG_RUN_ID = "moeflow.catalog_run_id"
TAG_PIPELINE_RUN_ID = "moeflow.pipeline_run_id"
TAG_PREFECT_FLOW_RUN_ID = "moeflow.prefect_flow_run_id"
TAG_CONFIG_HASH = "moeflow.config_hash"
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"  # the key mlflow.start_run(nested=True) writes

_MAX_PARAM_LEN = 6000  # MLflow rejects longer param values
_PARAM_BATCH = 100  # MLflow's per-request limits
_METRIC_BATCH = 1000

# (tracking_uri, run_id) of the runs open in this context, innermost last
_ACTIVE_RUNS: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("moeflow_active_runs", default=())


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

    def log_input(
        self, uri: str, name: str, context: str = "training", digest: str | None = None,
        schema: dict | None = None, profile: dict | None = None,
    ) -> None: ...

    def log_table(self, rows: list[dict] | dict[str, list], artifact_file: str = "funnel.json") -> None: ...

    def log_dict(self, obj: Any, artifact_file: str) -> None: ...

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def register_model(self, name: str, local_dir: str | os.PathLike, artifact_path: str = "model",
                       alias: str | None = None, tags: Mapping[str, Any] | None = None) -> str: ...

    def set_model_version_tags(self, name: str, version: str, tags: Mapping[str, Any]) -> None: ...

    def find_model_version(self, tag: str, value: str) -> tuple[str, str] | None: ...


# ---------------------------------------------------------------------- value shaping (shared)
def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys; other values become strings (lists as JSON)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        if isinstance(value, (list, tuple, dict)):
            text = json.dumps(value, default=str, sort_keys=True)
        else:
            text = str(value)
        flat[name] = text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."
    return flat


def metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Floats for every metric (numpy/torch scalars and bools included); a clear error otherwise."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[str(key)] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}") from exc
    return out


def table_columns(rows: list[dict] | Mapping[str, list]) -> dict[str, list]:
    """A table as a dict of equal-length columns; rows (list of dicts) may miss keys (None)."""
    if isinstance(rows, Mapping):
        columns = {str(k): list(v) for k, v in rows.items()}
    else:
        rows = list(rows)
        if not all(isinstance(r, Mapping) for r in rows):
            raise TypeError("log_table rows must be dicts (or pass a dict of columns)")
        keys = list(dict.fromkeys(k for r in rows for k in r))
        columns = {str(k): [r.get(k) for r in rows] for k in keys}
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"log_table columns have different lengths: {lengths}")
    # nested values would make pandas build object columns MLflow cannot render
    return {k: [json.dumps(x, default=str) if isinstance(x, (dict, list)) else x for x in v] for k, v in columns.items()}


# ---------------------------------------------------------------------- no-op
class NoopTracker:
    """Records calls in memory; needs no server. Logging outside a run is allowed here.

    ``params``, ``tags`` and ``inputs`` hold one dict per call, ``metrics`` holds
    ``(metrics, step)`` pairs, ``tables``/``dicts`` hold ``(columns_or_obj, artifact_file)``,
    ``artifacts`` holds ``(local_path, artifact_path)``; ``runs`` holds the started runs.
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

    def register_model(self, name, local_dir, artifact_path="model", alias=None, tags=None):
        self.log_artifact(local_dir, artifact_path)
        version = str(1 + sum(1 for kind, _, p in self.events if kind == "model" and p["name"] == name))
        self._record("model", {"name": name, "version": version, "artifact_path": artifact_path, "alias": alias,
                               "tags": dict(tags or {})})
        return version

    def set_model_version_tags(self, name, version, tags):
        self._record("model_version_tags", {"name": name, "version": str(version),
                                            "tags": {str(k): str(v) for k, v in tags.items()}})

    def find_model_version(self, tag, value):
        for kind, _, p in reversed(self.events):
            if kind == "model" and str(p["tags"].get(tag)) == str(value):
                return p["name"], p["version"]
        return None

    # conveniences for assertions
    def all_params(self) -> dict[str, str]:
        return {k: v for p in self.params for k, v in p.items()}

    def metric_history(self, key: str) -> list[tuple[int | None, float]]:
        return [(step, values[key]) for values, step in self.metrics if key in values]


# ---------------------------------------------------------------------- MLflow
def _quiet_mlflow_env() -> None:
    """Switch off MLflow's network side effects before it is first imported."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class MLflowTracker:
    """Logs to MLflow at ``tracking_uri`` (``http://...`` server or a ``sqlite:///`` backend)."""

    def __init__(self, tracking_uri: str, experiment: str = "moeflow", artifact_location: str | None = None):
        if not tracking_uri:
            raise ValueError("MLflowTracker needs a tracking URI")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self._client = None
        self._experiment_id: str | None = None

    def __repr__(self) -> str:
        return f"MLflowTracker({self.tracking_uri!r}, experiment={self.experiment!r})"

    @property
    def client(self):
        if self._client is None:
            _quiet_mlflow_env()
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        """The project's experiment, created on first use (a concurrent creator may win)."""
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=self.artifact_location
                    )
                except MlflowException:
                    found = self.client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    self.client.restore_experiment(found.experiment_id)
                self._experiment_id = found.experiment_id
        return self._experiment_id

    @property
    def active_run_id(self) -> str | None:
        for uri, run_id in reversed(_ACTIVE_RUNS.get()):
            if uri == self.tracking_uri:
                return run_id
        return None

    def _run_id(self) -> str:
        run_id = self.active_run_id
        if run_id is None:
            raise RuntimeError(f"no active MLflow run on {self.tracking_uri}: log inside `with tracker.start_run(...)`")
        return run_id

    def _fluent_parent(self) -> str | None:
        """A run opened with ``mlflow.start_run`` on the same tracking URI (interop), else None."""
        import mlflow

        active = mlflow.active_run()
        if active is not None and mlflow.get_tracking_uri() == self.tracking_uri:
            return active.info.run_id
        return None

    @contextlib.contextmanager
    def start_run(self, name, tags=None, nested=False, *, parent_run_id=None) -> Iterator[str]:
        """A new run in the project's experiment; FINISHED on exit, FAILED on an exception.

        The parent is ``parent_run_id`` if given; else, with ``nested=True``, the innermost
        run this context opened on the same tracking URI, or an active ``mlflow.start_run``
        run there.
        """
        from mlflow.tracking.context import registry as context_registry

        parent = parent_run_id or ((self.active_run_id or self._fluent_parent()) if nested else None)
        run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if parent:
            run_tags[MLFLOW_PARENT_RUN_ID] = parent
        # the same source/user/git tags mlflow.start_run would add
        run_tags = context_registry.resolve_tags(run_tags)
        run = self.client.create_run(self.experiment_id, run_name=name, tags=run_tags)
        run_id = run.info.run_id
        token = _ACTIVE_RUNS.set(_ACTIVE_RUNS.get() + ((self.tracking_uri, run_id),))
        status = "FINISHED"
        try:
            yield run_id
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            _ACTIVE_RUNS.reset(token)
            try:
                self.client.set_terminated(run_id, status=status)
            except Exception:
                if status == "FINISHED":
                    raise
                # never hide the stage's own error behind a tracking-server hiccup
                log.warning("could not mark MLflow run %s %s", run_id, status, exc_info=True)

    @contextlib.contextmanager
    def attach_run(self, run_id: str) -> Iterator[str]:
        """Log into an existing run (opened by another process, e.g. the stage's run seen
        from a Ray worker) without creating or ending it: its owner sets the final status."""
        run = self.client.get_run(run_id)  # fails early, naming the id, if it does not exist
        if run.info.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow run {run_id} on {self.tracking_uri} is deleted")
        token = _ACTIVE_RUNS.set(_ACTIVE_RUNS.get() + ((self.tracking_uri, run_id),))
        try:
            yield run_id
        finally:
            _ACTIVE_RUNS.reset(token)

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        run_id = self._run_id()
        for i in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(run_id, params=items[i : i + _PARAM_BATCH])

    def log_metrics(self, metrics, step=None):
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        items = [Metric(k, v, now_ms, int(step or 0)) for k, v in metric_values(metrics).items()]
        run_id = self._run_id()
        for i in range(0, len(items), _METRIC_BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + _METRIC_BATCH])

    def log_input(self, uri, name, context="training", digest=None, schema=None, profile=None):
        """Log ``uri`` as a dataset input of the active run (``mlflow.log_input`` semantics)."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = build_dataset(uri, name, digest=digest, schema=schema, profile=profile)
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)] if context else []
        self.client.log_inputs(self._run_id(), datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])

    def log_table(self, rows, artifact_file="funnel.json"):
        self.client.log_table(self._run_id(), data=table_columns(rows), artifact_file=artifact_file)

    def log_dict(self, obj, artifact_file):
        self.client.log_dict(self._run_id(), obj, artifact_file)

    def log_artifact(self, local_path, artifact_path=None):
        path = Path(local_path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: {path} does not exist")
        if path.is_dir():
            self.client.log_artifacts(self._run_id(), str(path), artifact_path)
        else:
            self.client.log_artifact(self._run_id(), str(path), artifact_path)

    def register_model(self, name, local_dir, artifact_path="model", alias=None, tags=None):
        """Log ``local_dir`` as the run's ``artifact_path`` and register it as a new version of ``name``.

        The version's source is the run's own artefact folder: an MLflow server accepts a local
        source only inside the run's artefact directory. Returns the version number.
        """
        from mlflow.exceptions import MlflowException

        run_id = self._run_id()
        self.log_artifact(local_dir, artifact_path)
        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        version = self.client.create_model_version(name, source=source, run_id=run_id,
                                                   tags={str(k): str(v) for k, v in (tags or {}).items()})
        if alias:
            self.client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    def set_model_version_tags(self, name, version, tags):
        """Tags on a registered model version (what a promotion gate reads, e.g. evaluation scores)."""
        for k, v in tags.items():
            self.client.set_model_version_tag(name, str(version), str(k), str(v))

    def find_model_version(self, tag, value):
        """(name, version) of the newest registered model version whose tag ``tag`` equals ``value``."""
        found = self.client.search_model_versions(f"tags.`{tag}` = '{value}'")
        if not found:
            return None
        newest = max(found, key=lambda mv: int(mv.version))
        return newest.name, str(newest.version)

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self._run_id(), tags=items)


_SCHEMA_TYPES = {"string", "long", "integer", "double", "float", "boolean", "binary", "datetime"}


def build_dataset(uri: str, name: str, *, digest=None, schema: dict | None = None, profile: dict | None = None):
    """An ``mlflow.data`` dataset entity describing the artefact at ``uri`` (metadata only).

    The source is MLflow's resolver for the URI scheme (``file``/``s3``/``http`` ...), or a
    plain URI source for schemes MLflow does not know. ``schema`` maps column -> MLflow type
    name (``{"text": "string", "num_tokens": "long"}``); ``profile`` is any small JSON dict
    (document counts, token counts) shown by the MLflow UI.
    """
    _quiet_mlflow_env()
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    if not isinstance(uri, str) or "://" not in uri:
        raise ValueError(f"log_input needs an artefact URI with a scheme, got {uri!r}")
    mlflow_schema = None
    if schema:
        bad = {k: v for k, v in schema.items() if v not in _SCHEMA_TYPES}
        if bad:
            raise ValueError(f"log_input schema of {uri}: unknown column types {bad} (use one of {sorted(_SCHEMA_TYPES)})")
        mlflow_schema = Schema([ColSpec(type=t, name=c) for c, t in schema.items()])
    profile_json = json.dumps(profile, default=str, sort_keys=True) if profile else None

    class _ProfiledDataset(MetaDataset):
        @property
        def profile(self):
            return profile_json

        def to_dict(self):
            data = super().to_dict()
            if profile_json:
                data["profile"] = profile_json
            return data

    return _ProfiledDataset(_dataset_source(uri), name=name, digest=(digest[:36] if digest else None),
                            schema=mlflow_schema)


def _dataset_source(uri: str):
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for file://
            return resolve_dataset_source(uri)
    except Exception:  # an unknown scheme: describe it, MLflow need not load it
        pass

    class UriDatasetSource(DatasetSource):
        def __init__(self, source_uri: str):
            self._uri = source_uri

        @staticmethod
        def _get_source_type() -> str:
            return "uri"

        def load(self, **kwargs):
            raise NotImplementedError(f"{self._uri} is read through moeflow's object store")

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            return cls(str(raw_source))

        def to_dict(self):
            return {"uri": self._uri}

        @classmethod
        def from_dict(cls, source_dict):
            return cls(source_dict["uri"])

    return UriDatasetSource(uri)


# ---------------------------------------------------------------------- factory
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
            _s3_env_for_mlflow(settings)
    return MLflowTracker(uri, experiment=settings.project, artifact_location=artifact_location)


def _s3_env_for_mlflow(settings) -> None:
    """MLflow's S3 artefact store reads boto3's environment; fill it from Settings if unset."""
    scheme = "https" if settings.s3_secure else "http"
    os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", f"{scheme}://{settings.s3_endpoint}")
    if settings.s3_access_key is not None:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", settings.s3_access_key.get_secret_value())
    if settings.s3_secret_key is not None:
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", settings.s3_secret_key.get_secret_value())
    if settings.s3_region:
        os.environ.setdefault("AWS_DEFAULT_REGION", settings.s3_region)


__all__ = [
    "MLflowTracker",
    "NoopTracker",
    "Tracker",
    "build_dataset",
    "flatten_params",
    "get_tracker",
    "TAG_CATALOG_RUN_ID",
    "TAG_CONFIG_HASH",
    "TAG_PIPELINE_RUN_ID",
    "TAG_PREFECT_FLOW_RUN_ID",
    "TAG_STAGE",
]
