"""The pretrain stage's config: ``PretrainConfig`` (what the loop and the launcher read) and
``ModelOverrides`` (a typed, validated patch on a ``ModelConfig`` preset).

The config sits beside its engine (``platform/train``), not in ``models/`` (which imports no
pydantic): ``models.train.loop.Trainer`` reads its fields through the ``LoopConfig`` protocol
that the loop defines, and ``PretrainConfig`` is the one place that gives them defaults, bounds
and descriptions (the Prefect run form shows the descriptions).

``ModelOverrides`` is built from ``ModelConfig``'s dataclass fields, so the model's fields are
listed once (in ``models/config.py``); an unknown override (``num_expertz``) fails at
validation, and the merged model config is validated there too (``n_group`` must divide the
experts, ...), before any data is downloaded or a worker starts.

Old checkpoints stored ``PretrainConfig`` as a plain dict (same keys, ``model_overrides`` a
dict, ``betas`` a list): ``PretrainConfig.from_dict`` loads them unchanged.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal, Optional

from pydantic import ConfigDict, Field, create_model, field_serializer, model_serializer, model_validator

from moeflow.models.config import _PRESETS, ModelConfig  # _PRESETS: the preset names, for the enum
from moeflow.models.train.schedules import SCHEDULES
from moeflow.platform.config import StageConfig

ModelPreset = Literal[tuple(sorted(_PRESETS))]  # type: ignore[valid-type]
Schedule = Literal[SCHEDULES]  # type: ignore[valid-type]


class _OverridesBase(StageConfig):
    """Only the fields that are set (not None) override the preset."""

    def set_values(self) -> dict:
        return {k: v for k, v in self.model_dump(mode="python").items() if v is not None}

    def __contains__(self, name: str) -> bool:
        return getattr(self, name, None) is not None


def _overrides_model() -> type[_OverridesBase]:
    hints = typing.get_type_hints(ModelConfig)
    fields = {f.name: (Optional[hints[f.name]], Field(None, description=f"ModelConfig.{f.name} (default: the preset's)"))
              for f in dataclasses.fields(ModelConfig)}
    return create_model("ModelOverrides", __base__=_OverridesBase, __doc__="Overrides of ModelConfig fields.",
                        **fields)


ModelOverrides = _overrides_model()


# Fields added after checkpoints stored their config, left out of the dump when at this value (see
# PretrainConfig._dump): the parallelism and speed fields, so a plain run's config hashes as before they
# existed. document_masking used to be here (left out when on, its default), so the default doc-masked
# config hashed like a plain-causal config stored before the field and the stage cache reused that causal
# run; leaving it out when OFF instead breaks the round trip (from_dict would read the missing key as on).
# It is always dumped now: configs from before the field hash differently (a re-run starts a new output
# prefix instead of reusing or resuming a run that trained something else).
_LATER_FIELDS: dict[str, object] = {"expert_parallel": 1, "pipeline_parallel": 1, "pipeline_schedule": "1f1b",
                                    "activation_checkpointing": "none", "fp8": [], "fp8_grad_dtype": "e4m3",
                                    "cuda_graph": False, "adamw_impl": "torch"}


class PretrainConfig(StageConfig):
    """Everything the pretraining loop and launcher need. Batch sizes are per rank."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # --- what people change first (the Prefect form shows fields in this order)
    max_steps: int = Field(100, ge=1, le=10_000_000, description="optimiser steps to train for")
    lr: float = Field(3e-3, gt=0, le=1.0, description="peak learning rate")
    model_preset: ModelPreset = Field("tiny", description="ModelConfig preset the overrides patch")
    model_overrides: ModelOverrides = Field(default_factory=ModelOverrides,
                                            description="ModelConfig fields that replace the preset's "
                                                        "(vocab_size defaults to the tokenizer's)")
    seq_len: int = Field(128, ge=1, le=1_048_576, description="tokens per training row")
    micro_batch_size: int = Field(8, ge=1, le=65_536, description="rows per micro-batch per rank")
    grad_accum_steps: int = Field(1, ge=1, le=4096, description="micro-batches per optimiser step")
    dense_twin: bool = Field(False, description="train the same-active-parameters dense twin instead (MoE vs dense)")
    # --- optimiser and schedule
    schedule: Schedule = Field("cosine", description="learning-rate schedule")
    warmup_steps: int = Field(10, ge=0, le=10_000_000, description="linear warm-up steps (at most max_steps)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of lr")
    decay_fraction: float = Field(0.2, ge=0, le=1, description="wsd only: fraction of steps spent decaying")
    weight_decay: float = Field(0.1, ge=0, le=10, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2), each in [0, 1)")
    eps: float = Field(1e-8, gt=0, le=1, description="AdamW epsilon")
    decay_embeddings: bool = Field(True, description="apply weight decay to the embeddings too")
    grad_clip: float = Field(1.0, le=1e6, description="global gradient-norm clip; <= 0 disables clipping")
    document_masking: bool = Field(True, description="packed rows attend within their BOS-started documents "
                                                     "only (block-diagonal causal; RoPE restarts per document), "
                                                     "in training and validation; off = plain causal over the row")
    # --- numerics and speed
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the init and the data order")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="autocast: auto = bf16 on CUDA, fp32 on CPU")
    param_dtype: Literal["fp32", "bf16"] = Field("fp32", description="bf16 keeps weights and AdamW state in bf16 "
                                                                     "(faster, smaller; tiny updates are lost)")
    compile: bool = Field(False, description="torch.compile each decoder block")
    parallelism: Literal["ddp", "fsdp"] = Field("ddp", description="data parallelism: DDP or FSDP2 (one worker: none)")
    expert_parallel: int = Field(1, ge=1, le=1024, description="expert-parallel degree ep: each group of ep workers "
                                                               "shares one copy of the routed experts, each worker "
                                                               "holding num_routed_experts / ep; workers = dp x ep x pp")
    pipeline_parallel: int = Field(1, ge=1, le=256, description="pipeline stages pp: decoder blocks split over pp "
                                                                "workers (grad_accum_steps = micro-batches per step)")
    pipeline_schedule: Literal["1f1b", "interleaved_1f1b"] = Field(
        "1f1b", description="pipeline schedule (interleaved: two stages per worker)")
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "none", description="recompute in backward, per decoder block: selective = norms, RoPE, SwiGLU and "
                            "gathers (keeps matmul and attention outputs), full = the whole block; exact, "
                            "trades speed for memory (benchmarks/RESULTS.md, issue 16)")
    fp8: list[Literal["attn", "dense", "shared", "experts", "lm_head"]] = Field(
        default_factory=list, description="layer groups whose matmuls run in FP8 (rowwise e4m3 scales; "
                                          "CUDA sm89+; empty = bf16 everywhere, the measured default)")
    fp8_grad_dtype: Literal["e4m3", "e5m2"] = Field("e4m3", description="FP8 format of the output gradients")
    cuda_graph: bool = Field(False, description="replay each optimiser step as one CUDA graph after 3 eager "
                                                "steps (one CUDA worker only; ignored with a log line on CPU)")
    adamw_impl: Literal["torch", "triton"] = Field(
        "torch", description="AdamW implementation: torch = torch.optim.AdamW (fused on CUDA); triton = one "
                             "Triton launch over all tensors with clipping folded in (models/kernels/adamw.py; "
                             "torch's step off CUDA; measured 2 % slower than torch's fused AdamW in the graphed "
                             "bench_ref step on an H100)")
    # --- cadence
    log_every: int = Field(10, ge=1, le=1_000_000, description="steps between logged metrics")
    val_every: int = Field(50, ge=0, le=10_000_000, description="steps between validations (0: none; the last step always)")
    val_batches: int = Field(8, ge=0, le=100_000, description="global number of validation batches")
    val_batch_size: Optional[int] = Field(None, ge=1, description="validation rows per batch (default micro_batch_size)")
    checkpoint_every: int = Field(50, ge=0, le=10_000_000, description="steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="newest checkpoints kept in the store")
    bytes_per_token: Optional[float] = Field(None, gt=0, description="bits-per-byte fallback when the data has none")
    peak_flops: float = Field(798e12, gt=0, description="MFU denominator: peak FLOP/s of one accelerator")

    @field_serializer("model_overrides")
    def _dump_overrides(self, overrides) -> dict:
        return {k: v for k, v in overrides.model_dump(mode="json").items() if v is not None}

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        # A field added after checkpoints stored their config may be left out when it is at the value
        # that reproduces the behaviour from before the field AND that value is its default (so from_dict
        # reads the missing key back the same); then an old config dumps and hashes as before.
        data = handler(self)
        for name, default in _LATER_FIELDS.items():
            if data.get(name) == default:
                data.pop(name)
        return data

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be <= max_steps={self.max_steps}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={self.betas}: each must be in [0, 1)")
        if len(set(self.fp8)) != len(self.fp8):
            raise ValueError(f"fp8={self.fp8}: a layer group is listed twice")
        model = self.build_model_config()  # the merged model config must be valid too (raises ValueError)
        self._check_parallel(model)
        return self

    def _check_parallel(self, model: ModelConfig) -> None:
        ep, pp = self.expert_parallel, self.pipeline_parallel
        if ep > 1 and model.num_moe_layers == 0:
            raise ValueError(f"expert_parallel={ep} needs MoE layers; this model (dense_twin={self.dense_twin}) has none")
        if ep > 1 and model.num_routed_experts % ep:
            raise ValueError(f"expert_parallel={ep} must divide num_routed_experts={model.num_routed_experts}")
        stages = pp * (2 if self.pipeline_schedule == "interleaved_1f1b" else 1)
        if pp > 1 and stages > model.num_layers:
            raise ValueError(f"pipeline_parallel={pp} ({stages} stages with {self.pipeline_schedule}) needs at least "
                             f"{stages} decoder layers; the model has num_layers={model.num_layers}")
        if pp > 1 and self.grad_accum_steps < pp:
            raise ValueError(f"pipeline_parallel={pp}: grad_accum_steps={self.grad_accum_steps} (the micro-batches "
                             f"of a step) must be >= {pp} to fill the pipeline")
        if pp > 1:  # what the pipeline stages do not compose with yet (platform.train.pipeline_parallel)
            unsupported = [f"{name}={value!r}" for name, value, off in (
                ("expert_parallel", ep, 1), ("parallelism", self.parallelism, "ddp"), ("compile", self.compile, False),
                ("cuda_graph", self.cuda_graph, False), ("activation_checkpointing", self.activation_checkpointing,
                                                         "none"), ("fp8", self.fp8, [])) if value != off]
            if unsupported:
                raise ValueError(f"pipeline_parallel={pp} does not compose with {', '.join(unsupported)} yet")

    def mesh_shape(self, world_size: int) -> tuple[int, int, int]:
        """(dp, ep, pp) for ``world_size`` workers: world = dp x ep x pp (a one-line error otherwise)."""
        ep, pp = self.expert_parallel, self.pipeline_parallel
        if world_size % (ep * pp):
            raise ValueError(f"{world_size} worker(s) cannot be split into expert_parallel={ep} x "
                             f"pipeline_parallel={pp}: the number of workers must be a multiple of {ep * pp}")
        return world_size // (ep * pp), ep, pp

    # ------------------------------------------------------------------ derived
    def build_model_config(self) -> ModelConfig:
        cfg = ModelConfig.preset(self.model_preset)
        overrides = self.model_overrides.set_values()
        if overrides:
            cfg = cfg.replace(**overrides)
        return cfg.dense_twin() if self.dense_twin else cfg

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.seq_len * self.micro_batch_size * self.grad_accum_steps * world_size

    def with_vocab_size(self, vocab_size: int) -> "PretrainConfig":
        """This config with ``vocab_size`` set to the tokenizer's, unless an override sets it."""
        if "vocab_size" in self.model_overrides:
            return self
        overrides = {**self.model_overrides.set_values(), "vocab_size": int(vocab_size)}
        return self.model_copy(update={"model_overrides": ModelOverrides(**overrides)})

    @classmethod
    def from_dict(cls, data: dict | None) -> "PretrainConfig":
        return cls.model_validate(dict(data or {}))
