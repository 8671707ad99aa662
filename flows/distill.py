"""The ``distill`` flow: a teacher model version + token shards -> a smaller student model version."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.posttrain.distill import DistillConfig
from moeflow.tasks.common import flow_run_namer, resolve_input
from moeflow.tasks.distill import distill_task


@flow(name="distill", log_prints=True, flow_run_name=flow_run_namer("distill"))
def distill(distill: DistillConfig = DistillConfig(), dataset: str = "tiny", run_name: str = "moe",
            model: str | None = None, tokens_uri: str | None = None, train_workers: int = 1,
            use_gpu: bool = False) -> dict:
    """``model`` (the teacher) defaults to the newest pretrained ``run_name``; ``tokens_uri`` to the newest
    token shards of ``dataset``."""
    tokens_uri = tokens_uri or resolve_input("distill", "tokens_uri", dataset=dataset)
    return distill_task(distill, tokens_uri, model=model, run_name=run_name, num_workers=train_workers,
                        use_gpu=use_gpu)
