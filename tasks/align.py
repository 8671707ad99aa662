"""The align stage (method: dpo): a model version + preference pairs -> an aligned version (parent: the input),
MLflow alias 'align'. The input version is also the DPO reference (its log-probs are stored once)."""

from __future__ import annotations

from prefect import task

from moeflow.platform.posttrain.align import AlignConfig, run_align
from moeflow.tasks.common import STAGE_CACHE, STAGE_RETRY, run_posttrain_stage


@task(name="align", cache_policy=STAGE_CACHE, persist_result=True, **STAGE_RETRY)
def align_task(config: AlignConfig, data_uri: str, model: str | None = None, run_name: str = "moe",
               num_workers: int = 1, use_gpu: bool = False, pipeline: dict | None = None) -> dict:
    """``model``: any ``model_refs`` form (catalog id, ``name@alias``, URI); default the newest sft model of ``run_name``."""
    return run_posttrain_stage("align", config, run_align, data_uri=data_uri, model=model, run_name=run_name,
                               default_from="sft", pipeline=pipeline, num_workers=num_workers, use_gpu=use_gpu)
