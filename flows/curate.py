"""The ``curate`` flow: raw sources -> curated dataset."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.data.curate import CurateConfig
from moeflow.tasks.common import flow_run_namer
from moeflow.tasks.curate import curate_task


@flow(name="curate", log_prints=True, flow_run_name=flow_run_namer("curate"))
def curate(curate: CurateConfig = CurateConfig(), num_workers: int | None = None) -> dict:
    return curate_task(curate, num_workers=num_workers)
