"""The ``reward`` flow: a model version + preference pairs -> a Bradley–Terry reward model version."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.posttrain.generated import GeneratedDataConfig
from moeflow.platform.posttrain.reward import RewardConfig
from moeflow.tasks.common import flow_run_namer
from moeflow.tasks.posttrain_data import posttrain_data_task
from moeflow.tasks.reward import reward_task


@flow(name="reward", log_prints=True, flow_run_name=flow_run_namer("reward"))
def reward(reward: RewardConfig = RewardConfig(), posttrain_data: GeneratedDataConfig = GeneratedDataConfig(),
           dataset: str = "tiny", run_name: str = "moe", model: str | None = None, data_uri: str | None = None,
           train_workers: int = 1, use_gpu: bool = False) -> dict:
    """``model`` defaults to the newest sft model of ``run_name``; without ``data_uri`` the generated pairs are used."""
    # data
    if data_uri is None:
        data_uri = posttrain_data_task(posttrain_data, dataset=dataset)["preference_uri"]
    # reward
    return reward_task(reward, data_uri, model=model, run_name=run_name, num_workers=train_workers, use_gpu=use_gpu)
