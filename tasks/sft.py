"""The sft stage: a model version + chat data -> a fine-tuned model version (parent: the input), MLflow alias 'sft'."""

from __future__ import annotations

from prefect import task

from moeflow.platform.posttrain.sft import SFTConfig, run_sft
from moeflow.tasks.common import STAGE_CACHE, STAGE_RETRY, run_posttrain_stage


@task(name="sft", cache_policy=STAGE_CACHE, persist_result=True, **STAGE_RETRY)
def sft_task(config: SFTConfig, data_uri: str, prompts_uri: str | None = None, model: str | None = None,
             run_name: str = "moe", num_workers: int = 1, use_gpu: bool = False, pipeline: dict | None = None) -> dict:
    """``model``: any ``model_refs`` form (catalog id, ``name@alias``, URI); default the newest pretrained ``run_name``."""
    return run_posttrain_stage("sft", config, run_sft, data_uri=data_uri, model=model, run_name=run_name,
                               default_from="pretrain", pipeline=pipeline, prompts_uri=prompts_uri,
                               num_workers=num_workers, use_gpu=use_gpu)
