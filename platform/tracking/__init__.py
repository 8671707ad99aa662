"""Experiment tracking behind a small protocol: MLflow for real, a no-op for tests.

    protocol.py        the ``Tracker`` protocol and the tag keys shared with the stage glue
    noop.py            ``NoopTracker``: records every call in memory (unit tests, offline boxes)
    mlflow_tracker.py  ``MLflowTracker``: an ``MlflowClient`` bound to one tracking URI, nesting by context
    conventions.py     experiment kind, run names, run descriptions, dataset display names (pure)
    datasets.py        ``build_dataset``: an artefact URI as an MLflow dataset input (metadata only)
    values.py          params / metrics / tables shaped the same way for both trackers
    mlflow_env.py      MLflow's environment (telemetry off, the store's S3 credentials)
    factory.py         ``get_tracker(settings)``
    pyfunc.py          the registered model as an MLflow pyfunc over the HF export (imports MLflow;
                       not imported here: only registration and MLflow's loader need it)

Importing this package imports no MLflow: every MLflow import sits inside a function.
"""

from .conventions import (
    EXPERIMENT_KIND_TAG,
    EXPERIMENT_KIND_TRAINING,
    NOTE_TAG,
    dataset_display_name,
    prefect_flow_run_url,
    run_description,
    stage_run_name,
)
from .datasets import build_dataset
from .factory import get_tracker
from .mlflow_env import quiet_mlflow_env, s3_env_for_mlflow
from .mlflow_tracker import MLflowTracker
from .noop import NoopTracker
from .protocol import (
    MLFLOW_PARENT_RUN_ID,
    TAG_CATALOG_RUN_ID,
    TAG_CONFIG_HASH,
    TAG_PIPELINE_RUN_ID,
    TAG_PREFECT_FLOW_RUN_ID,
    TAG_STAGE,
    Tracker,
)
from .values import flatten_params, metric_values, table_columns

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "EXPERIMENT_KIND_TRAINING",
    "NOTE_TAG",
    "dataset_display_name",
    "prefect_flow_run_url",
    "run_description",
    "stage_run_name",
    "MLFLOW_PARENT_RUN_ID",
    "MLflowTracker",
    "NoopTracker",
    "TAG_CATALOG_RUN_ID",
    "TAG_CONFIG_HASH",
    "TAG_PIPELINE_RUN_ID",
    "TAG_PREFECT_FLOW_RUN_ID",
    "TAG_STAGE",
    "Tracker",
    "build_dataset",
    "flatten_params",
    "get_tracker",
    "metric_values",
    "quiet_mlflow_env",
    "s3_env_for_mlflow",
    "table_columns",
]
