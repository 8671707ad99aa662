"""Run a training worker function on Ray Train V2 (``TorchTrainer``).

``launch_ray(config, num_workers, use_gpu, worker=train_worker)`` runs ``worker(config)`` on
``num_workers`` Ray Train workers with ``FailureConfig(max_failures)``: a worker that dies is
restarted with the whole group, and the worker resumes from the store's newest checkpoint. We
keep our own checkpoints in the object store (not Ray's checkpoint API): the same resume path
then serves Ray restarts, a re-run of the Prefect task and a torchrun job. Any stage's worker
function fits (``worker`` takes the JSON-serialisable config dict).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable


def worker_env() -> dict[str, str]:
    """Settings travel to Ray workers as environment variables."""
    keep = ("MOEFLOW_", "MLFLOW_", "AWS_", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k.startswith(keep)}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch_ray(config: dict, num_workers: int, use_gpu: bool = False, *, max_failures: int = 2,
               settings=None, cpus_per_worker: float = 1, worker: Callable[[dict], Any] | None = None) -> Any:
    """Run ``worker`` (default: pretraining's ``train_worker``) on Ray Train workers; returns Ray's ``Result``."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from moeflow.platform.compute import ensure_ray
    from moeflow.platform.settings import get_settings

    if worker is None:
        from .worker import train_worker as worker
    settings = settings or get_settings()
    ensure_ray(settings)
    storage = Path(settings.home) / "ray_train"
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
        run_config=RunConfig(name=f"{config.get('run_name', 'pretrain')}-{int(time.time())}",
                             storage_path=str(storage), failure_config=FailureConfig(max_failures=max_failures),
                             worker_runtime_env={"env_vars": worker_env()}),
    )
    return trainer.fit()
