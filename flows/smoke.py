"""The ``smoke`` flow: one task that exercises store, catalog, MLflow and Prefect."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.smoke import SmokeConfig
from moeflow.tasks.common import flow_run_namer
from moeflow.tasks.smoke import smoke_task

__all__ = ["SmokeConfig", "smoke"]


@flow(name="smoke", log_prints=True, flow_run_name=flow_run_namer("smoke"))
def smoke(smoke: SmokeConfig = SmokeConfig()) -> dict:
    return smoke_task(smoke)
