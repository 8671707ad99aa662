"""Launch pretraining: one per-worker function for Ray Train, torchrun and a plain process.

* ``train_worker(config_dict)`` is the per-worker function. It joins torch.distributed (Ray
  Train has already done it; under torchrun it reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` and
  uses gloo on CPU, NCCL on GPU; a lone process stays single), builds the model, wraps it in DDP
  or FSDP2 (``fully_shard`` per decoder block, then the root) per ``PretrainConfig.parallelism``,
  resumes from the latest committed checkpoint in the store, trains, checkpoints every
  ``checkpoint_every`` steps and at the end, and writes the expert-load artefact. Rank 0 alone
  logs metrics; under Ray every rank calls ``ray.train.report`` on log steps (V2 expects all
  workers to report the same number of times).
* ``launch_ray(config, num_workers, use_gpu)`` runs it on Ray Train V2 (``TorchTrainer``) with
  ``FailureConfig(max_failures)``: a worker that dies is restarted with the whole group, and
  ``train_worker`` resumes from the store's latest checkpoint. We keep our own checkpoints in the
  object store (not Ray's checkpoint API): the same resume path then serves Ray restarts, a
  re-run of the Prefect task and a torchrun job.
* ``run_pretrain(...)`` is the library entry the Prefect task calls: launch (Ray when more than
  one worker, in-process otherwise), then evaluate the final checkpoint against the unigram
  baseline, export it in Hugging Face format as an artefact, and register the model version.

Without Ray, MLflow or a store server (e.g. on a GPU box)::

    MOEFLOW_TRACKING=noop python -m moeflow.platform.train.launcher --config run.json
    MOEFLOW_TRACKING=noop torchrun --nproc_per_node 2 -m moeflow.platform.train.launcher --config run.json

where ``run.json`` (or ``.yaml``) holds a ``LaunchConfig`` (``pretrain`` = ``PretrainConfig`` fields,
``tokens_uri``, ``output_prefix``, optional ``store_uri``, default the settings' store); ``--finalize``
adds the evaluation (vs the unigram baseline) and the HF export on rank 0. Re-running the same
command resumes from the newest checkpoint under ``output_prefix`` (a finished run does nothing).
On GPUs use ``"param_dtype": "bf16"`` and ``"compile": true`` for speed (see ``PretrainConfig``).

Fault injection for tests: ``fault_step`` + ``fault_marker`` make rank ``fault_rank`` SIGKILL
itself after that step, once (the marker file records that the first attempt did it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moeflow.models import MoETransformer
from moeflow.models.config import strict_from_dict
from moeflow.models.train import state as train_state
from moeflow.models.train.loop import PretrainConfig, Trainer, router_biases

from .checkpoint import CheckpointManager, config_hash
from .expert_load import NPZ_NAME, ExpertLoadRecorder, expert_metrics
from .loader import PackedLoader, eval_batches

log = logging.getLogger(__name__)

EXPERT_LOAD_DIR = "expert_load"
HF_DIR = "hf"


@dataclass
class LaunchConfig:
    """What a worker needs besides the loop config; JSON-serialisable (it crosses to Ray workers)."""

    pretrain: dict
    tokens_uri: str
    output_prefix: str
    store_uri: str | None = None  # root of the store; None: the settings' store
    run_name: str = "pretrain"
    model_name: str = "moe"
    # tracking on rank 0: "auto" = get_tracker() with a new run, "noop", or "mlflow" (tracking_uri,
    # experiment, parent_run_id: log into / under the driver's run)
    tracking: str = "auto"
    tracking_uri: str | None = None
    experiment: str | None = None
    parent_run_id: str | None = None
    record_catalog: bool = False  # register checkpoints in the settings' catalog (rank 0)
    cache_dir: str | None = None
    device: str = "auto"  # auto: CUDA when available
    find_unused_parameters: bool = False
    # fault injection (tests): rank `fault_rank` SIGKILLs itself after `fault_step`, first attempt only
    fault_step: int | None = None
    fault_rank: int = 0
    fault_marker: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "LaunchConfig":
        return strict_from_dict(cls, d, required=("pretrain", "tokens_uri", "output_prefix"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PretrainResult:
    checkpoint_uri: str
    hf_uri: str | None
    expert_load_uri: str | None
    metrics: dict = field(default_factory=dict)
    model_id: str | None = None
    steps: int = 0


# ------------------------------------------------------------------ process set-up
def _ray_train_context():
    """Ray Train's context when this process is a Ray Train worker, else None."""
    if "ray" not in sys.modules:  # a Ray Train worker has imported ray long before calling us
        return None
    try:
        import ray.train

        ctx = ray.train.get_context()
        ctx.get_world_size()
        return ctx
    except Exception:  # not under Ray Train (or Ray not installed)
        return None


def _init_distributed(use_cuda: bool) -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, we_created_the_group)."""
    if dist.is_available() and dist.is_initialized():  # Ray Train did it
        ctx = _ray_train_context()
        local_rank = ctx.get_local_rank() if ctx is not None else int(os.environ.get("LOCAL_RANK", 0))
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # torchrun
        backend = "nccl" if use_cuda else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size(), local_rank, True
    return 0, 1, 0, False


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _open_store(store_uri: str | None):
    from moeflow.platform.store import open_store, store_for_uri

    if not store_uri:
        return open_store()
    store, key = store_for_uri(store_uri.rstrip("/") + "/_")  # the root: a key inside it, dropped below
    return store


def wrap_model(model: torch.nn.Module, cfg: PretrainConfig, world_size: int, device: torch.device,
               find_unused_parameters: bool = False) -> torch.nn.Module:
    """DDP or FSDP2 around the bare model (architecture stays separate from distribution)."""
    if world_size <= 1:
        return model
    if cfg.parallelism == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        for block in model.mtp:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


# ------------------------------------------------------------------ tracking on rank 0
@contextlib.contextmanager
def _rank0_tracker(cfg: LaunchConfig, tracker=None):
    """The tracker rank 0 logs through, with its run open for the duration of training."""
    if tracker is not None:  # in-process: the caller's tracker (its run already open, or one here)
        if tracker.active_run_id is None:
            with tracker.start_run(cfg.run_name):
                yield tracker
        else:
            yield tracker
        return
    from moeflow.platform.tracking import MLflowTracker, NoopTracker, get_tracker

    if cfg.tracking == "noop":
        yield NoopTracker()
        return
    if cfg.tracking == "mlflow":
        tracker = MLflowTracker(cfg.tracking_uri, experiment=cfg.experiment or "moeflow")
    else:
        tracker = get_tracker()
    if cfg.parent_run_id and hasattr(tracker, "attach_run"):
        with tracker.attach_run(cfg.parent_run_id):
            yield tracker
        return
    with tracker.start_run(f"{cfg.run_name}-train", tags={"moeflow.stage": "pretrain"},
                           parent_run_id=cfg.parent_run_id):
        yield tracker


# ------------------------------------------------------------------ the per-worker function
def train_worker(config: dict, tracker=None) -> dict:
    """Train (or resume) one run; returns a small dict of references and final metrics (rank 0)."""
    cfg = LaunchConfig.from_dict(config)
    pcfg = PretrainConfig.from_dict(cfg.pretrain)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rank, world_size, local_rank, own_group = _init_distributed(use_cuda)
    ray_ctx = _ray_train_context()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    tmp = Path(tempfile.mkdtemp(prefix=f"moeflow-train-r{rank}-"))
    try:
        return _train(cfg, pcfg, rank, world_size, device, ray_ctx, tmp, tracker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if own_group:
            dist.destroy_process_group()


def _train(cfg, pcfg, rank, world_size, device, ray_ctx, tmp: Path, tracker) -> dict:
    from moeflow.platform.data.shards import TokenDataset

    store = _open_store(cfg.store_uri)
    # ---- data: rank 0 fills the local cache first; the others then reuse it
    if rank != 0:
        _barrier()
    train_ds = TokenDataset.open(cfg.tokens_uri, "train", cache_dir=cfg.cache_dir)
    val_ds = TokenDataset.open(cfg.tokens_uri, "val", cache_dir=cfg.cache_dir)
    if rank == 0:
        _barrier()
    if "vocab_size" not in pcfg.model_overrides:
        pcfg.model_overrides = {**pcfg.model_overrides, "vocab_size": int(train_ds.meta["vocab_size"])}
    bos_id = int(train_ds.meta["bos_id"])

    # ---- model (same init on every rank: same seed), wrapping, loader
    torch.manual_seed(pcfg.seed)
    model = MoETransformer(pcfg.model_config()).to(device)
    if pcfg.param_dtype == "bf16":
        model = model.to(torch.bfloat16)  # the router keeps its bias buffer fp32 (Router._apply)
    wrapped = wrap_model(model, pcfg, world_size, device, cfg.find_unused_parameters)
    loader = PackedLoader(train_ds, seq_len=pcfg.seq_len, batch_size=pcfg.micro_batch_size, seed=pcfg.seed,
                          rank=rank, world_size=world_size, bos_id=bos_id)
    num_val = max(world_size, pcfg.val_batches - pcfg.val_batches % world_size)  # equal per rank (FSDP)
    val_size = pcfg.val_batch_size or pcfg.micro_batch_size
    val_cache: list = []

    def val_batches():
        if not val_cache:
            val_cache.extend(eval_batches(val_ds, seq_len=pcfg.seq_len, batch_size=val_size,
                                          num_batches=num_val, rank=rank, world_size=world_size, bos_id=bos_id))
        return val_cache

    manager = CheckpointManager(store, cfg.output_prefix, keep_last=pcfg.keep_checkpoints,
                                catalog=_catalog() if (cfg.record_catalog and rank == 0) else None,
                                model_name=cfg.model_name, config=pcfg.to_dict())
    recorder = ExpertLoadRecorder()
    bytes_per_token = val_ds.meta.get("bytes_per_token") or pcfg.bytes_per_token

    with (_rank0_tracker(cfg, tracker) if rank == 0 else contextlib.nullcontext(None)) as rank0_tracker:
        trainer = Trainer(pcfg, model, loader, wrapped=wrapped, val_batches=val_batches, device=device,
                          logger=rank0_tracker, bytes_per_token=bytes_per_token, bos_id=bos_id)
        # ---- resume from the newest committed checkpoint
        latest = _broadcast(manager.latest() if rank == 0 else None)
        if latest is not None:
            local = manager.download(latest, tmp / f"resume-{latest.step}")
            train_state.restore(trainer, local, loader)
            if (local / NPZ_NAME).is_file():
                recorder = ExpertLoadRecorder.from_npz_bytes((local / NPZ_NAME).read_bytes())
                recorder.truncate(trainer.step)
            log.info("rank %d resumed from %s at step %d", rank, latest.uri, trainer.step)
        elif rank == 0 and rank0_tracker is not None:
            rank0_tracker.log_params({"pretrain": pcfg.to_dict(), "tokens_uri": cfg.tokens_uri,
                                      "world_size": world_size, "output_prefix": cfg.output_prefix})

        state = {"checkpoint": latest}

        def on_step(tr: Trainer, step: int, metrics: dict) -> None:
            if "loss" in metrics:  # a log step: close the expert-load window
                if rank == 0 and tr.logged_interval_counts_LE.numel():
                    bias = router_biases(tr.model)
                    recorder.record(step, tr.logged_interval_counts_LE.numpy(),
                                    None if bias is None else bias.cpu().numpy())
                    if rank0_tracker is not None:
                        rank0_tracker.log_metrics(expert_metrics(tr.logged_interval_counts_LE.numpy()), step=step)
                if ray_ctx is not None:
                    import ray.train

                    ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            if (pcfg.checkpoint_every and step % pcfg.checkpoint_every == 0) or step == pcfg.max_steps:
                tr.meter.pause()  # checkpoint time is not training throughput
                state["checkpoint"] = _save_checkpoint(tr, loader, manager, recorder, rank, tmp, world_size)
                tr.meter.resume()
            if cfg.fault_step is not None and step == cfg.fault_step and rank == cfg.fault_rank:
                _maybe_die(cfg.fault_marker)

        trainer.callbacks.append(on_step)
        started = time.time()
        if trainer.step < pcfg.max_steps:
            trainer.fit()
        elif state["checkpoint"] is None:
            raise RuntimeError("nothing to do and no checkpoint: max_steps reached without a checkpoint")
        loader.close()

        result: dict[str, Any] = {"rank": rank, "steps": trainer.step}
        if rank == 0:
            expert_uri = _write_expert_load(store, cfg.output_prefix, recorder, trainer.step)
            last = trainer.history[-1] if trainer.history else {}
            result.update({"checkpoint_uri": state["checkpoint"].uri, "expert_load_uri": expert_uri,
                           "metrics": last, "seconds": time.time() - started})
        _barrier()
        return result


def _save_checkpoint(trainer, loader, manager, recorder, rank, tmp: Path, world_size: int):
    captured = train_state.capture(trainer, loader)  # collective
    ref = None
    if rank == 0:
        local = tmp / f"ckpt-{trainer.step}"
        train_state.save(captured, local)
        recorder.save(local / NPZ_NAME)
        ref = manager.save(trainer.step, local, metadata={"world_size": world_size,
                                                          "tokens_seen": trainer.tokens_seen})
        shutil.rmtree(local, ignore_errors=True)
    return _broadcast(ref)


def _maybe_die(marker: str | None) -> None:
    """SIGKILL this process once: the marker file makes later attempts pass through."""
    if marker is None:
        raise ValueError("fault_step needs fault_marker (a file path shared by all attempts)")
    path = Path(marker)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"killed pid {os.getpid()} at {time.time()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _write_expert_load(store, output_prefix: str, recorder: ExpertLoadRecorder, step: int) -> str | None:
    if not len(recorder):
        return None
    prefix = f"{output_prefix.strip('/')}/{EXPERT_LOAD_DIR}"
    arrays = recorder.arrays()
    with store.write_artifact(prefix, metadata={"kind": "expert-load", "step": step,
                                                "shape": list(arrays["counts"].shape)}, overwrite=True) as w:
        w.put_bytes(NPZ_NAME, recorder.to_npz_bytes())
    return store.uri(prefix)


def _catalog():
    from moeflow.platform.catalog import Catalog

    return Catalog.from_settings()


# ------------------------------------------------------------------ Ray Train
def _worker_env() -> dict[str, str]:
    """Settings travel to Ray workers as environment variables."""
    keep = ("MOEFLOW_", "MLFLOW_", "AWS_", "OMP_NUM_THREADS")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


def launch_ray(config: dict, num_workers: int, use_gpu: bool = False, *, max_failures: int = 2,
               settings=None, cpus_per_worker: float = 1) -> Any:
    """Run ``train_worker`` on ``num_workers`` Ray Train workers; returns Ray's ``Result``."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from moeflow.platform.compute import ensure_ray
    from moeflow.platform.settings import get_settings

    settings = settings or get_settings()
    ensure_ray(settings)
    storage = Path(settings.home) / "ray_train"
    storage.mkdir(parents=True, exist_ok=True)
    env = _worker_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
        run_config=RunConfig(name=f"{config.get('run_name', 'pretrain')}-{int(time.time())}",
                             storage_path=str(storage), failure_config=FailureConfig(max_failures=max_failures),
                             worker_runtime_env={"env_vars": env}),
    )
    return trainer.fit()


# ------------------------------------------------------------------ library entry
def run_pretrain(config: PretrainConfig | dict, store, *, tokens_uri: str, output_prefix: str, num_workers: int = 1,
                 use_gpu: bool = False, tracker=None, catalog=None, use_ray: bool | None = None,
                 max_failures: int = 2, run_name: str = "pretrain", model_name: str = "moe",
                 extra_launch: dict | None = None) -> PretrainResult:
    """Pretrain (resuming if checkpoints exist), evaluate, export HF, register the model version."""
    pcfg = config if isinstance(config, PretrainConfig) else PretrainConfig.from_dict(config)
    use_ray = num_workers > 1 if use_ray is None else use_ray
    launch = LaunchConfig(pretrain=pcfg.to_dict(), tokens_uri=tokens_uri, output_prefix=output_prefix,
                          store_uri=store.root_uri, run_name=run_name, model_name=model_name,
                          device="cuda" if use_gpu else "cpu", record_catalog=catalog is not None,
                          **(extra_launch or {}))
    if use_ray:
        from moeflow.platform.tracking import MLflowTracker

        if isinstance(tracker, MLflowTracker):
            launch.tracking, launch.tracking_uri, launch.experiment = "mlflow", tracker.tracking_uri, tracker.experiment
            launch.parent_run_id = tracker.active_run_id
        else:
            launch.tracking = "noop"
        launch_ray(launch.to_dict(), num_workers, use_gpu, max_failures=max_failures)
    else:
        from moeflow.platform.tracking import NoopTracker

        train_worker(launch.to_dict(), tracker=tracker if tracker is not None else NoopTracker())
    return finalize_run(launch, store, tracker=tracker, catalog=catalog,
                        replay_history=use_ray and not _is_mlflow(tracker),
                        device="cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def _is_mlflow(tracker) -> bool:
    from moeflow.platform.tracking import MLflowTracker

    return isinstance(tracker, MLflowTracker)


def finalize_run(launch: LaunchConfig, store, *, tracker=None, catalog=None, replay_history: bool = False,
                 device: str = "cpu") -> PretrainResult:
    """After training: evaluate the final checkpoint, export HF, register, log. Runs on the driver."""
    from .evaluate import evaluate_model, load_model

    pcfg = PretrainConfig.from_dict(launch.pretrain)
    manager = CheckpointManager(store, launch.output_prefix, keep_last=pcfg.keep_checkpoints)
    ref = manager.latest()
    if ref is None or ref.step < pcfg.max_steps:
        raise RuntimeError(f"training did not finish: latest checkpoint under {manager.prefix} is "
                           f"{'none' if ref is None else ref.step} of {pcfg.max_steps} steps")
    from moeflow.platform.data.shards import TokenDataset

    with tempfile.TemporaryDirectory(prefix="moeflow-final-") as tmp:
        local = manager.download(ref, Path(tmp) / "ckpt")
        model = load_model(local, device)
        train_ds = TokenDataset.open(launch.tokens_uri, "train", cache_dir=launch.cache_dir)
        val_ds = TokenDataset.open(launch.tokens_uri, "val", cache_dir=launch.cache_dir)
        metrics = evaluate_model(model, train_ds, val_ds, seq_len=pcfg.seq_len,
                                 batch_size=pcfg.val_batch_size or pcfg.micro_batch_size,
                                 num_batches=max(1, pcfg.val_batches), bytes_per_token=pcfg.bytes_per_token,
                                 device=device)
        t_state = torch.load(local / train_state.TRAINER_FILE, map_location="cpu", weights_only=False)
        history = t_state["loop"]["history"]
        hf_uri = _export_hf(model, store, launch.output_prefix, Path(tmp) / "hf", ref, metrics, train_ds)
    expert_prefix = f"{launch.output_prefix.strip('/')}/{EXPERT_LOAD_DIR}"
    expert_uri = store.uri(expert_prefix) if store.artifact_exists(expert_prefix) else None
    final = {f"final/{k}": v for k, v in metrics.items()}
    if history:
        final["final/train_loss"] = history[-1].get("loss", float("nan"))
    model_id = None
    if catalog is not None:
        model_id = catalog.register_model(launch.model_name, hf_uri or ref.uri, config_hash(launch.pretrain),
                                          metrics={**metrics, "step": ref.step})
    if tracker is not None:
        with (tracker.start_run(launch.run_name) if tracker.active_run_id is None else contextlib.nullcontext()):
            if replay_history:  # Ray workers logged nowhere the caller can see: replay the curves
                for row in history:
                    tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
            tracker.log_metrics(final, step=ref.step)
            tracker.set_tags({"moeflow.checkpoint_uri": ref.uri, "moeflow.hf_uri": hf_uri or "",
                              "moeflow.expert_load_uri": expert_uri or ""})
    return PretrainResult(checkpoint_uri=ref.uri, hf_uri=hf_uri, expert_load_uri=expert_uri, metrics=metrics,
                          model_id=model_id, steps=ref.step)


def _export_hf(model, store, output_prefix: str, local_dir: Path, ref, metrics: dict, train_ds) -> str | None:
    """HF DeepseekV3 directory (+ the run's tokenizer.json) as an artefact ``<prefix>/hf``.

    None, with a warning, when the config has no HF form (``export_hf`` refuses e.g. softmax routing).
    """
    from moeflow.models import hf

    meta = train_ds.meta
    refusals = tuple(c for c in (getattr(hf, "HFConversionError", None), ValueError) if c is not None)
    try:
        hf.export_hf(model, str(local_dir), bos_token_id=meta.get("bos_id"), eos_token_id=meta.get("eos_id"),
                     pad_token_id=meta.get("pad_id"))
    except refusals as err:  # a config without an HF form (softmax routing, uneven dense twin)
        log.warning("HF export skipped: %s", err)
        return None
    tokenizer = Path(getattr(train_ds, "local_dir", "")) / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copy(tokenizer, local_dir / "tokenizer.json")
    prefix = f"{output_prefix.strip('/')}/{HF_DIR}"
    with store.write_artifact(prefix, metadata={"kind": "hf-model", "format": "DeepseekV3ForCausalLM",
                                                "checkpoint_uri": ref.uri, "step": ref.step,
                                                "metrics": metrics}, overwrite=True) as w:
        for path in sorted(local_dir.rglob("*")):
            if path.is_file():
                w.put_file(path.relative_to(local_dir).as_posix(), path)
    return store.uri(prefix)


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
    parser.add_argument("--finalize", action="store_true", help="rank 0: evaluate + HF export after training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _read_config(args.config)
    result = train_worker(config)
    if result.get("rank", 0) == 0:
        if args.finalize:
            launch = LaunchConfig.from_dict(config)
            final = finalize_run(launch, _open_store(launch.store_uri),
                                 device="cuda" if torch.cuda.is_available() else "cpu")
            result["final"] = dataclasses.asdict(final)
        print(json.dumps(result, default=str, indent=2))


if __name__ == "__main__":
    main()
