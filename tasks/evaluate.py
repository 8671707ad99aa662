"""The evaluate stage: a checkpoint + token shards -> validation loss, bits per byte, baseline."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from moeflow.platform.stage import stage_run
from moeflow.platform.train.evaluate import evaluate_checkpoint
from moeflow.tasks.common import STAGE_CACHE


class EvaluateConfig(BaseModel):
    num_batches: int = 16
    batch_size: int = 8
    seq_len: int | None = None  # default: the training sequence length


@task(name="evaluate", cache_policy=STAGE_CACHE, persist_result=True)
def evaluate_task(config: EvaluateConfig, checkpoint_uri: str, tokens_uri: str, pipeline: dict | None = None) -> dict:
    with stage_run("evaluate", config.model_dump(), inputs=[checkpoint_uri, tokens_uri], pipeline=pipeline) as st:
        metrics = evaluate_checkpoint(checkpoint_uri, tokens_uri, seq_len=config.seq_len,
                                      batch_size=config.batch_size, num_batches=config.num_batches)
        st.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        create_table_artifact(key="evaluation", table=[{"metric": k, "value": v} for k, v in metrics.items()],
                              description=f"validation of {checkpoint_uri}")
    return metrics
