"""The ``posttrain_data`` flow: the built-in generated post-training sets (chat, preference, prompts)."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.posttrain.generated import GeneratedDataConfig
from moeflow.tasks.common import flow_run_namer
from moeflow.tasks.posttrain_data import posttrain_data_task


@flow(name="posttrain_data", log_prints=True, flow_run_name=flow_run_namer("posttrain_data"))
def posttrain_data(posttrain_data: GeneratedDataConfig = GeneratedDataConfig(), dataset: str = "tiny",
                   curated_uri: str | None = None) -> dict:
    """From ``curated_uri``'s Python files when given, else the interpreter's standard library."""
    return posttrain_data_task(posttrain_data, curated_uri=curated_uri, dataset=dataset)
