"""The ``evaluate`` flow: a trained checkpoint -> validation metrics."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.train.evaluate import EvaluateConfig
from moeflow.tasks.common import flow_run_namer, resolve_input
from moeflow.tasks.evaluate import evaluate_task


@flow(name="evaluate", log_prints=True, flow_run_name=flow_run_namer("evaluate"))
def evaluate(evaluate: EvaluateConfig = EvaluateConfig(), dataset: str = "tiny", run_name: str = "moe",
             checkpoint_uri: str | None = None, tokens_uri: str | None = None) -> dict:
    """Defaults: the newest model ``run_name`` and the newest token shards of ``dataset``."""
    checkpoint_uri = checkpoint_uri or resolve_input("evaluate", "checkpoint_uri", run_name=run_name)
    tokens_uri = tokens_uri or resolve_input("evaluate", "tokens_uri", dataset=dataset)
    return evaluate_task(evaluate, checkpoint_uri, tokens_uri)
