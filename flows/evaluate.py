"""The ``evaluate`` flow: a trained checkpoint -> validation metrics."""

from __future__ import annotations

from prefect import flow

from moeflow.tasks.common import latest_artifact_uri
from moeflow.tasks.evaluate import EvaluateConfig, evaluate_task


@flow(name="evaluate", log_prints=True)
def evaluate(evaluate: EvaluateConfig = EvaluateConfig(), dataset: str = "tiny", run_name: str = "moe",
             checkpoint_uri: str | None = None, tokens_uri: str | None = None) -> dict:
    """Defaults: the newest model ``run_name`` and the newest token shards of ``dataset``."""
    checkpoint_uri = checkpoint_uri or latest_artifact_uri("model", run_name)
    tokens_uri = tokens_uri or latest_artifact_uri("tokens", f"{dataset}-tokens")
    return evaluate_task(evaluate, checkpoint_uri, tokens_uri)
