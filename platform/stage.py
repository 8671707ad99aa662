"""Stage glue: one stage run = a catalog run + an MLflow run + lineage edges.

Every Prefect task wraps its library call in ``stage_run``: it opens the object store,
the catalog and the tracker from settings, starts a catalog run and an MLflow run (nested
under the pipeline's run when the task belongs to a pipeline), logs the config and the
inputs, and on exit records the outputs as lineage and marks the run succeeded or failed
(with the error). Library code never sees any of this: it gets a store and plain values.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

from .config import config_hash
from .settings import Settings, get_settings


def current_prefect_flow_run_id() -> str | None:
    """The id of the Prefect flow run we are inside, if any (never raises)."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        task_ctx = TaskRunContext.get()
        if task_ctx is not None and task_ctx.task_run.flow_run_id:
            return str(task_ctx.task_run.flow_run_id)
        flow_ctx = FlowRunContext.get()
        if flow_ctx is not None and flow_ctx.flow_run is not None:
            return str(flow_ctx.flow_run.id)
    except Exception:  # Prefect absent or not in a run
        return None
    return None


def current_prefect_flow_run_name() -> str | None:
    """The name of the Prefect flow run we are inside (e.g. ``pipeline-tiny-brave-fox``), if any."""
    try:
        from prefect.context import FlowRunContext

        flow_ctx = FlowRunContext.get()
        if flow_ctx is not None and flow_ctx.flow_run is not None:
            return flow_ctx.flow_run.name
    except Exception:  # Prefect absent or not in a run
        return None
    return None


@dataclass
class StageRun:
    stage: str
    run_id: str
    settings: Settings
    store: Any
    catalog: Any
    tracker: Any
    mlflow_run_id: str | None
    config_hash: str
    outputs: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (display name, URI)
    prefect_url: str | None = None
    model_version: str | None = None

    def add_output(self, uri: str, *, kind: str = "dataset", name: str | None = None,
                   stats: dict | None = None, content_hash: str | None = None) -> str:
        """Record an artefact this stage produced (catalog dataset version + lineage edge)."""
        if kind == "model":
            self.catalog.register_model(name or self.stage, uri, self.config_hash, metrics=stats)
        else:
            if not content_hash:  # every artefact written through the store has a manifest hash
                content_hash = self.store.read_artifact(uri).content_hash
            self.catalog.register_dataset(name or self.stage, uri, content_hash, stats=stats, kind=kind)
        self.outputs.append(uri)
        self.tracker.set_tags({f"moeflow.output.{len(self.outputs) - 1}": uri})
        return uri

    def register_model_version(self, name: str, artifact_uri: str, *, artifact_path: str = "model",
                               alias: str | None = "pretrained", tags: dict | None = None) -> str:
        """Register a store artefact (the HF export) as a version of MLflow model ``name``.

        The version is an MLflow pyfunc over the export (``tracking/pyfunc.py``): ``mlflow.pyfunc.
        load_model("models:/<name>@<alias>")`` generates text. The weights stay where they are, in
        the store (stored once); the export's ``README.md`` model card becomes the version's
        description. Returns the MLflow model version.
        """
        from .tracking.pyfunc import CARD_FILE, register_text_model

        artifact = self.store.read_artifact(artifact_uri)
        card = artifact.get_bytes(CARD_FILE).decode("utf-8") if CARD_FILE in artifact.names() else None
        version = register_text_model(self.tracker, name, artifact_uri, artifact_path=artifact_path, alias=alias,
                                      tags={"moeflow.artifact_uri": artifact_uri, **(tags or {})}, model_card=card)
        self.model_version = f"{name}/{version}"
        self.tracker.set_tags({"moeflow.model_version": self.model_version})
        return version

    def describe(self, status: str | None = None) -> None:
        """The run page's description: the Prefect flow run, the inputs, the artefacts written so far."""
        from .tracking import run_description

        self.tracker.set_description(run_description(self.stage, prefect_url=self.prefect_url, inputs=self.inputs,
                                                     outputs=self.outputs, model_version=self.model_version,
                                                     status=status))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """A stage's numbers: without a step they are its one-off results (summaries, not series)."""
        self.metrics.update({k: float(v) for k, v in metrics.items()})
        if step is None:
            self.tracker.log_summary(metrics)
        else:
            self.tracker.log_metrics(metrics, step=step)


@contextlib.contextmanager
def stage_run(
    stage: str,
    config: dict,
    inputs: list[str] | tuple[str, ...] = (),
    *,
    pipeline: dict | None = None,
    settings: Settings | None = None,
    store: Any = None,
    catalog: Any = None,
    tracker: Any = None,
) -> Iterator[StageRun]:
    """Run one stage with tracking and lineage; see the module docstring.

    ``pipeline`` is the small dict that the pipeline flow passes to each task
    (``{"catalog_run_id": ..., "mlflow_run_id": ...}``) so stage runs nest under it.
    """
    from .catalog import Catalog
    from .recovery import recover_crashed_runs
    from .store import open_store
    from .tracking import (TAG_CATALOG_RUN_ID, TAG_CONFIG_HASH, TAG_PIPELINE_RUN_ID, TAG_PREFECT_FLOW_RUN_ID,
                           TAG_STAGE, dataset_display_name, get_tracker, prefect_flow_run_url, stage_run_name)

    settings = settings or get_settings()
    settings.ensure_dirs()
    if logging.getLogger("moeflow").level == logging.NOTSET:  # progress (steps, loss, funnel) is INFO
        logging.getLogger("moeflow").setLevel(logging.INFO)
    owns_catalog = catalog is None
    catalog = catalog if catalog is not None else Catalog.from_settings(settings)
    tracker = tracker if tracker is not None else get_tracker(settings)
    recover_crashed_runs(catalog, tracker)
    pipeline = pipeline or {}
    chash = config_hash(config)
    prefect_run = current_prefect_flow_run_id()
    # the catalog run is recorded before anything else can fail (the store's credentials, its
    # permissions, MLflow), so every failed start leaves a failed run with its reason
    run_id = catalog.start_run(stage, config, pipeline_run_id=pipeline.get("catalog_run_id"),
                               prefect_flow_run_id=prefect_run)
    tags = {TAG_STAGE: stage, TAG_CATALOG_RUN_ID: run_id, TAG_CONFIG_HASH: chash}
    if prefect_run:
        tags[TAG_PREFECT_FLOW_RUN_ID] = prefect_run
    if pipeline.get("catalog_run_id"):
        tags[TAG_PIPELINE_RUN_ID] = pipeline["catalog_run_id"]
    try:
        with contextlib.ExitStack() as mlflow_run:
            try:
                store = store if store is not None else open_store(settings, create_bucket=True)
                parent = pipeline.get("mlflow_run_id")
                name = stage_run_name(stage, parent_run_name=tracker.run_name(parent) if parent else None,
                                      flow_run_name=current_prefect_flow_run_name())
                mlflow_run_id = mlflow_run.enter_context(
                    tracker.start_run(name, tags=tags, nested=parent is not None, parent_run_id=parent))
            except BaseException as err:
                catalog.finish_run(run_id, status="failed", error=_one_line(err))
                raise
            catalog.set_run_ids(run_id, mlflow_run_id=mlflow_run_id)
            st = StageRun(stage, run_id, settings, store, catalog, tracker, mlflow_run_id, chash,
                          inputs=[(dataset_display_name(uri, catalog.get_artifact(uri)), uri) for uri in inputs],
                          prefect_url=prefect_flow_run_url(settings.prefect_url, prefect_run) if prefect_run else None)
            try:
                tracker.log_params(config)  # trackers flatten nested keys
                for input_name, uri in st.inputs:
                    tracker.log_input(uri, name=input_name, context="input")
                st.describe("running")
                yield st
            except BaseException as err:
                catalog.add_lineage(run_id, inputs=list(inputs), outputs=st.outputs)
                message = _one_line(err)
                catalog.finish_run(run_id, status="failed", error=message, metrics=st.metrics)
                tracker.set_tags({"moeflow.status": "failed", "moeflow.error": message[:5000]})
                st.describe("failed")
                raise
            catalog.add_lineage(run_id, inputs=list(inputs), outputs=st.outputs)
            catalog.finish_run(run_id, status="succeeded", metrics=st.metrics)
            tracker.set_tags({"moeflow.status": "succeeded"})
            st.describe("succeeded")
    finally:
        if owns_catalog:  # a catalog we opened holds a connection pool
            catalog.close()


def _one_line(err: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(err), err)).strip()
