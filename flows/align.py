"""The ``align`` flow: a model version + preference pairs (dpo) or prompts with answers (grpo, ppo) -> an aligned version."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.posttrain.align import AlignConfig
from moeflow.platform.posttrain.generated import GeneratedDataConfig
from moeflow.tasks.align import align_task
from moeflow.tasks.common import flow_run_namer
from moeflow.tasks.posttrain_data import posttrain_data_task


@flow(name="align", log_prints=True, flow_run_name=flow_run_namer("align"))
def align(align: AlignConfig = AlignConfig(), posttrain_data: GeneratedDataConfig = GeneratedDataConfig(),
          dataset: str = "tiny", run_name: str = "moe", model: str | None = None, data_uri: str | None = None,
          train_workers: int = 1, use_gpu: bool = False) -> dict:
    """``model`` (policy and reference) defaults to the newest sft model of ``run_name``; without ``data_uri``
    the generated preference pairs (dpo) or prompts with exact answers (grpo, ppo) are used."""
    # data
    if data_uri is None:
        data_uri = posttrain_data_task(posttrain_data, dataset=dataset)[align.data_key]
    # align
    return align_task(align, data_uri, model=model, run_name=run_name, num_workers=train_workers, use_gpu=use_gpu)
