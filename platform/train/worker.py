"""The per-worker pretraining function, and the pieces of it any training stage reuses.

``train_worker(config_dict)`` runs on every rank (Ray Train, torchrun or a plain process): it
joins the group (``distributed.worker_context``), builds the model, wraps it in DDP or FSDP2
per ``PretrainConfig.parallelism`` (with expert_parallel > 1: experts sharded over ``ep``; with
pipeline_parallel > 1 instead: this rank's stages on a (dp, pp) mesh, ``pipeline_parallel.PipelineTrainer``,
the data split over the dp replicas; such a run resumes only with the same pipeline_parallel), resumes
from the newest committed checkpoint in the store
(written by any number of workers: model, optimiser and data position are resharded, see
``models.train.state``), trains, checkpoints every ``checkpoint_every`` steps and at the end
(sharded: every rank uploads its own DCP shards into the one artefact; each checkpoint preceded by
its train-log segment: the history and expert-load windows since the previous one, see
``train_log``), and writes the expert-load artefact. Rank 0 alone logs metrics; under Ray every rank calls ``ray.train.report`` on log
steps (V2 expects all workers to report the same number of times).

A post-training stage writes its own worker function (its own step function and data) and
reuses ``worker_context``, ``rank0_tracker``, ``resume_from_latest``, ``save_checkpoint`` and
``CheckpointManager``; ``ray_launch.launch_ray(config, ..., worker=its_worker)`` runs it on Ray.

Fault injection for tests: ``fault_step`` + ``fault_marker`` make rank ``fault_rank`` SIGKILL
itself after that step, once (the marker file records that the first attempt did it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeflow.models import MoETransformer
from moeflow.models.config import strict_from_dict
from moeflow.models.train import state as train_state
from moeflow.models.train.loop import Trainer, prepare_model

from moeflow.platform import artifacts as A

from .checkpoint import CheckpointManager, CheckpointRef
from .config import PretrainConfig
from .distributed import WorkerContext, barrier, open_store, worker_context, wrap_model
from .expert_load import NPZ_NAME, ExpertLoadRecorder, expert_metrics
from .loader import PackedLoader, eval_batches
from .train_log import TrainLog, checkpoint_log

log = logging.getLogger(__name__)



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


# ------------------------------------------------------------------ tracking on rank 0
@contextlib.contextmanager
def rank0_tracker(cfg: LaunchConfig, tracker=None, stage: str = "pretrain"):
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
    with tracker.start_run(f"{cfg.run_name}-train", tags={"moeflow.stage": stage},
                           parent_run_id=cfg.parent_run_id):
        yield tracker


# ------------------------------------------------------------------ checkpoints: resume and save
def resume_from_latest(manager: CheckpointManager, trainer, loader, ctx: WorkerContext) -> tuple[CheckpointRef | None, Path | None]:
    """Restore the newest committed checkpoint into ``trainer``/``loader`` on every rank.

    Rank 0 lists the store and every rank tries the same checkpoints, newest first, skipping (with a
    warning) corrupted ones, so all ranks load the same step (``CheckpointManager.resume_newest_intact``).
    No rank downloads the whole checkpoint: each fetches the small files and the shard files its own
    load reads. Returns (ref, local directory) or (None, None) when there is nothing to resume.
    """
    pp = int(getattr(trainer.cfg, "pipeline_parallel", 1))

    def load(ref: CheckpointRef, checkpoint) -> None:
        saved = train_state.read_meta(checkpoint.path).get("pretrain_config") or {}
        saved_pp = int(saved.get("pipeline_parallel", 1))
        if saved_pp != pp:  # the stages of a replica share one data position: a loader cannot re-split that
            raise ValueError(f"checkpoint {ref.uri} was written with pipeline_parallel={saved_pp}; this run has "
                             f"{pp}: resume with the same pipeline_parallel (its weights load anywhere for evaluation)")
        train_state.restore(trainer, checkpoint.path, loader, fetch=checkpoint.fetch)

    found = manager.resume_newest_intact(ctx.tmp, load)
    if found is None:
        return None, None
    latest, checkpoint, skipped = found
    if skipped and ctx.rank == 0:
        log.warning("resuming from step %d, the newest intact checkpoint; skipped %d corrupted: %s",
                    latest.step, len(skipped), "; ".join(skipped))
    log.info("rank %d resumed from %s at step %d, fetching %d of its %d files (%d of %d bytes)", ctx.rank,
             latest.uri, trainer.step, len(checkpoint.fetched), len(checkpoint.artifact.files),
             checkpoint.fetched_bytes, checkpoint.artifact.total_size)
    return latest, checkpoint.path


def save_checkpoint(trainer, loader, manager: CheckpointManager, ctx: WorkerContext,
                    extra_files: dict[str, Any] | None = None, include_history: bool = True) -> CheckpointRef:
    """Capture and save sharded (collective): every rank writes its own shards into its local scratch
    folder and uploads them into the one checkpoint artefact; rank 0 adds the small files and
    ``extra_files`` (name -> callable(path)) and commits. Returns the ref on every rank.

    include_history=False: the metrics history stays out of ``trainer.pt`` (see ``train_log``)."""
    captured = train_state.capture(trainer, loader, include_history=include_history)
    local = ctx.tmp / f"ckpt-{trainer.step}"
    try:
        train_state.save(captured, local)
        del captured
        if ctx.rank == 0:
            for name, write in (extra_files or {}).items():
                write(local / name)
        return manager.save_sharded(trainer.step, local, metadata={"world_size": ctx.world_size,
                                                                   "tokens_seen": trainer.tokens_seen})
    finally:
        shutil.rmtree(local, ignore_errors=True)


# ------------------------------------------------------------------ the per-worker function
def train_worker(config: dict, tracker=None) -> dict:
    """Train (or resume) one run; returns a small dict of references and final metrics (rank 0)."""
    cfg = LaunchConfig.from_dict(config)
    pcfg = PretrainConfig.from_dict(cfg.pretrain)
    with worker_context(cfg.device) as ctx:
        return _train(cfg, pcfg, ctx, tracker)


def _train(cfg: LaunchConfig, pcfg: PretrainConfig, ctx: WorkerContext, tracker) -> dict:
    from moeflow.platform.data.shards import TokenDataset

    rank, world_size, device = ctx.rank, ctx.world_size, ctx.device
    store = open_store(cfg.store_uri)
    # ---- data: rank 0 fills the local cache first; the others then reuse it
    if rank != 0:
        barrier()
    train_ds = TokenDataset.open(cfg.tokens_uri, "train", cache_dir=cfg.cache_dir)
    val_ds = TokenDataset.open(cfg.tokens_uri, "val", cache_dir=cfg.cache_dir)
    if rank == 0:
        barrier()
    pcfg = pcfg.with_vocab_size(int(train_ds.meta["vocab_size"]))
    bos_id = int(train_ds.meta["bos_id"])

    # ---- model (same init on every rank: same seed), wrapping, loader
    torch.manual_seed(pcfg.seed)
    model = MoETransformer(pcfg.build_model_config()).to(device)
    if pcfg.param_dtype == "bf16":
        model = model.to(torch.bfloat16)  # the router keeps its bias buffer fp32 (Router._apply)
    fp8_modules = prepare_model(model, pcfg)  # AC policy + FP8 groups on the bare model: FSDP wraps the result
    if rank == 0 and (fp8_modules or pcfg.activation_checkpointing != "none" or pcfg.cuda_graph):
        log.info("speed options: activation_checkpointing=%s, fp8=%s (%d modules, grads %s), cuda_graph=%s",
                 pcfg.activation_checkpointing, pcfg.fp8, len(fp8_modules), pcfg.fp8_grad_dtype, pcfg.cuda_graph)
    dp, ep, pp = pcfg.mesh_shape(world_size)
    mesh = None
    if pp > 1:  # pipeline stages on a (dp, pp) mesh; the data is split over the dp replicas only
        from .pipeline_parallel import build_mesh

        mesh = build_mesh(device.type, dp, pp)
        data_rank, data_world = mesh["dp"].get_local_rank(), dp
        wrapped = None
    else:
        data_rank, data_world = rank, world_size
        wrapped = wrap_model(model, pcfg.parallelism, pcfg.dtype, world_size, device, cfg.find_unused_parameters,
                             expert_parallel=ep)
    loader = PackedLoader(train_ds, seq_len=pcfg.seq_len, batch_size=pcfg.micro_batch_size, seed=pcfg.seed,
                          rank=data_rank, world_size=data_world, bos_id=bos_id)
    num_val = max(data_world, pcfg.val_batches - pcfg.val_batches % data_world)  # equal per rank (FSDP)
    val_size = pcfg.val_batch_size or pcfg.micro_batch_size
    val_cache: list = []

    def val_batches():
        if not val_cache:
            val_cache.extend(eval_batches(val_ds, seq_len=pcfg.seq_len, batch_size=val_size,
                                          num_batches=num_val, rank=data_rank, world_size=data_world, bos_id=bos_id))
        return val_cache

    manager = CheckpointManager(store, cfg.output_prefix, keep_last=pcfg.keep_checkpoints,
                                catalog=_catalog() if (cfg.record_catalog and rank == 0) else None,
                                model_name=cfg.model_name, config=pcfg.to_dict())
    recorder = ExpertLoadRecorder()
    train_log = TrainLog(store, cfg.output_prefix)
    bytes_per_token = val_ds.meta.get("bytes_per_token") or pcfg.bytes_per_token

    with (rank0_tracker(cfg, tracker) if rank == 0 else contextlib.nullcontext(None)) as tracker0:
        if mesh is not None:
            from .pipeline_parallel import PipelineTrainer

            trainer = PipelineTrainer(pcfg, model, loader, mesh=mesh, device=device, schedule=pcfg.pipeline_schedule,
                                      val_batches=val_batches, logger=tracker0, bytes_per_token=bytes_per_token,
                                      bos_id=bos_id)
        else:
            trainer = Trainer(pcfg, model, loader, wrapped=wrapped, val_batches=val_batches, device=device,
                              logger=tracker0, bytes_per_token=bytes_per_token, bos_id=bos_id)
        # ---- resume from the newest intact checkpoint; its history and expert-load log from the train log
        latest, local = resume_from_latest(manager, trainer, loader, ctx)
        log_from = 0  # the train-log segment written at the next checkpoint starts after this step
        if local is not None:
            t_state = torch.load(local / train_state.TRAINER_FILE, map_location="cpu", weights_only=False)
            trainer.history, recorder, inside = checkpoint_log(local, t_state, train_log, trainer.step)
            log_from = 0 if inside else trainer.step  # an older-format checkpoint: its first segment covers all
        elif rank == 0 and tracker0 is not None:
            tracker0.log_params({"pretrain": pcfg.to_dict(), "tokens_uri": cfg.tokens_uri,
                                 "world_size": world_size, "output_prefix": cfg.output_prefix})

        state = {"checkpoint": latest, "log_from": log_from}

        def on_step(tr: Trainer, step: int, metrics: dict) -> None:
            if "loss" in metrics:  # a log step: close the expert-load window
                if rank == 0:
                    log.info("%s", progress_line(step, pcfg.max_steps, metrics))
                if rank == 0 and tr.logged_interval_counts_LE.numel():
                    bias = tr.logged_bias_LE  # all routers' biases (a pipeline rank holds only its own)
                    recorder.record(step, tr.logged_interval_counts_LE.numpy(),
                                    None if bias is None else bias.numpy())
                    if tracker0 is not None:
                        tracker0.log_metrics(expert_metrics(tr.logged_interval_counts_LE.numpy()), step=step)
                if ctx.ray_ctx is not None:
                    import ray.train

                    ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            if (pcfg.checkpoint_every and step % pcfg.checkpoint_every == 0) or step == pcfg.max_steps:
                tr.meter.pause()  # checkpoint time is not training throughput
                if rank == 0:  # the segment first: every committed checkpoint has its log chain
                    train_log.append(step, state["log_from"], tr.history, recorder)
                state["log_from"] = step
                state["checkpoint"] = save_checkpoint(tr, loader, manager, ctx, include_history=False)
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
            expert_uri = write_expert_load(store, cfg.output_prefix, recorder, trainer.step)
            last = trainer.history[-1] if trainer.history else {}
            result.update({"checkpoint_uri": state["checkpoint"].uri, "expert_load_uri": expert_uri,
                           "metrics": last, "seconds": time.time() - started})
            if manager.skipped_corrupted:  # said in the log at resume, and here in the run's result
                result["skipped_corrupted_checkpoints"] = list(manager.skipped_corrupted)
        barrier()
        return result


def progress_line(step: int, max_steps: int, metrics: dict) -> str:
    """``step 10/300 loss 5.123 lr 3.00e-03 12,345 tok/s [val_loss 5.0]``: what the terminal and the
    Prefect run's logs show on each log step."""
    parts = [f"step {step}/{max_steps}", f"loss {metrics['loss']:.4f}"]
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    if "val_loss" in metrics:
        parts.append(f"val_loss {metrics['val_loss']:.4f}")
    return " ".join(parts)


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


def write_expert_load(store, output_prefix: str, recorder: ExpertLoadRecorder, step: int) -> str | None:
    if not len(recorder):
        return None
    prefix = A.expert_load_key(output_prefix)
    arrays = recorder.arrays()
    with store.write_artifact(prefix, metadata={"kind": "expert-load", "step": step,
                                                "shape": list(arrays["counts"].shape)}, overwrite=True) as w:
        w.put_bytes(NPZ_NAME, recorder.to_npz_bytes())
    return store.uri(prefix)


def _catalog():
    from moeflow.platform.catalog import Catalog

    return Catalog.from_settings()
