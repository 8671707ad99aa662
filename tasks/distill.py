"""The distill stage: a teacher model version + token shards -> a smaller student version (parent: the
teacher), MLflow alias 'distill'. The teacher's top-k logits are cached in the store for reuse."""

from __future__ import annotations

from prefect import task

from moeflow.platform.posttrain.distill import DistillConfig, run_distill
from moeflow.tasks.common import STAGE_CACHE, STAGE_RETRY, run_posttrain_stage


@task(name="distill", cache_policy=STAGE_CACHE, persist_result=True, **STAGE_RETRY)
def distill_task(config: DistillConfig, tokens_uri: str, model: str | None = None, run_name: str = "moe",
                 num_workers: int = 1, use_gpu: bool = False, pipeline: dict | None = None) -> dict:
    """``model`` (the teacher): any ``model_refs`` form; default the newest pretrained ``run_name``."""
    return run_posttrain_stage("distill", config, run_distill, data_uri=tokens_uri, model=model, run_name=run_name,
                               default_from="pretrain", pipeline=pipeline, data_param="tokens_uri",
                               num_workers=num_workers, use_gpu=use_gpu)
