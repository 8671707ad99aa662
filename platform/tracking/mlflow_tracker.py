"""``MLflowTracker``: the ``Tracker`` protocol over an ``MlflowClient`` bound to its own tracking URI.

It never uses MLflow's process-global "active run", so several trackers, threads and Prefect
tasks can log side by side. Which run is active is kept in a ``ContextVar`` stack: a stage run
started with ``nested=True`` inside a pipeline run (same thread, or a Prefect task that
inherited the context) becomes its child through MLflow's ``mlflow.parentRunId`` tag, exactly
what ``mlflow.start_run(nested=True)`` writes.

MLflow is imported lazily: it takes seconds to import and starts a telemetry client on
import, which we switch off first (the platform runs offline).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from .conventions import EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_TRAINING, NOTE_TAG
from .datasets import build_dataset
from .mlflow_env import quiet_mlflow_env
from .protocol import MLFLOW_PARENT_RUN_ID
from .values import flatten_params, metric_values, table_columns

log = logging.getLogger(__name__)

_PARAM_BATCH = 100  # MLflow's per-request limits
_METRIC_BATCH = 1000

# (tracking_uri, run_id) of the runs open in this context, innermost last
_ACTIVE_RUNS: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("moeflow_active_runs", default=())


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
            quiet_mlflow_env()
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        """The project's experiment, created on first use (a concurrent creator may win).

        It is marked as a model-training experiment (``mlflow.experimentKind``) unless someone
        already chose a kind in the UI: MLflow 3 otherwise opens a fresh experiment on its GenAI view.
        """
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=self.artifact_location,
                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_TRAINING},
                    )
                except MlflowException:
                    found = self.client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    self.client.restore_experiment(found.experiment_id)
                if EXPERIMENT_KIND_TAG not in found.tags:
                    self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_TRAINING)
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

    def log_summary(self, metrics):
        """Each value once, at step 0 with no series behind it (MLflow draws it as a single value)."""
        self.log_metrics(metrics, step=0)

    def log_figure(self, figure, artifact_file):
        self.client.log_figure(self._run_id(), figure, artifact_file)

    def set_description(self, markdown):
        self.set_tags({NOTE_TAG: markdown})

    def run_name(self, run_id):
        return self.client.get_run(run_id).info.run_name

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

    def register_model(self, name, local_dir, artifact_path="model", alias=None, tags=None, description=None):
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
                                                   tags={str(k): str(v) for k, v in (tags or {}).items()},
                                                   description=description)
        if alias:
            self.client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self._run_id(), tags=items)
