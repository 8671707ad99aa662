"""The reward stage: a model version + preference pairs -> a reward model version (parent: the input),
MLflow alias 'reward' (how RL and evaluation load it: ``<run_name>-reward@reward``)."""

from __future__ import annotations

from prefect import task

from moeflow.platform.posttrain.reward import RewardConfig, run_reward
from moeflow.tasks.common import STAGE_CACHE, STAGE_RETRY, run_posttrain_stage


@task(name="reward", cache_policy=STAGE_CACHE, persist_result=True, **STAGE_RETRY)
def reward_task(config: RewardConfig, data_uri: str, model: str | None = None, run_name: str = "moe",
                num_workers: int = 1, use_gpu: bool = False, pipeline: dict | None = None) -> dict:
    """``model``: any ``model_refs`` form (catalog id, ``name@alias``, URI); default the newest sft model of ``run_name``."""
    return run_posttrain_stage("reward", config, run_reward, data_uri=data_uri, model=model, run_name=run_name,
                               default_from="sft", pipeline=pipeline, num_workers=num_workers, use_gpu=use_gpu)
