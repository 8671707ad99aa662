"""The ``pretrain`` flow: token shards -> trained MoE model."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.train.config import PretrainConfig
from moeflow.tasks.common import flow_run_namer, resolve_input
from moeflow.tasks.pretrain import pretrain_task


@flow(name="pretrain", log_prints=True, flow_run_name=flow_run_namer("pretrain"))
def pretrain(pretrain: PretrainConfig = PretrainConfig(), dataset: str = "tiny", tokens_uri: str | None = None,
             run_name: str = "moe", train_workers: int = 1, use_gpu: bool = False) -> dict:
    """``tokens_uri`` defaults to the newest token shards of ``dataset`` in the catalog."""
    tokens_uri = tokens_uri or resolve_input("pretrain", "tokens_uri", dataset=dataset)
    return pretrain_task(pretrain, tokens_uri, run_name=run_name, num_workers=train_workers, use_gpu=use_gpu)
