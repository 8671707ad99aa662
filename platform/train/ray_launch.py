"""Run a training worker function on Ray Train V2 (``TorchTrainer``).

``launch_ray(config, num_workers, use_gpu, worker=train_worker)`` runs ``worker(config)`` on
``num_workers`` Ray Train workers with ``FailureConfig(max_failures)`` (default the settings'
``ray_max_failures``, ``MOEFLOW_RAY_MAX_FAILURES``): a worker that dies, alone or with its node, is
restarted with the whole group, and the worker resumes from the store's newest checkpoint. A lost
node's workers wait (Ray Train retries the placement without counting failures) until the cluster
has room again, e.g. until KubeRay has replaced the node. We
keep our own checkpoints in the object store (not Ray's checkpoint API): the same resume path
then serves Ray restarts, a re-run of the Prefect task and a torchrun job. Any stage's worker
function fits (``worker`` takes the JSON-serialisable config dict).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def worker_env() -> dict[str, str]:
    """Settings travel to Ray workers as environment variables."""
    keep = ("MOEFLOW_", "MLFLOW_", "AWS_", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k.startswith(keep)}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class PlacementTimeout(RuntimeError):
    """Ray could not place the training workers within ``settings.ray_placement_timeout_s``."""


def worker_bundle(use_gpu: bool, cpus_per_worker: float) -> dict[str, float]:
    """The resources one Ray Train worker asks for (what ``ScalingConfig`` below requests)."""
    return {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": float(cpus_per_worker)}


def wait_for_placement(num_workers: int, bundle: dict[str, float], timeout_s: float, *,
                       report_every_s: float = 10.0) -> None:
    """Reserve (and release) ``num_workers`` x ``bundle`` on the cluster, saying what it waits for.

    Ray Train otherwise waits silently, forever, when the cluster cannot hold the workers (too
    few CPUs/GPUs, or tasks and actors of an earlier stage still holding them). A placement
    group with the same bundles is what Ray Train will ask for; when it cannot be placed within
    ``timeout_s`` we fail with the numbers instead.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([dict(bundle)] * num_workers, strategy="PACK")
    deadline = time.monotonic() + timeout_s
    interval = 1.0  # the first report comes quickly; later ones every report_every_s
    try:
        while True:
            left = deadline - time.monotonic()
            if pg.wait(timeout_seconds=max(0.0, min(interval, left))):
                return
            interval = report_every_s
            need = {k: v * num_workers for k, v in bundle.items()}
            status = (f"waiting for Ray to place {num_workers} training worker(s) of {bundle} (needs {need}); "
                      f"cluster total {_resources(ray.cluster_resources(), need)}, "
                      f"free {_resources(ray.available_resources(), need)}")
            if time.monotonic() >= deadline:
                raise PlacementTimeout(f"{status}: gave up after {timeout_s:.0f}s (MOEFLOW_RAY_PLACEMENT_TIMEOUT_S). "
                                       "Use fewer train_workers, give Ray more CPUs (MOEFLOW_RAY_NUM_CPUS), or stop "
                                       "what holds them (`ray status`).")
            log.warning("%s", status)
    finally:
        remove_placement_group(pg)


def _resources(available: dict, wanted: dict) -> dict:
    return {k: round(float(available.get(k, 0.0)), 2) for k in wanted}


def failure_config(settings, max_failures: int | None = None):
    """Ray Train's ``FailureConfig``: ``max_failures`` restarts of the worker group, default the settings'
    ``ray_max_failures``."""
    from ray.train import FailureConfig

    return FailureConfig(max_failures=settings.ray_max_failures if max_failures is None else max_failures)


def launch_ray(config: dict, num_workers: int, use_gpu: bool = False, *, max_failures: int | None = None,
               settings=None, cpus_per_worker: float = 1, worker: Callable[[dict], Any] | None = None,
               placement_timeout_s: float | None = None) -> Any:
    """Run ``worker`` (default: pretraining's ``train_worker``) on Ray Train workers; returns Ray's ``Result``.

    Fails with ``PlacementTimeout`` when the workers cannot be placed within
    ``placement_timeout_s`` (default ``settings.ray_placement_timeout_s``)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from moeflow.platform.compute import ensure_ray
    from moeflow.platform.settings import get_settings

    if worker is None:
        from .worker import train_worker as worker
    settings = settings or get_settings()
    ensure_ray(settings)
    timeout = settings.ray_placement_timeout_s if placement_timeout_s is None else placement_timeout_s
    wait_for_placement(num_workers, worker_bundle(use_gpu, cpus_per_worker), timeout)
    storage = Path(settings.home) / "ray_train"
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=worker_bundle(use_gpu, cpus_per_worker)),
        run_config=RunConfig(name=f"{config.get('run_name', 'pretrain')}-{int(time.time())}",
                             storage_path=str(storage), failure_config=failure_config(settings, max_failures),
                             worker_runtime_env={"env_vars": worker_env()}),
    )
    return trainer.fit()
