"""The ``evaluate`` flow: model versions (registry alias, catalog id or URI) x tasks -> a comparison table."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.eval.config import EvaluateConfig
from moeflow.platform.stages import MissingInput
from moeflow.tasks.common import flow_run_namer, resolve_input
from moeflow.tasks.evaluate import evaluate_task


@flow(name="evaluate", log_prints=True, flow_run_name=flow_run_namer("evaluate"))
def evaluate(evaluate: EvaluateConfig = EvaluateConfig(), dataset: str = "tiny", run_name: str = "moe",
             checkpoint_uri: str | None = None, tokens_uri: str | None = None) -> dict:
    """Models: ``evaluate.models`` (e.g. ``["moe-tiny@pretrained", "catalog:<id>"]``), else the newest model
    ``run_name``. Token shards (validation loss, a checkpoint's tokenizer): the newest of ``dataset``."""
    if not evaluate.models:
        checkpoint_uri = checkpoint_uri or resolve_input("evaluate", "checkpoint_uri", run_name=run_name)
    try:
        tokens_uri = tokens_uri or resolve_input("evaluate", "tokens_uri", dataset=dataset)
    except MissingInput:
        if not evaluate.models:
            raise
    return evaluate_task(evaluate, checkpoint_uri, tokens_uri, models=evaluate.models or None)
