"""The evaluate task: a checkpoint + token shards -> validation loss, bits per byte, baseline."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from moeflow.platform.stage import stage_run
from moeflow.platform.train.evaluate import EvaluateConfig, run_evaluate
from moeflow.tasks.common import STAGE_CACHE

__all__ = ["EvaluateConfig", "evaluate_task"]


@task(name="evaluate", cache_policy=STAGE_CACHE, persist_result=True)
def evaluate_task(config: EvaluateConfig, checkpoint_uri: str, tokens_uri: str, pipeline: dict | None = None) -> dict:
    with stage_run("evaluate", config.to_dict(), inputs=[checkpoint_uri, tokens_uri], pipeline=pipeline) as st:
        result = run_evaluate(config, st.store, checkpoint_uri=checkpoint_uri, tokens_uri=tokens_uri)
        st.log_metrics({f"eval/{k}": v for k, v in result.metrics.items()})
        create_table_artifact(key="evaluation", table=[{"metric": k, "value": v} for k, v in result.metrics.items()],
                              description=f"validation of {checkpoint_uri}")
    return result.metrics
