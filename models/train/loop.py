"""The pretraining loop: micro-batches, loss assembly, router-bias hook, validation.

``Trainer`` reads its config through the ``LoopConfig`` protocol (the pydantic ``PretrainConfig``
sits beside its engine in ``moeflow.platform.train.config``). ``Trainer`` runs one
optimiser step at a time on an already-built (and, if distributed, already-wrapped) model; the
platform layer (``moeflow.platform.train``) owns data loading from the store, checkpoints,
tracking and the Ray/torchrun launch, and plugs in through callbacks and the ``Logger``
protocol. Nothing here imports Ray, MLflow or the object store.

One optimiser step (``Trainer.train_step``):

1. ``grad_accum_steps`` micro-batches: forward under bf16 autocast on CUDA (fp32 on CPU) and
   backward of that micro-batch's share of the objective ``assemble_loss`` spells out
   (lm + λ·mtp + seq_aux + z + lb), whose parts are logged separately (see "Token weighting").
   DDP gradient sync only on the last micro-batch (``no_sync``); FSDP2 likewise
   (``set_requires_gradient_sync``).
2. Router tokens-per-expert counts summed over the micro-batches, then all-reduced (SUM) over
   data-parallel ranks: the GLOBAL batch's counts.
3. Gradient clipping (global norm), LR from the pure schedule, ``optimizer.step()``. With the Triton AdamW
   (``adamw_impl="triton"``) on its kernel path the clip coefficient is passed to the step (``grad_scale``)
   instead of multiplying every gradient in a pass of its own.
4. ``model.apply_router_bias_update(global_counts)`` — once per optimiser step, after the
   step (the bias is a buffer, no gradient), identical on every rank because the counts are.

Token weighting: the LM loss (and each MTP depth's) is the sum of per-token losses over the valid
targets (!= -100) of the WHOLE global batch ÷ the global count of valid targets — not a mean of
micro-batch means, which over-weights the tokens of sparsely masked micro-batches (SFT masks all
but the assistant tokens; MTP drops boundary targets). The counts of every micro-batch are known
before the first forward (the targets are), so they are all-reduced once per step, and micro-batch
m backpropagates ``W · mean_m · n_m / N`` (W ranks: DDP/FSDP average gradients over ranks). The
balancing losses stay per-micro-batch means averaged over micro-batches and ranks. For packed
pretraining rows without masks every n_m is N/(k·W) and this is exactly the old ``loss / k``.
Loss parts are reduced across ranks only on log steps (one small all-reduce), so non-log steps
never synchronise the host.

Speed options (config fields read with ``getattr``, so configs without them train as before):
``activation_checkpointing`` ("none" / "selective" / "full"), ``fp8`` (layer groups, see
``models/fp8.py``) and ``fp8_grad_dtype`` are applied to the bare model by ``prepare_model`` —
the worker calls it before wrapping the model for DDP/FSDP (FSDP must see the final modules), the
Trainer again (a no-op then). ``cuda_graph`` replays the device part of ``train_step`` (forward,
backward, clipping, AdamW, router-bias update) as one CUDA graph (``kernels/graph_step.py``) after
3 eager steps; the optimiser then runs capturable with a device-tensor learning rate, written
before each replay. One CUDA rank only; on CPU it is ignored with a log line. ``adamw_impl`` ("torch" /
"triton") picks the optimiser's implementation (``optim.build_adamw``; the Triton one is capturable too).

A batch is a ``(B, T + 1)`` token tensor (inputs and next-token targets are its two shifts) or a
dict with ``input_ids`` (B, T), ``targets`` (B, T) (-100 = no loss) and optionally
``document_ids`` (B, T) for rows packed from several documents (block-diagonal attention). With
``document_masking`` on (the pretraining default) a token tensor's documents are found from its BOS
tokens, for training and validation alike.

Shape suffixes: B rows, T tokens per row, L MoE layers, E routed experts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..mtp import IGNORE_INDEX, mtp_targets
from .metrics import ThroughputMeter, mfu
from .optim import build_adamw, clip_coefficient, clip_grad_norm, set_lr
from .schedules import lr_at

LOSS_PARTS = ("lm_loss", "mtp_loss", "seq_aux_loss", "z_loss", "lb_loss")
GRAPH_WARMUP_STEPS = 3  # eager optimiser steps before the CUDA graph is captured (compile, autotuning)
log = logging.getLogger(__name__)


class Logger(Protocol):
    """What the loop needs from a tracker (``moeflow.platform.tracking.Tracker`` fits)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class NullLogger:
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


class LoopConfig(Protocol):
    """What the loop reads from its config. The config itself, with defaults, bounds and
    descriptions, is ``moeflow.platform.train.config.PretrainConfig`` (pydantic stays out of
    ``models/``); any object with these attributes fits, e.g. a post-training stage's config."""

    seq_len: int
    grad_accum_steps: int
    max_steps: int
    lr: float
    schedule: str
    warmup_steps: int
    min_lr_ratio: float
    decay_fraction: float
    weight_decay: float
    betas: tuple
    eps: float
    decay_embeddings: bool
    grad_clip: float
    dtype: str
    compile: bool
    parallelism: str
    log_every: int
    val_every: int
    bytes_per_token: float | None
    peak_flops: float
    # optional: document_masking (bool, default off when absent), see Trainer._documents;
    # activation_checkpointing, fp8, fp8_grad_dtype, cuda_graph, adamw_impl (speed options, see the module docstring)

    def tokens_per_step(self, world_size: int = 1) -> int: ...

    def to_dict(self) -> dict: ...


# ------------------------------------------------------------------ pure pieces
def assemble_loss(aux: dict[str, torch.Tensor], mtp_loss_weight: float) -> torch.Tensor:
    """lm + λ·mtp + seq_aux + z + lb — the training objective, from its logged parts.

    The model returns ``seq_aux_loss``, ``z_loss`` and ``lb_loss`` already multiplied by their
    coefficients (α, z weight, lb weight from ``ModelConfig``; 0 when off) and ``mtp_loss`` raw
    (mean over MTP depths), so only λ is applied here. The model's ``aux`` entries are detached
    copies, so the loop back-propagates ``out.loss`` (the same sum, attached); this function
    is the documented formula that the logged parts must add up to (tested against out.loss).
    """
    loss = aux["lm_loss"]
    if mtp_loss_weight:
        loss = loss + mtp_loss_weight * aux["mtp_loss"]
    for name in ("seq_aux_loss", "z_loss", "lb_loss"):
        if name in aux:
            loss = loss + aux[name]
    return loss


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Cross-entropy in bits per UTF-8 byte: nats/token ÷ ln 2 ÷ bytes/token."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token={bytes_per_token}: must be > 0")
    return loss_nats_per_token / math.log(2) / bytes_per_token


def global_maxvio(counts_LE: torch.Tensor) -> torch.Tensor:
    """(max − mean)/mean per layer, (L,)."""
    counts = counts_LE.double()
    mean = counts.mean(dim=-1)
    return (counts.amax(dim=-1) - mean) / mean.clamp_min(1e-12)


def router_biases(model: nn.Module) -> torch.Tensor | None:
    """The aux-loss-free balancing biases, (L, E), in layer order (None for a dense model)."""
    biases = [buf for name, buf in model.named_buffers() if name.endswith("e_score_correction_bias")]
    return torch.stack([b.detach().float() for b in biases]) if biases else None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _unwrap(module: nn.Module) -> nn.Module:
    module = getattr(module, "_orig_mod", module)  # torch.compile
    return getattr(module, "module", module)  # DDP


def prepare_model(model: nn.Module, cfg) -> list[str]:
    """Apply the config's activation checkpointing and FP8 groups to a bare MoETransformer in place
    (idempotent); returns the FP8 module names. Call before DDP/FSDP wrapping and compilation."""
    if not (hasattr(model, "model") and hasattr(model.model, "layers")):
        return []  # not an MoETransformer (e.g. a reward head's wrapper): nothing to apply
    policy = getattr(cfg, "activation_checkpointing", "none") or "none"
    from ..transformer import set_activation_checkpointing

    set_activation_checkpointing(model, policy)
    groups = list(getattr(cfg, "fp8", None) or [])
    if not groups:
        return []
    from .. import fp8

    grad_dtype = {"e4m3": fp8.E4M3, "e5m2": fp8.E5M2}[getattr(cfg, "fp8_grad_dtype", "e4m3")]
    return fp8.enable_fp8(model, groups, grad_dtype=grad_dtype)


# ------------------------------------------------------------------ the trainer
StepCallback = Callable[["Trainer", int, dict], None]


class Trainer:
    """Owns the optimiser, schedule position and balancing statistics of one rank.

    ``model`` is the bare ``MoETransformer`` (its buffers and ``apply_router_bias_update``);
    ``wrapped`` the module to call forward on (DDP / FSDP2-sharded / compiled; default model).
    ``train_batches`` yields ``(B, T + 1)`` token tensors; ``val_batches`` returns this rank's
    fixed validation batches when called.
    """

    def __init__(self, cfg: LoopConfig, model: nn.Module, train_batches: Iterator[torch.Tensor], *,
                 wrapped: nn.Module | None = None, val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
                 device: torch.device | str = "cpu", logger: Logger | None = None,
                 bytes_per_token: float | None = None, callbacks: list[StepCallback] | None = None,
                 bos_id: int | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.wrapped = wrapped if wrapped is not None else model
        self.forward_module = self.wrapped
        prepare_model(model, cfg)  # before compiling: the policy and the FP8 modules are traced
        if cfg.compile:
            if hasattr(model, "model") and hasattr(model.model, "layers"):
                from ..transformer import compile_blocks

                compile_blocks(model)  # per-block, in place: DDP/FSDP wrappers see the same modules
            else:
                self.forward_module = torch.compile(self.wrapped)
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.device = torch.device(device)
        self.logger = logger or NullLogger()
        self.bytes_per_token = bytes_per_token or cfg.bytes_per_token
        self.callbacks = list(callbacks or [])
        # MTP must not predict across documents: with MTP on, targets that are the next document's
        # BOS are passed as ``mtp_boundary_BT``; only the MTP depths drop them (the LM loss keeps
        # every BOS target, as validation does).
        self.boundary_id = bos_id if getattr(getattr(model, "cfg", None), "mtp_depth", 0) else None
        # document masking (config ``document_masking``): each BOS starts a document that attends only
        # within itself; rows that start mid-document count their leading tokens as one more document
        self.document_bos_id = bos_id if getattr(cfg, "document_masking", False) else None
        self.rank = dist.get_rank() if _distributed() else 0
        self.world_size = dist.get_world_size() if _distributed() else 1
        self.data_parallel_size = self.world_size  # model replicas (a pipeline's stages share one batch)
        self.optimizer = build_adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                                     eps=cfg.eps, decay_embeddings=cfg.decay_embeddings,
                                     impl=getattr(cfg, "adamw_impl", "torch"))
        self.mtp_depth = int(getattr(model.cfg, "mtp_depth", 0))
        self.mtp_loss_weight = float(getattr(model.cfg, "mtp_loss_weight", 0.0)) if self.mtp_depth else 0.0
        self.last_target_counts: torch.Tensor | None = None  # (1 + mtp_depth,) of the last step, global
        self.update_router_bias = True  # a post-training stage may freeze the balancing biases
        # autocast is for fp32 weights; with bf16 weights it only adds casts, and (measured on an H100,
        # bench_ref) it made activations fp32 in places, which pushed the MoE experts off their
        # grouped-GEMM path: 5x slower. "auto" therefore autocasts only fp32-weight models on CUDA.
        params_fp32 = next(model.parameters()).dtype == torch.float32
        self.use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda" and params_fp32)
        model_cfg = getattr(model, "cfg", None)
        self.flops_per_token = model_cfg.flops_per_token(cfg.seq_len) if model_cfg is not None else 0.0
        # schedule position and balancing statistics (all checkpointed)
        self.step = 0
        self.tokens_seen = 0
        # one row per router: the main MoE layers, then those of the MTP blocks
        num_moe = len(model.routers()) if hasattr(model, "routers") else getattr(model_cfg, "num_moe_layers", 0)
        num_experts = getattr(model_cfg, "num_routed_experts", 0)
        # kept on the device: moving them to the host every step would synchronise it
        zeros = lambda: torch.zeros(num_moe, num_experts, dtype=torch.float64, device=self.device)  # noqa: E731
        self.cumulative_counts_LE = zeros()
        self.interval_counts_LE = zeros()
        self.last_counts_LE = zeros()
        self.logged_interval_counts_LE = torch.zeros(num_moe, num_experts, dtype=torch.float64)  # host copy
        self.logged_bias_LE: torch.Tensor | None = None  # the router biases at the last log step (host)
        self.history: list[dict] = []  # metrics of every log step (small: scalars only)
        self._interval: dict[str, torch.Tensor] = {}
        self._interval_steps = 0
        self.meter = ThroughputMeter()
        self.last_val: dict[str, float] = {}
        self._graphed = None  # GraphedStep of the device part of train_step (cuda_graph)
        self.use_cuda_graph = bool(getattr(cfg, "cuda_graph", False))
        if self.use_cuda_graph and self.device.type != "cuda":
            log.warning("cuda_graph=True ignored: the device is %s, CUDA graphs need CUDA", self.device)
            self.use_cuda_graph = False
        if self.use_cuda_graph and self.world_size > 1:
            raise ValueError(f"cuda_graph=True needs one CUDA worker; this run has {self.world_size} "
                             "(the gradient all-reduce is not captured)")
        if self.use_cuda_graph:
            from ..kernels.graph_step import make_capture_safe

            make_capture_safe(model)  # sync-free embedding backward
            for group in self.optimizer.param_groups:
                group["capturable"] = True  # AdamW's step counters stay on the device

    # ---------------------------------------------------------------- one optimiser step
    def _autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync_context(self, last_micro: bool):
        module = self.wrapped
        if last_micro:
            return contextlib.nullcontext()
        if hasattr(module, "no_sync"):  # DDP
            return module.no_sync()
        return contextlib.nullcontext()

    def _set_fsdp_sync(self, enabled: bool) -> None:
        if hasattr(self.wrapped, "set_requires_gradient_sync"):  # FSDP2 module
            self.wrapped.set_requires_gradient_sync(enabled)

    def _split(self, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(inputs (B, T), targets (B, T), extra forward kwargs) of a tensor or dict batch (see above)."""
        if isinstance(batch, dict):
            inputs_BT = batch["input_ids"].to(self.device, non_blocking=True)
            targets_BT = batch["targets"].to(self.device, non_blocking=True)
            docs = batch.get("document_ids")
            extra = {"document_ids_BT": docs.to(self.device, non_blocking=True)} if docs is not None else {}
        else:
            batch_BT1 = batch.to(self.device, non_blocking=True)
            inputs_BT, targets_BT, extra = batch_BT1[:, :-1], batch_BT1[:, 1:], self._documents(batch_BT1[:, :-1])
        if self.boundary_id is not None:
            extra["mtp_boundary_BT"] = targets_BT == self.boundary_id
        return inputs_BT, targets_BT, extra

    def _documents(self, inputs_BT: torch.Tensor) -> dict:
        """``{"document_ids_BT": ...}`` for a packed token row when document masking is on, else {}."""
        if self.document_bos_id is None:
            return {}
        return {"document_ids_BT": (inputs_BT == self.document_bos_id).long().cumsum(dim=1)}

    def _target_counts(self, targets_BT: torch.Tensor, extra: dict | None = None) -> torch.Tensor:
        """Valid targets of the LM loss and of each MTP depth, (1 + depth,) float64."""
        counts = [(targets_BT != IGNORE_INDEX).sum()]
        boundary_BT = (extra or {}).get("mtp_boundary_BT")
        chain_BT = targets_BT if boundary_BT is None else targets_BT.masked_fill(boundary_BT, IGNORE_INDEX)
        counts += [(mtp_targets(chain_BT, d) != IGNORE_INDEX).sum() for d in range(1, self.mtp_depth + 1)]
        return torch.stack(counts).double()

    def weighted_objective(self, out, counts: torch.Tensor, global_counts: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the token-weighted global objective (see "Token weighting").

        ``counts`` are this micro-batch's valid targets (LM, then each MTP depth), ``global_counts``
        those of the whole global batch; the result's gradient, summed over micro-batches and
        averaged over ranks, is the gradient of the one-big-batch objective.
        """
        terms = out.terms
        share = (counts / global_counts.clamp_min(1)).to(terms["lm_loss"].dtype) * self.world_size
        loss = terms["lm_loss"] * share[0]
        mtp = terms.get("mtp_losses") or []
        if mtp and self.mtp_loss_weight:
            loss = loss + self.mtp_loss_weight / len(mtp) * sum(m * share[1 + j] for j, m in enumerate(mtp))
        return loss + terms["balance_loss"] / self.cfg.grad_accum_steps

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        self.wrapped.train()
        lr = lr_at(self.step, schedule=cfg.schedule, max_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                   total_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
        set_lr(self.optimizer, lr)
        micro_batches = [self._split(next(self.train_batches)) for _ in range(cfg.grad_accum_steps)]
        if self.use_cuda_graph:
            parts, counts_LE, entropy_L, grad_norm = self._graphed_step(micro_batches)
        else:
            self._plain_optimizer_groups()
            parts, counts_LE, entropy_L, grad_norm = self._device_step(micro_batches)
            self.optimizer.zero_grad(set_to_none=True)
        if counts_LE is not None and hasattr(self.model, "apply_router_bias_update"):
            self.last_counts_LE = counts_LE
            self.interval_counts_LE += counts_LE
            self.cumulative_counts_LE += counts_LE

        tokens = cfg.tokens_per_step(self.data_parallel_size)
        self.step += 1
        self.tokens_seen += tokens
        self.meter.add(tokens)
        self._accumulate_interval(parts, grad_norm, entropy_L)
        metrics: dict[str, float] = {}
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            metrics = self._interval_metrics(lr)
        if cfg.val_every and (self.step % cfg.val_every == 0 or self.step == cfg.max_steps) and self.val_batches:
            self.meter.pause()
            self.last_val = self.evaluate()
            self.meter.resume()
            metrics.update(self.last_val)
        if metrics:
            metrics["step"] = self.step
            self.history.append(metrics)
            if self.rank == 0:
                self.logger.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=self.step)
        for callback in self.callbacks:
            callback(self, self.step, metrics)
        return metrics

    def _device_step(self, micro_batches):
        """The device part of one optimiser step: gradients, clipping, AdamW, router-bias update.
        No host synchronisation (the CUDA graph captures exactly this); gradients are left set."""
        parts, counts_LE, entropy_L = self.accumulate_gradients(micro_batches)
        # global expert counts: summed over micro-batches (above) and ranks (here)
        if counts_LE is not None and _distributed():
            dist.all_reduce(counts_LE, op=dist.ReduceOp.SUM)
        grad_norm, clip_coef = self._clip_gradients()
        if clip_coef is None:
            self.optimizer.step()
        else:  # the optimiser scales the gradients in its kernel (TritonAdamW): no separate clipping pass
            self.optimizer.step(grad_scale=clip_coef)
        if counts_LE is not None and hasattr(self.model, "apply_router_bias_update") and self.update_router_bias:
            self.model.apply_router_bias_update(counts_LE.to(torch.float32))
        return parts, counts_LE, entropy_L, grad_norm

    def _graphed_step(self, micro_batches):
        """``_device_step`` through a GraphedStep: 3 eager steps, then one capture, then replays.
        The micro-batches travel as a flat tuple of tensors (the graph's static inputs); outputs
        are cloned (the static ones are overwritten by the next replay)."""
        from ..kernels.graph_step import GraphedStep

        keys = [sorted(extra) for _, _, extra in micro_batches]
        # contiguous: the same strides on every call (warm-up, capture, replay; see graph_step.static_copy)
        flat = [t.contiguous() for (inputs, targets, extra), names in zip(micro_batches, keys)
                for t in (inputs, targets, *(extra[n] for n in names))]
        for group in self.optimizer.param_groups:  # a device-tensor lr: replays read the current value
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device)
        if self._graphed is None or self._graph_keys != keys:
            def body(*tensors):
                it, rebuilt = iter(tensors), []
                for names in keys:
                    inputs, targets = next(it), next(it)
                    rebuilt.append((inputs, targets, {n: next(it) for n in names}))
                return self._device_step(rebuilt)

            self._graphed = GraphedStep(body, [self.optimizer], warmup_steps=GRAPH_WARMUP_STEPS)
            self._graph_keys = keys
        parts, counts_LE, entropy_L, grad_norm = self._graphed(*flat)
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return {k: v.clone() for k, v in parts.items()}, clone(counts_LE), clone(entropy_L), grad_norm.clone()

    def _plain_optimizer_groups(self) -> None:
        """Undo what a graphed run's checkpoint brings into an eager run: a tensor lr (the CPU for-each
        AdamW refuses it) and capturable=True off CUDA."""
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"] = float(group["lr"])
            if self.device.type != "cuda" and group.get("capturable"):
                group["capturable"] = False

    def drop_cuda_graph(self) -> None:
        """Forget the captured step (e.g. after the optimiser state was replaced by a checkpoint load:
        the graph would keep reading the old tensors); the next steps warm up and capture afresh."""
        self._graphed = None

    def accumulate_gradients(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor, dict]]):
        """Forward + backward of one step's micro-batches (``_split`` triples), token-weighted.

        Returns (loss parts of this rank, each already in per-rank units so that the mean over
        ranks is the global value; router counts (L, E) summed over micro-batches or None; router
        entropy summed over micro-batches or None). Gradients accumulate in ``.grad``.
        """
        k = len(micro_batches)
        counts_MC = torch.stack([self._target_counts(t, extra) for _, t, extra in micro_batches])  # (k, 1 + depth)
        global_counts = counts_MC.sum(0)
        if _distributed():
            dist.all_reduce(global_counts, op=dist.ReduceOp.SUM)  # the one count reduction of the step
        parts = {name: torch.zeros((), device=self.device) for name in ("loss",) + LOSS_PARTS}
        counts_LE = entropy_L = None
        for micro, (inputs_BT, targets_BT, extra) in enumerate(micro_batches):
            last = micro == k - 1
            self._set_fsdp_sync(last)
            with self._sync_context(last):
                with self._autocast():
                    out = self.forward_module(inputs_BT, targets=targets_BT, **extra)
                    loss = self.weighted_objective(out, counts_MC[micro], global_counts)
                loss.backward()
            share = (counts_MC[micro] / global_counts.clamp_min(1) * self.world_size).float()
            parts["loss"] += loss.detach().float()
            parts["lm_loss"] += out.aux["lm_loss"].detach().float() * share[0]
            mtp = out.terms.get("mtp_losses") or []
            if mtp:
                parts["mtp_loss"] += sum(m.detach().float() * share[1 + j] for j, m in enumerate(mtp)) / len(mtp)
            for name in ("seq_aux_loss", "z_loss", "lb_loss"):
                if name in out.aux:
                    parts[name] += out.aux[name].detach().float() / k
            tpe = out.aux.get("tokens_per_expert")
            if tpe is not None and tpe.numel():
                counts_LE = tpe.detach().double() if counts_LE is None else counts_LE + tpe.detach().double()
            ent = out.aux.get("router_entropy")
            if ent is not None and torch.is_tensor(ent) and ent.numel():
                ent = ent.detach().float().reshape(-1)
                entropy_L = ent if entropy_L is None else entropy_L + ent
        self._set_fsdp_sync(True)
        self.last_target_counts = global_counts
        return parts, counts_LE, entropy_L

    def _clip_gradients(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(gradient norm, None) after clipping the gradients in place; or (norm, clip coefficient) when the
        optimiser folds the coefficient into its step (TritonAdamW on its kernel path: ``grad_scale``). Either
        way the update is AdamW of the clipped gradients; folded, ``.grad`` itself stays unclipped."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        runs_kernel = getattr(self.optimizer, "_runs_triton", None)
        fold = max_norm != float("inf") and runs_kernel is not None and runs_kernel()
        norm = clip_grad_norm(self.model.parameters(), max_norm, apply=not fold)
        return norm.detach().float(), (clip_coefficient(norm, max_norm) if fold else None)

    def _accumulate_interval(self, parts: dict[str, torch.Tensor], grad_norm: torch.Tensor,
                             entropy_L: torch.Tensor | None) -> None:
        k = self.cfg.grad_accum_steps
        values = dict(parts)  # already the step's values (accumulate_gradients)
        values["grad_norm"] = grad_norm.to(self.device)
        if entropy_L is not None:
            values["router_entropy_L"] = entropy_L / k
        for name, value in values.items():
            self._interval[name] = self._interval.get(name, 0) + value
        self._interval_steps += 1

    def _interval_metrics(self, lr: float) -> dict[str, float]:
        """Means over the log interval, averaged over ranks (one all-reduce)."""
        n = max(1, self._interval_steps)
        names = sorted(k for k in self._interval if k != "router_entropy_L")
        flat = torch.stack([self._interval[k].reshape(()).float() for k in names])
        entropy = self._interval.get("router_entropy_L")
        if entropy is not None:
            flat = torch.cat([flat, entropy.float()])
        flat = flat / n
        if _distributed():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat = flat / self.world_size
        values = flat.cpu().tolist()
        metrics = dict(zip(names, values[: len(names)]))
        for layer, value in enumerate(values[len(names):]):
            metrics[f"router_entropy/layer{layer}"] = value
        metrics["lr"] = lr
        tokens_per_s = self.meter.read()
        metrics["tokens_per_s"] = tokens_per_s
        metrics["tokens_seen"] = float(self.tokens_seen)
        if self.device.type == "cuda" and self.flops_per_token:
            metrics["mfu"] = mfu(tokens_per_s, self.flops_per_token, self.cfg.peak_flops, self.world_size)
        if self.cumulative_counts_LE.numel():
            batch_vio = global_maxvio(self.last_counts_LE).cpu()
            interval_vio = global_maxvio(self.interval_counts_LE).cpu()
            run_vio = global_maxvio(self.cumulative_counts_LE).cpu()
            for layer in range(len(batch_vio)):
                metrics[f"maxvio_batch/layer{layer}"] = float(batch_vio[layer])
                metrics[f"maxvio_interval/layer{layer}"] = float(interval_vio[layer])
                metrics[f"maxvio_global/layer{layer}"] = float(run_vio[layer])
            metrics["maxvio_batch/mean"] = float(batch_vio.mean())
            metrics["maxvio_global/mean"] = float(run_vio.mean())
            bias_LE = self.router_bias_LE()
            self.logged_bias_LE = None if bias_LE is None else bias_LE.cpu()
            if bias_LE is not None and bias_LE.numel():
                metrics["router_bias/mean_abs"] = float(bias_LE.abs().mean())
                metrics["router_bias/max_abs"] = float(bias_LE.abs().max())
        # the expert-load recorder reads the closed window from logged_interval_counts_LE
        self.logged_interval_counts_LE = self.interval_counts_LE.to("cpu", copy=True)
        self.interval_counts_LE.zero_()
        self._interval, self._interval_steps = {}, 0
        return metrics

    def router_bias_LE(self) -> torch.Tensor | None:
        """Every router's balancing bias (L, E), in the counts' row order (collective in a pipeline run,
        whose ranks each hold some routers: called on every rank, at log steps)."""
        return router_biases(self.model)

    # ---------------------------------------------------------------- validation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation LM loss (nats/token, MTP and aux losses excluded) and bits per byte.

        Every rank evaluates its own batches; sums of (loss × targets) and targets are
        all-reduced, so the result is the mean over the global validation set.
        """
        module = self.forward_module if self.cfg.parallelism == "fsdp" else _unwrap(self.wrapped)
        was_training = module.training
        module.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch_BT1 in self.val_batches():
            batch_BT1 = batch_BT1.to(self.device)
            with self._autocast():
                out = module(batch_BT1[:, :-1], targets=batch_BT1[:, 1:], **self._documents(batch_BT1[:, :-1]))
            num_targets = int((batch_BT1[:, 1:] != -100).sum())
            sums[0] += out.aux["lm_loss"].double() * num_targets
            sums[1] += num_targets
        if _distributed():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        module.train(was_training)
        return self._val_metrics(sums)

    def _val_metrics(self, sums_2: torch.Tensor) -> dict[str, float]:
        """``val_loss`` (and ``val_bpb``) from the global (Σ loss × targets, Σ targets); {} when no target."""
        if sums_2[1] == 0:
            return {}
        val_loss = float(sums_2[0] / sums_2[1])
        metrics = {"val_loss": val_loss}
        if self.bytes_per_token:
            metrics["val_bpb"] = bits_per_byte(val_loss, self.bytes_per_token)
        return metrics

    # ---------------------------------------------------------------- running
    def fit(self, until_step: int | None = None) -> list[dict]:
        """Train until ``until_step`` (default ``max_steps``); returns the logged history."""
        until_step = self.cfg.max_steps if until_step is None else min(until_step, self.cfg.max_steps)
        self.meter = ThroughputMeter()
        while self.step < until_step:
            self.train_step()
        return self.history

    # ---------------------------------------------------------------- small state (see state.py)
    def loop_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen,
                "cumulative_counts_LE": self.cumulative_counts_LE.cpu().clone(),
                "interval_counts_LE": self.interval_counts_LE.cpu().clone(),
                "last_counts_LE": self.last_counts_LE.cpu().clone(), "history": list(self.history),
                "last_val": dict(self.last_val), "time": time.time(), **self.interval_state()}

    def interval_state(self) -> dict[str, Any]:
        """This rank's partial log-interval sums: a checkpoint may fall inside a log interval. They
        differ between ranks (each sums its own losses until the log step's all-reduce), so a
        multi-rank checkpoint keeps one per rank (``state.capture``)."""
        return {"interval": {k: v.detach().cpu().clone() for k, v in self._interval.items()},
                "interval_steps": self._interval_steps}

    def load_interval_state(self, state: dict[str, Any]) -> None:
        self._interval = {k: v.to(self.device) for k, v in state.get("interval", {}).items()}
        self._interval_steps = int(state.get("interval_steps", 0))

    def load_loop_state(self, state: dict[str, Any]) -> None:
        self.drop_cuda_graph()  # a resume replaces the optimiser state the graph was captured on
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.cumulative_counts_LE = state["cumulative_counts_LE"].double().to(self.device)
        self.interval_counts_LE = state["interval_counts_LE"].double().to(self.device)
        self.last_counts_LE = state["last_counts_LE"].double().to(self.device)
        self.history = list(state.get("history", []))
        self.last_val = dict(state.get("last_val", {}))
        self.load_interval_state(state)
