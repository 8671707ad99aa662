"""The ``sft`` flow: a model version + chat data -> a supervised fine-tuned model version."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.posttrain.generated import GeneratedDataConfig
from moeflow.platform.posttrain.sft import SFTConfig
from moeflow.tasks.common import flow_run_namer
from moeflow.tasks.posttrain_data import posttrain_data_task
from moeflow.tasks.sft import sft_task


@flow(name="sft", log_prints=True, flow_run_name=flow_run_namer("sft"))
def sft(sft: SFTConfig = SFTConfig(), posttrain_data: GeneratedDataConfig = GeneratedDataConfig(),
        dataset: str = "tiny", run_name: str = "moe", model: str | None = None, data_uri: str | None = None,
        prompts_uri: str | None = None, train_workers: int = 1, use_gpu: bool = False) -> dict:
    """``model`` defaults to the newest pretrained ``run_name``; without ``data_uri`` the built-in generated sets are used."""
    # data
    if data_uri is None:
        sets = posttrain_data_task(posttrain_data, dataset=dataset)
        data_uri, prompts_uri = sets["chat_uri"], prompts_uri or sets["prompt_uri"]
    # sft
    return sft_task(sft, data_uri, prompts_uri, model=model, run_name=run_name, num_workers=train_workers,
                    use_gpu=use_gpu)
