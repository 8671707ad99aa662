"""Pretraining's library entry (``run_pretrain``) and its command line (plain process or torchrun).

``run_pretrain(config, store, ...)`` is what the Prefect task calls: launch (Ray when more than
one worker, in-process otherwise), then finalise on the driver (HF export, final metrics). The pieces live beside it, one concept each:

* ``distributed``: process group, barrier/broadcast, DDP/FSDP2 wrapping, ``worker_context``;
* ``worker``: ``train_worker`` (the per-rank loop), resume and checkpoint helpers;
* ``ray_launch``: ``launch_ray`` on Ray Train V2 (any worker function);
* ``finalize``: ``finalize_run`` after training (HF export, final metrics);
* ``config``: ``PretrainConfig`` (pydantic, validated where the user typed it);
* ``expert_parallel``: routed experts sharded over a (dp, ep) mesh (``PretrainConfig.expert_parallel``),
  all-to-all dispatch; ``pipeline_parallel``: 1F1B stages (library and tests; not yet in the worker).

Without Ray, MLflow or a store server (e.g. on a GPU box)::

    MOEFLOW_TRACKING=noop python -m moeflow.platform.train.launcher --config run.json
    MOEFLOW_TRACKING=noop torchrun --nproc_per_node 2 -m moeflow.platform.train.launcher --config run.json

where ``run.json`` (or ``.yaml``) holds a ``LaunchConfig`` (``pretrain`` = ``PretrainConfig`` fields,
``tokens_uri``, ``output_prefix``, optional ``store_uri``, default the settings' store); ``--finalize``
adds the HF export on rank 0. Re-running the same command resumes from the newest checkpoint under
``output_prefix`` (a finished run does nothing). On GPUs use ``"param_dtype": "bf16"`` and
``"compile": true`` for speed (see ``PretrainConfig``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch

from .config import PretrainConfig
from .distributed import open_store
from .finalize import PretrainResult, finalize_run
from .ray_launch import launch_ray
from .worker import LaunchConfig, train_worker

__all__ = ["LaunchConfig", "PretrainConfig", "PretrainResult", "finalize_run", "launch_ray", "main",
           "run_pretrain", "train_worker"]

log = logging.getLogger(__name__)


def run_pretrain(config: PretrainConfig | dict, store, *, tokens_uri: str, output_prefix: str, num_workers: int = 1,
                 use_gpu: bool = False, tracker=None, catalog=None, use_ray: bool | None = None,
                 max_failures: int | None = None, run_name: str = "pretrain", model_name: str = "moe",
                 extra_launch: dict | None = None) -> PretrainResult:
    """Pretrain (resuming if checkpoints exist) and export HF; returns the URIs and final metrics.

    ``catalog``: record every committed checkpoint in it (lineage of the final model back to its
    checkpoints). The final model is recorded by the stage (``tasks/pretrain.py``).
    """
    pcfg = config if isinstance(config, PretrainConfig) else PretrainConfig.from_dict(config)
    pcfg.mesh_shape(num_workers)  # world = dp x ep x pp: fail here, before any worker starts
    use_ray = num_workers > 1 if use_ray is None else use_ray
    launch = LaunchConfig(pretrain=pcfg.to_dict(), tokens_uri=tokens_uri, output_prefix=output_prefix,
                          store_uri=store.root_uri, run_name=run_name, model_name=model_name,
                          device="cuda" if use_gpu else "cpu", record_catalog=catalog is not None,
                          **(extra_launch or {}))
    mlflow = _is_mlflow(tracker)
    if use_ray:
        if mlflow:
            launch.tracking, launch.tracking_uri, launch.experiment = "mlflow", tracker.tracking_uri, tracker.experiment
            launch.parent_run_id = tracker.active_run_id
        else:
            launch.tracking = "noop"
        launch_ray(launch.to_dict(), num_workers, use_gpu, max_failures=max_failures)
    else:
        from moeflow.platform.tracking import NoopTracker

        train_worker(launch.to_dict(), tracker=tracker if tracker is not None else NoopTracker())
    return finalize_run(launch, store, tracker=tracker, replay_history=use_ray and not mlflow,
                        device="cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def _is_mlflow(tracker) -> bool:
    from moeflow.platform.tracking import MLflowTracker

    return isinstance(tracker, MLflowTracker)


# ------------------------------------------------------------------ command line
def _read_config(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moeflow pretraining worker (plain process or torchrun)")
    parser.add_argument("--config", required=True, help="LaunchConfig as JSON or YAML")
    parser.add_argument("--finalize", action="store_true", help="rank 0: HF export after training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _read_config(args.config)
    result = train_worker(config)
    if result.get("rank", 0) == 0:
        if args.finalize:
            launch = LaunchConfig.from_dict(config)
            final = finalize_run(launch, open_store(launch.store_uri),
                                 device="cuda" if torch.cuda.is_available() else "cpu")
            result["final"] = dataclasses.asdict(final)
        print(json.dumps(result, default=str, indent=2))


if __name__ == "__main__":
    main()
