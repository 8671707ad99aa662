"""The post-training engine core: every offline post-training stage (sft, reward, align, distill) runs here.

A stage is a *builder* — ``build(job, base_model, tokenizer, ctx) -> StageParts`` named by a
``"module:function"`` string, so Ray workers can import it — plus its config (a ``PostTrainConfig``
subclass). The core does the rest, the same way for every stage and on the same launch path as
pretraining (``platform/train``: ``worker_context``, ``wrap_model``, ``CheckpointManager``,
``resume_from_latest``/``save_checkpoint``, ``launch_ray``):

1. start from a registered model version: ``platform/model_refs.resolve`` turns every reference form
   (catalog id, ``name@alias``, ``name/version``, a store URI of an export or a checkpoint) into the
   export's URI and catalog id; the default is the newest version of the previous stage's model name;
2. every rank downloads the HF export, imports it (``models.hf.import_hf``) with its tokenizer and
   calls the builder, which returns the module to train, its micro-batch loader and optionally an
   ``Objective`` (default: the token-weighted LM loss of ``Trainer`` on dict batches, what SFT uses);
3. ``PostTrainer`` (a ``Trainer``) runs the steps: gradient accumulation, clipping, AdamW + schedule,
   the router-bias update from the global expert counts and the balancing losses — both switchable
   per stage (``router_bias_update``, ``seq_aux_alpha`` ...); expert load and MaxVio are logged like
   pretraining's, and a warning names the experts that received no token in a whole log interval;
4. checkpoints every ``checkpoint_every`` steps and at the end; a re-run (kill -9, Ray restart, a
   Prefect retry) resumes from the newest committed one exactly like pretraining, because the
   builder rebuilds the same module (same LoRA layout, same seeds) before the state is restored;
5. headline figures: the builder's ``evaluate(model)`` runs on rank 0 before the first step
   ("before") and after the last ("after"); both travel inside the checkpoints (``headline.json``);
6. on the driver: the final checkpoint is exported in HF format (``export_model`` merges LoRA, or
   takes a reward model's LM) with the input export's tokenizer files, ``extra_export_files`` adds
   what a stage needs (a PEFT adapter folder, a reward head), and the catalog records a new model
   version whose parent is the input version.

Ray Train runs it when ``num_workers > 1``; otherwise it runs in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Protocol

import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from torch import nn

from moeflow.models.config import strict_from_dict
from moeflow.models.train import state as train_state
from moeflow.models.train.loop import Trainer, _distributed, _unwrap, router_biases
from moeflow.models.train.schedules import SCHEDULES
from moeflow.platform import model_refs
from moeflow.platform.config import StageConfig, config_hash
from moeflow.platform.train.checkpoint import CheckpointManager
from moeflow.platform.train.distributed import WorkerContext, barrier, open_store, worker_context, wrap_model
from moeflow.platform.train.expert_load import NPZ_NAME, ExpertLoadRecorder, expert_metrics
from moeflow.platform.train.worker import _maybe_die, rank0_tracker, resume_from_latest, save_checkpoint, write_expert_load

log = logging.getLogger(__name__)

HF_DIR = model_refs.HF_DIR
HEADLINE_FILE = "headline.json"
INPUT_MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
Schedule = Literal[SCHEDULES]  # type: ignore[valid-type]


# ------------------------------------------------------------------ config
class PostTrainConfig(StageConfig):
    """What every post-training stage's loop reads (the ``LoopConfig`` protocol) + per-stage MoE balancing.

    Stage configs subclass it and add their own fields (``SFTConfig(PostTrainConfig)``).
    """

    max_steps: int = Field(100, ge=1, le=10_000_000, description="optimiser steps")
    lr: float = Field(1e-3, gt=0, le=1.0, description="peak learning rate")
    micro_batch_size: int = Field(8, ge=1, le=65_536, description="rows (or pairs) per micro-batch per rank")
    grad_accum_steps: int = Field(1, ge=1, le=4096, description="micro-batches per optimiser step")
    seq_len: int = Field(256, ge=8, le=1_048_576, description="tokens per packed row")
    schedule: Schedule = Field("cosine", description="learning-rate schedule")
    warmup_steps: int = Field(5, ge=0, le=10_000_000, description="linear warm-up steps (at most max_steps)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of lr")
    decay_fraction: float = Field(0.2, ge=0, le=1, description="wsd only: fraction of steps spent decaying")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2)")
    eps: float = Field(1e-8, gt=0, le=1, description="AdamW epsilon")
    decay_embeddings: bool = Field(True, description="apply weight decay to the embeddings too")
    grad_clip: float = Field(1.0, le=1e6, description="global gradient-norm clip; <= 0 disables clipping")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the data order and of new parameters")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="autocast: auto = bf16 on CUDA, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile each decoder block")
    parallelism: Literal["ddp", "fsdp"] = Field("ddp", description="data parallelism with several workers")
    log_every: int = Field(10, ge=1, le=1_000_000, description="steps between logged metrics (and expert-load windows)")
    val_every: int = Field(0, ge=0, le=10_000_000, description="steps between held-out evaluations (0: before and after only)")
    checkpoint_every: int = Field(50, ge=0, le=10_000_000, description="steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="newest checkpoints kept in the store")
    bytes_per_token: Optional[float] = Field(None, gt=0, description="unused by post-training (bits per byte)")
    peak_flops: float = Field(798e12, gt=0, description="MFU denominator: peak FLOP/s of one accelerator")
    # MoE balancing, per stage (None keeps the input model's setting)
    router_bias_update: Optional[bool] = Field(None, description="keep the aux-loss-free router-bias update running "
                                                                 "(None: the stage's default, on except for LoRA)")
    bias_update_gamma: Optional[float] = Field(None, ge=0, le=1, description="router-bias step size (None: the model's)")
    seq_aux_alpha: Optional[float] = Field(None, ge=0, le=1, description="sequence-wise balance loss weight (None: the model's)")
    z_loss_weight: Optional[float] = Field(None, ge=0, le=1, description="router z-loss weight (None: the model's)")
    lb_loss_weight: Optional[float] = Field(None, ge=0, le=1, description="load-balancing loss weight (None: the model's)")

    @model_validator(mode="after")
    def _check_loop(self):
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be <= max_steps={self.max_steps}")
        return self

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.seq_len * self.micro_batch_size * self.grad_accum_steps * world_size

    def bias_update_enabled(self) -> bool:
        """Whether the router biases keep updating (a stage may change the default of None)."""
        return True if self.router_bias_update is None else self.router_bias_update

    def balancing_overrides(self) -> dict[str, float]:
        """ModelConfig fields this stage changes (``router_bias_update`` is the trainer's switch, not a field)."""
        return {k: getattr(self, k) for k in ("bias_update_gamma", "seq_aux_alpha", "z_loss_weight", "lb_loss_weight")
                if getattr(self, k) is not None}


def apply_balancing(model: nn.Module, overrides: dict[str, float]) -> None:
    """Set balancing fields on the model's config and on every MoE layer that holds one."""
    if not overrides:
        return
    for module in model.modules():
        cfg = getattr(module, "cfg", None)
        if cfg is not None and hasattr(cfg, "bias_update_gamma"):
            module.cfg = cfg.replace(**overrides)


# ------------------------------------------------------------------ what a stage provides
@dataclass
class ObjectiveOutput:
    loss: torch.Tensor                              # attached mean over this micro-batch's units
    aux: dict = field(default_factory=dict)          # "tokens_per_expert" (L, E), "balance_loss" (attached), ...
    metrics: dict = field(default_factory=dict)      # name -> float / 0-d tensor, means over the micro-batch


class Objective(Protocol):
    """A stage's loss on one micro-batch (reward, DPO, distillation). None means the LM loss on targets."""

    def count(self, batch: dict) -> torch.Tensor: ...          # units the loss averages over (pairs, tokens)

    def __call__(self, model: nn.Module, batch: dict) -> ObjectiveOutput: ...


@dataclass
class StageParts:
    """What a builder returns. On the driver (``ctx is None``) only ``model`` (+ the export hooks) is needed."""

    model: nn.Module                                   # the module that trains (requires_grad decides what)
    config: PostTrainConfig                            # the stage config, parsed
    loader: Any = None                                 # micro-batch dicts; state_dict()/load_state_dict()
    objective: Objective | None = None
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # held-out headline figures (rank 0)
    export_model: Callable[[nn.Module], nn.Module] | None = None     # -> the MoETransformer to export
    extra_export_files: Callable[[nn.Module, Path], None] | None = None


@dataclass
class PostTrainJob:
    """Everything a worker needs; JSON-serialisable (it crosses to Ray workers)."""

    stage: str                       # "sft", "reward", ...
    builder: str                     # "module:function"
    config: dict                     # the stage config, model_dump(mode="json")
    model_uri: str                   # HF export artefact of the input model version
    output_prefix: str
    data_uris: dict = field(default_factory=dict)  # e.g. {"train": ..., "heldout": ...}
    parent_model_id: str | None = None
    model_name: str = "moe-sft"
    run_name: str = "posttrain"
    store_uri: str | None = None
    tracking: str = "auto"           # as LaunchConfig: "auto" | "noop" | "mlflow"
    tracking_uri: str | None = None
    experiment: str | None = None
    parent_run_id: str | None = None
    device: str = "auto"
    find_unused_parameters: bool = False
    fault_step: int | None = None    # tests: rank fault_rank SIGKILLs itself after this step, once
    fault_rank: int = 0
    fault_marker: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "PostTrainJob":
        return strict_from_dict(cls, d, required=("stage", "builder", "config", "model_uri", "output_prefix"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PostTrainResult:
    checkpoint_uri: str
    hf_uri: str | None
    expert_load_uri: str | None
    model_id: str | None
    steps: int
    metrics: dict = field(default_factory=dict)      # final train metrics (loss, tokens_per_s, ...)
    headline: dict = field(default_factory=dict)     # {"before": {...}, "after": {...}}
    parent_model_id: str | None = None


@dataclass
class StageResult:
    """What every post-training stage's ``run_<stage>`` returns (each stage names its own subclass)."""

    checkpoint_uri: str
    hf_uri: str | None
    expert_load_uri: str | None
    model_id: str | None
    parent_model_id: str | None
    steps: int
    metrics: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)

    @classmethod
    def from_posttrain(cls, result: "PostTrainResult", **extra):
        return cls(result.checkpoint_uri, result.hf_uri, result.expert_load_uri, result.model_id,
                   result.parent_model_id, result.steps, result.metrics, result.headline.get("before", {}),
                   result.headline.get("after", {}), **extra)


def load_builder(spec: str) -> Callable[..., StageParts]:
    from moeflow.platform.stages import load_entrypoint  # imports by name happen in the registry only

    return load_entrypoint(spec)


# ------------------------------------------------------------------ the trainer
def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class PostTrainer(Trainer):
    """``Trainer`` with a pluggable objective (dict batches passed through) and dead-expert detection.

    With ``objective=None`` it is exactly the token-weighted LM step of pretraining on dict batches
    (``input_ids``/``targets``/``document_ids``). With an objective, micro-batch m contributes
    ``W · loss_m · n_m / N`` (n_m = ``objective.count``, N its global sum, all-reduced once per step)
    plus its balancing loss ÷ k, so pairs are weighted like tokens are.
    """

    def __init__(self, cfg, model, train_batches, *, objective: Objective | None = None, **kw) -> None:
        super().__init__(cfg, model, train_batches, **kw)
        self.objective = objective
        # off: the biases stay as the input model had them (routing still uses them); gamma = 0 would not
        # do, the update also re-centres the biases
        self.update_router_bias = cfg.bias_update_enabled() if hasattr(cfg, "bias_update_enabled") else True

    def _split(self, batch):
        if self.objective is None:
            return super()._split(batch)
        return _to_device(batch, self.device)

    def accumulate_gradients(self, micro_batches):
        if self.objective is None:
            return super().accumulate_gradients(micro_batches)
        k = len(micro_batches)
        counts = torch.stack([torch.as_tensor(self.objective.count(b), dtype=torch.float64).reshape(())
                              for b in micro_batches]).to(self.device)
        global_count = counts.sum()
        if _distributed():
            dist.all_reduce(global_count, op=dist.ReduceOp.SUM)
        # only what this objective measures: an LM-loss column of zeros would read as a perfect LM
        parts = {"loss": torch.zeros((), device=self.device)}
        counts_LE = entropy_L = None
        for micro, batch in enumerate(micro_batches):
            last = micro == k - 1
            self._set_fsdp_sync(last)
            share = float(counts[micro] / global_count.clamp_min(1)) * self.world_size
            with self._sync_context(last):
                with self._autocast():
                    out = self.objective(self.forward_module, batch)
                    loss = out.loss * share
                    balance = out.aux.get("balance_loss")
                    if balance is not None:
                        loss = loss + balance / k
                loss.backward()
            parts["loss"] += loss.detach().float()
            if balance is not None:
                parts["balance_loss"] = parts.get("balance_loss", 0) + balance.detach().float() / k
            for name, value in out.metrics.items():
                value = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach()
                parts[name] = parts.get(name, torch.zeros((), device=self.device)) + value * share
            tpe = out.aux.get("tokens_per_expert")
            if tpe is not None and tpe.numel():
                counts_LE = tpe.detach().double() if counts_LE is None else counts_LE + tpe.detach().double()
            ent = out.aux.get("router_entropy")
            if ent is not None and torch.is_tensor(ent) and ent.numel():
                ent = ent.detach().float().reshape(-1)
                entropy_L = ent if entropy_L is None else entropy_L + ent
        self._set_fsdp_sync(True)
        return parts, counts_LE, entropy_L


def dead_experts(counts_LE) -> list[tuple[int, int]]:
    """(router row, expert) pairs that received no token in the window."""
    counts = torch.as_tensor(counts_LE)
    return [(int(l), int(e)) for l, e in (counts == 0).nonzero().tolist()] if counts.numel() else []


# ------------------------------------------------------------------ the per-worker function
def _unwrapped_lm(model: nn.Module) -> nn.Module:
    """The MoETransformer inside ``model`` (a reward model keeps it as ``.lm``)."""
    return model if hasattr(model, "routers") and hasattr(model, "lm_head") else getattr(model, "lm", model)


def _input_model(store, model_uri: str, local_dir: Path):
    """(MoETransformer, Tokenizer, local export dir) of the input version: its HF export (a checkpoint's
    run export) with the export's own tokenizer; ``model_refs`` resolves and loads it."""
    loaded = model_refs.load(model_refs.resolve(model_uri, store=store), require_hf=True, store=store,
                             cache_dir=local_dir)
    return loaded.model, loaded.tokenizer, loaded.local_dir


def posttrain_worker(config: dict, tracker=None) -> dict:
    """Train (or resume) one post-training run on this rank; see the module docstring."""
    job = PostTrainJob.from_dict(config)
    with worker_context(job.device) as ctx:
        return _train(job, ctx, tracker)


def _train(job: PostTrainJob, ctx: WorkerContext, tracker) -> dict:
    store = open_store(job.store_uri)
    base, tokenizer, _ = _input_model(store, job.model_uri, ctx.tmp / "input")
    torch.manual_seed(int(job.config.get("seed", 0)))
    parts = load_builder(job.builder)(job, base, tokenizer, ctx)
    cfg = parts.config
    model = parts.model.to(ctx.device)
    apply_balancing(model, cfg.balancing_overrides())
    wrapped = wrap_model(model, cfg.parallelism, cfg.dtype, ctx.world_size, ctx.device, job.find_unused_parameters)
    manager = CheckpointManager(store, job.output_prefix, keep_last=cfg.keep_checkpoints, model_name=job.model_name,
                                config=job.config)
    recorder = ExpertLoadRecorder()
    headline: dict[str, dict] = {}

    with (rank0_tracker(job, tracker, stage=job.stage) if ctx.rank == 0 else contextlib.nullcontext(None)) as tracker0:
        trainer = PostTrainer(cfg, model, parts.loader, wrapped=wrapped, device=ctx.device, logger=tracker0,
                              objective=parts.objective)
        latest, local = resume_from_latest(manager, trainer, parts.loader, ctx)
        if local is not None:
            if (local / NPZ_NAME).is_file():
                recorder = ExpertLoadRecorder.from_npz_bytes((local / NPZ_NAME).read_bytes())
                recorder.truncate(trainer.step)
            if (local / HEADLINE_FILE).is_file():
                headline = json.loads((local / HEADLINE_FILE).read_text())
        elif ctx.rank == 0:
            if tracker0 is not None:
                tracker0.log_params({job.stage: job.config, "model_uri": job.model_uri, "data_uris": job.data_uris,
                                     "world_size": ctx.world_size, "output_prefix": job.output_prefix})
            if parts.evaluate is not None:
                headline["before"] = parts.evaluate(_unwrap(wrapped))
                _log(tracker0, {f"before/{k}": v for k, v in headline["before"].items()}, 0)
        barrier()

        def write_headline(path: Path) -> None:
            path.write_text(json.dumps(headline, indent=2, sort_keys=True))

        state = {"checkpoint": latest}

        def on_step(tr: Trainer, step: int, metrics: dict) -> None:
            if "loss" in metrics:  # a log step: close the expert-load window
                window = tr.logged_interval_counts_LE
                if ctx.rank == 0 and window.numel():
                    bias = router_biases(_unwrapped_lm(tr.model))
                    recorder.record(step, window.numpy(), None if bias is None else bias.cpu().numpy())
                    dead = dead_experts(window)
                    if dead:
                        log.warning("%s step %d: %d expert(s) received no tokens in the last %d steps: %s",
                                    job.stage, step, len(dead), tr.cfg.log_every,
                                    ", ".join(f"router {l} expert {e}" for l, e in dead[:16]))
                    _log(tracker0, {**expert_metrics(window.numpy()), "experts/dead_in_interval": float(len(dead))},
                         step)
                if ctx.ray_ctx is not None:
                    import ray.train

                    ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            evaluate_now = parts.evaluate is not None and (
                step == cfg.max_steps or (cfg.val_every and step % cfg.val_every == 0))
            if evaluate_now:
                tr.meter.pause()
                if ctx.rank == 0:
                    figures = parts.evaluate(_unwrap(tr.wrapped))
                    _log(tracker0, {f"heldout/{k}": v for k, v in figures.items()}, step)
                    if step == cfg.max_steps:
                        headline["after"] = figures
                barrier()
                tr.meter.resume()
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
                tr.meter.pause()
                state["checkpoint"] = save_checkpoint(tr, parts.loader, manager, ctx,
                                                      {NPZ_NAME: recorder.save, HEADLINE_FILE: write_headline})
                tr.meter.resume()
            if job.fault_step is not None and step == job.fault_step and ctx.rank == job.fault_rank:
                _maybe_die(job.fault_marker)

        trainer.callbacks.append(on_step)
        started = time.time()
        if trainer.step < cfg.max_steps:
            trainer.fit()
        elif state["checkpoint"] is None:
            raise RuntimeError("nothing to do and no checkpoint: max_steps reached without a checkpoint")
        result: dict[str, Any] = {"rank": ctx.rank, "steps": trainer.step}
        if ctx.rank == 0:
            expert_uri = write_expert_load(store, job.output_prefix, recorder, trainer.step)
            result.update({"checkpoint_uri": state["checkpoint"].uri, "expert_load_uri": expert_uri,
                           "metrics": trainer.history[-1] if trainer.history else {},
                           "seconds": time.time() - started, "headline": headline})
        barrier()
        return result


def _log(tracker, metrics: dict, step: int) -> None:
    if tracker is not None and metrics:
        tracker.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


# ------------------------------------------------------------------ the driver
def run_posttrain(job: PostTrainJob, store, *, tracker=None, catalog=None, num_workers: int = 1,
                  use_gpu: bool = False, use_ray: bool | None = None, max_failures: int | None = None) -> PostTrainResult:
    """Train (resuming if checkpoints exist), export HF, register the new version (parent = the input)."""
    job = dataclasses.replace(job, store_uri=job.store_uri or store.root_uri,
                              device="cuda" if use_gpu else "cpu")
    use_ray = num_workers > 1 if use_ray is None else use_ray
    if use_ray:
        from moeflow.platform.tracking import MLflowTracker
        from moeflow.platform.train.ray_launch import launch_ray

        if isinstance(tracker, MLflowTracker):
            job.tracking, job.tracking_uri, job.experiment = "mlflow", tracker.tracking_uri, tracker.experiment
            job.parent_run_id = tracker.active_run_id
        else:
            job.tracking = "noop"
        launch_ray(job.to_dict(), num_workers, use_gpu, max_failures=max_failures, worker=posttrain_worker)
    else:
        from moeflow.platform.tracking import NoopTracker

        posttrain_worker(job.to_dict(), tracker=tracker if tracker is not None else NoopTracker())
    return finalize_posttrain(job, store, tracker=tracker, catalog=catalog, replay_history=use_ray)


def finalize_posttrain(job: PostTrainJob, store, *, tracker=None, catalog=None,
                       replay_history: bool = False) -> PostTrainResult:
    """On the driver: export the final checkpoint (HF + stage files), register it, log the headline figures."""
    with tempfile.TemporaryDirectory(prefix=f"moeflow-{job.stage}-final-") as tmp:
        tmp = Path(tmp)
        base, tokenizer, input_dir = _input_model(store, job.model_uri, tmp / "input")
        parts = load_builder(job.builder)(job, base, tokenizer, None)
        cfg = parts.config
        manager = CheckpointManager(store, job.output_prefix, keep_last=cfg.keep_checkpoints)
        ref = manager.latest()
        if ref is None or ref.step < cfg.max_steps:
            raise RuntimeError(f"{job.stage} did not finish: latest checkpoint under {manager.prefix} is "
                               f"{'none' if ref is None else ref.step} of {cfg.max_steps} steps")
        local = manager.download(ref, tmp / "ckpt")
        parts.model.load_state_dict(train_state.load_model_weights(local))
        t_state = torch.load(local / train_state.TRAINER_FILE, map_location="cpu", weights_only=False)
        history = t_state["loop"]["history"]
        headline = json.loads((local / HEADLINE_FILE).read_text()) if (local / HEADLINE_FILE).is_file() else {}
        metrics = _final_metrics(history)
        hf_uri = export_stage_model(parts, store, job, tmp / "hf", input_dir, ref, {**metrics, "headline": headline})
    expert_prefix = f"{job.output_prefix.strip('/')}/expert_load"
    expert_uri = store.uri(expert_prefix) if store.artifact_exists(expert_prefix) else None
    flat = {**metrics, **{f"{when}/{k}": v for when, figs in headline.items() for k, v in figs.items()}}
    model_id = None
    if catalog is not None:
        model_id = catalog.register_model(job.model_name, hf_uri or ref.uri, config_hash(job.config),
                                          parent_model_id=job.parent_model_id, metrics={**flat, "step": ref.step})
    if tracker is not None:
        with (tracker.start_run(job.run_name) if tracker.active_run_id is None else contextlib.nullcontext()):
            if replay_history:  # Ray workers logged elsewhere: replay the curves into the caller's run
                for row in history:
                    tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
            tracker.log_metrics({f"final/{k}": v for k, v in flat.items()}, step=ref.step)
            tracker.set_tags({"moeflow.checkpoint_uri": ref.uri, "moeflow.hf_uri": hf_uri or "",
                              "moeflow.parent_model_id": job.parent_model_id or "",
                              "moeflow.expert_load_uri": expert_uri or ""})
    return PostTrainResult(ref.uri, hf_uri, expert_uri, model_id, ref.step, metrics, headline, job.parent_model_id)


def _final_metrics(history: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    if history:
        last = history[-1]
        for key in ("loss", "lm_loss", "grad_norm", "tokens_seen"):
            if key in last:
                out[f"train_{key}" if not key.startswith("train") else key] = float(last[key])
        rates = [row["tokens_per_s"] for row in history if "tokens_per_s" in row]
        if rates:
            out["tokens_per_s"] = float(sum(rates) / len(rates))
    return out


def export_stage_model(parts: StageParts, store, job: PostTrainJob, local_dir: Path, input_dir: Path, ref,
                       metrics: dict) -> str | None:
    """``<output_prefix>/hf``: the exported model, the input export's tokenizer files and the stage's extra files."""
    from moeflow.models import hf

    model = parts.export_model(parts.model) if parts.export_model is not None else _unwrapped_lm(parts.model)
    gen = json.loads((input_dir / "generation_config.json").read_text()) if (input_dir / "generation_config.json").is_file() else {}
    try:
        hf.export_hf(model, local_dir, bos_token_id=gen.get("bos_token_id"), eos_token_id=gen.get("eos_token_id"),
                     pad_token_id=gen.get("pad_token_id"))
    except ValueError as err:  # HFConversionError: a config without an HF form
        log.warning("HF export skipped: %s", err)
        return None
    for name in INPUT_MODEL_FILES:
        if (input_dir / name).is_file():
            shutil.copy(input_dir / name, local_dir / name)
    if parts.extra_export_files is not None:
        parts.extra_export_files(parts.model, local_dir)
    prefix = f"{job.output_prefix.strip('/')}/{HF_DIR}"
    with store.write_artifact(prefix, metadata={"kind": "hf-model", "format": "DeepseekV3ForCausalLM",
                                                "stage": job.stage, "checkpoint_uri": ref.uri, "step": ref.step,
                                                "parent_model_uri": job.model_uri, "metrics": metrics},
                              overwrite=True) as w:
        for path in sorted(local_dir.rglob("*")):
            if path.is_file():
                w.put_file(path.relative_to(local_dir).as_posix(), path)
    return store.uri(prefix)


# ------------------------------------------------------------------ command line (plain process or torchrun)
def main(argv: list[str] | None = None) -> None:
    """``python -m moeflow.platform.posttrain.engine --job job.json [--finalize]`` (also under torchrun)."""
    import argparse

    parser = argparse.ArgumentParser(description="moeflow post-training worker")
    parser.add_argument("--job", required=True, help="PostTrainJob as JSON")
    parser.add_argument("--finalize", action="store_true", help="rank 0: HF export + registration afterwards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = json.loads(Path(args.job).read_text())
    result = posttrain_worker(config)
    if result.get("rank", 0) == 0:
        if args.finalize:
            job = PostTrainJob.from_dict(config)
            result["final"] = dataclasses.asdict(finalize_posttrain(job, open_store(job.store_uri)))
        print(json.dumps(result, default=str, indent=2))


if __name__ == "__main__":
    main()
