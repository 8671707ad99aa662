"""The distill stage: a teacher model version -> a smaller student, trained on the teacher's top-k.

Data: token shards (the pretraining ``tokens`` artefact). The student trains on a fixed pool of
``pool_rows`` packed rows of the train split (drawn once, by seed; epochs cycle over it) and is judged
on rows of the val split.

Teacher logits, two ways (``teacher_logits``):

* ``"cache"``: the teacher's top-k (log-probs over the full vocabulary at temperature T, and ids) on
  every pool row is computed once and written to the store as an atomic artefact keyed by what
  determines it (teacher, tokens, k, T, rows); a later run with another student reuses it, and the
  teacher is freed before the student's first step.
* ``"online"``: the teacher stays resident and scores each micro-batch under ``no_grad``. Both ways see
  the same rows in the same order and train the same student (tested).

Held-out figures (before and after training): ``kl_to_teacher`` = the exact full-vocabulary
KL(teacher ‖ student) at T = 1 per token (the teacher's held-out log-probs are computed once at the
start), and the student's own ``val_loss`` (nats/token).

Shape suffixes: N rows, T tokens, K top-k, V vocabulary.
"""

from __future__ import annotations

import io
import logging
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from moeflow.models import MoETransformer
from moeflow.models.align.distill import TopK, distill_loss, teacher_topk
from moeflow.models.align.sft import PackedRowLoader
from moeflow.platform.config import StageConfig, config_hash
from moeflow.platform.train.config import ModelOverrides

from .engine import ObjectiveOutput, PostTrainConfig, PostTrainJob, StageParts, StageResult, run_posttrain

log = logging.getLogger(__name__)

BUILDER = "moeflow.platform.posttrain.distill:build_distill"
CACHE_ROOT = "cache/teacher-topk"
CACHE_FILE = "topk.npz"


class DistillLossConfig(StageConfig):
    """The distillation objective (see ``moeflow.models.align.distill``)."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="teacher-student divergence: forward KL (classic KD), reverse KL, or TRL GKD's "
                                  "generalised JSD")
    jsd_beta: float = Field(0.5, gt=0.0, lt=1.0, description="JSD mixture weight β (0.5 = symmetric JSD)")
    top_k: int = Field(32, ge=1, le=65536, description="teacher logits kept per token (veRL uses 32)")
    temperature: float = Field(1.0, gt=0.0, le=20.0,
                               description="softening temperature T; the divergence is scaled by T² (Hinton)")
    alpha: float = Field(0.5, ge=0.0, le=1.0,
                         description="weight of the distillation term; 1 − alpha weighs the hard-label loss")
    tail: Literal["bucket", "renormalize"] = Field(
        "bucket", description="mass outside the top-k: one extra class ('bucket', exact at k = V) or dropped by "
                              "renormalising the teacher over its top-k ('renormalize', forward KL only)")


class DistillConfig(PostTrainConfig, DistillLossConfig):
    """Distillation: the loop (``PostTrainConfig``), the student, where the teacher's logits come from, the loss.

    The input model version is the teacher. ``micro_batch_size`` counts rows of ``seq_len`` tokens.
    """

    student: Literal["dense", "dense_twin", "moe"] = Field(
        "dense", description="dense: every layer a SwiGLU as wide as the teacher's active MoE width (k + shared "
                             "experts; exports to HF); dense_twin: ModelConfig.dense_twin() (same active parameters, "
                             "first layers keep their width, has no HF form); moe: the teacher's architecture")
    student_overrides: ModelOverrides = Field(default_factory=ModelOverrides,
                                              description="changes to the student's config (e.g. num_layers: 2)")
    teacher_logits: Literal["cache", "online"] = Field(
        "cache", description="cache: the teacher's top-k computed once into the store (teacher freed before "
                             "training, reused by later runs); online: the teacher scores each micro-batch")
    pool_rows: int = Field(512, ge=1, le=10_000_000, description="training rows drawn once from the train split")
    eval_rows: int = Field(32, ge=1, le=100_000, description="held-out rows (val split) for kl_to_teacher/val_loss")
    eval_batch_size: int = Field(8, ge=1, le=4096, description="rows per forward when scoring")
    lr: float = Field(3e-3, gt=0, le=1.0, description="peak learning rate (a fresh student needs a large one)")

    def student_config(self, teacher_cfg):
        """The student's ModelConfig, derived from the teacher's (same vocabulary and tokenizer)."""
        overrides = self.student_overrides.set_values()
        cfg = teacher_cfg.replace(**{k: v for k, v in overrides.items() if k != "first_k_dense"},
                                  first_k_dense=min(teacher_cfg.first_k_dense, overrides.get("num_layers", 1 << 30)))
        if self.student == "dense_twin":
            return cfg.dense_twin()
        if self.student == "dense":
            width = overrides.get("dense_intermediate_size",
                                  (cfg.num_experts_per_tok + cfg.num_shared_experts) * cfg.moe_intermediate_size)
            return cfg.replace(first_k_dense=cfg.num_layers, dense_intermediate_size=width, num_routed_experts=0,
                               num_shared_experts=0, mtp_depth=0)
        return cfg.replace(first_k_dense=overrides["first_k_dense"]) if "first_k_dense" in overrides else cfg


# ------------------------------------------------------------------ the teacher's top-k over a pool of rows
@torch.no_grad()
def compute_topk(teacher, rows_NT1: torch.Tensor, *, k: int, temperature: float, batch_size: int = 8,
                 device: str | torch.device = "cpu") -> TopK:
    """The teacher's top-k at every input position of ``rows[:, :-1]``: (N, T, K) log-probs + ids."""
    teacher.eval()
    values, indices = [], []
    for start in range(0, rows_NT1.shape[0], batch_size):
        inputs_BT = rows_NT1[start:start + batch_size, :-1].to(device)
        logits_BTV = teacher(inputs_BT).logits
        top = teacher_topk(logits_BTV.reshape(-1, logits_BTV.shape[-1]), k, temperature)
        B, T = inputs_BT.shape
        values.append(top.logprobs_NK.view(B, T, k).cpu())
        indices.append(top.indices_NK.view(B, T, k).cpu())
    return TopK(torch.cat(values), torch.cat(indices))


def cache_prefix(teacher_uri: str, tokens_uri: str, rows_NT1: torch.Tensor, k: int, temperature: float) -> str:
    """Store prefix of a top-k cache: a hash of everything that determines its content."""
    digest = config_hash({"teacher": teacher_uri, "tokens": tokens_uri, "k": k, "temperature": temperature,
                          "rows": rows_NT1.shape[0], "seq_len": rows_NT1.shape[1] - 1,
                          "rows_sha": _tensor_digest(rows_NT1)}, length=16)
    return f"{CACHE_ROOT}/{digest}"


def _tensor_digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def write_topk_cache(store, prefix: str, rows_NT1: torch.Tensor, top: TopK, metadata: dict) -> str:
    """One atomic artefact: rows (int32), log-probs (fp16: 3 decimal digits suffice for a target
    distribution and halve the bytes) and ids (int32)."""
    buf = io.BytesIO()
    np.savez(buf, rows=rows_NT1.numpy().astype(np.int32), logprobs=top.logprobs_NK.numpy().astype(np.float16),
             indices=top.indices_NK.numpy().astype(np.int32))
    with store.write_artifact(prefix, metadata={"kind": "teacher-topk", **metadata}, overwrite=True) as w:
        w.put_bytes(CACHE_FILE, buf.getvalue())
    return store.uri(prefix)


def read_topk_cache(store, prefix: str) -> tuple[torch.Tensor, TopK] | None:
    """(rows, top-k) of a committed cache, or None when there is none."""
    if not store.artifact_exists(prefix):
        return None
    with np.load(io.BytesIO(store.read_artifact(prefix).get_bytes(CACHE_FILE))) as data:
        rows = torch.from_numpy(data["rows"].astype(np.int64))
        top = TopK(torch.from_numpy(data["logprobs"].astype(np.float32)), torch.from_numpy(data["indices"].astype(np.int64)))
    return rows, top


def teacher_topk_for_pool(store, teacher, *, teacher_uri: str, tokens_uri: str, rows_NT1: torch.Tensor,
                          loss: DistillLossConfig, device="cpu", batch_size: int = 8,
                          write: bool = True) -> tuple[TopK, str, bool]:
    """The pool's top-k from the store cache, computing (and, with ``write``, committing) it when absent.

    Returns (top-k, cache URI, whether it was reused). Only one rank writes (``write``); the others compute
    the same numbers and round them to fp16 exactly as the cache stores them, so every rank trains on the
    same targets. A cache whose rows differ from the pool is a hash collision or a corrupted artefact:
    refused, never used.
    """
    prefix = cache_prefix(teacher_uri, tokens_uri, rows_NT1, loss.top_k, loss.temperature)
    cached = read_topk_cache(store, prefix)
    if cached is not None:
        rows, top = cached
        if not torch.equal(rows, rows_NT1):
            raise RuntimeError(f"teacher top-k cache {store.uri(prefix)} holds other rows than this pool")
        return top, store.uri(prefix), True
    top = compute_topk(teacher, rows_NT1, k=loss.top_k, temperature=loss.temperature, device=device,
                       batch_size=batch_size)
    if write:
        write_topk_cache(store, prefix, rows_NT1, top, {"teacher_uri": teacher_uri, "tokens_uri": tokens_uri,
                                                        "k": loss.top_k, "temperature": loss.temperature,
                                                        "shape": list(rows_NT1.shape)})
    # what the student trains on is what a later run will read: the fp16 round trip, not the fp32 values
    return TopK(top.logprobs_NK.half().float(), top.indices_NK), store.uri(prefix), False


# ------------------------------------------------------------------ objective and evaluation
def distill_step_loss(student, rows_BT1: torch.Tensor, top: TopK, loss: DistillLossConfig, *,
                      with_losses: bool = True):
    """(distillation loss (attached; balancing losses NOT added), model output, metrics) of a micro-batch.

    ``top`` holds the teacher's top-k of the same rows, (B, T, K).
    """
    inputs_BT, labels_BT = rows_BT1[:, :-1], rows_BT1[:, 1:]
    out = student(inputs_BT, with_losses=with_losses)
    V = out.logits.shape[-1]
    flat_top = TopK(top.logprobs_NK.reshape(-1, top.k).to(out.logits.device),
                    top.indices_NK.reshape(-1, top.k).to(out.logits.device))
    d = distill_loss(out.logits.reshape(-1, V), flat_top, labels_BT.reshape(-1), kind=loss.divergence,
                     beta=loss.jsd_beta, temperature=loss.temperature, alpha=loss.alpha, tail=loss.tail)
    return d.loss, out, d.metric_tensors()


class RowPool:
    """Training rows and, in cache mode, the teacher's top-k of each; batches by index for PackedRowLoader."""

    def __init__(self, rows_NT1: torch.Tensor, top: TopK | None) -> None:
        self.rows, self.top = rows_NT1, top

    def __len__(self) -> int:
        return self.rows.shape[0]

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
        out = {"rows": self.rows[idx]}
        if self.top is not None:
            out["topk_logprobs"], out["topk_indices"] = self.top.logprobs_NK[idx], self.top.indices_NK[idx]
        return out


class DistillObjective:
    """The engine-core objective: mean over the micro-batch's target tokens; the teacher scores online
    when the batch carries no cached top-k."""

    def __init__(self, cfg: DistillConfig, teacher=None) -> None:
        self.cfg, self.teacher = cfg, teacher

    def count(self, batch: dict) -> torch.Tensor:
        return torch.tensor(batch["rows"][:, 1:].numel())

    def __call__(self, model, batch: dict) -> ObjectiveOutput:
        rows = batch["rows"]
        if "topk_logprobs" in batch:
            top = TopK(batch["topk_logprobs"].float(), batch["topk_indices"])
        else:
            with torch.no_grad():
                logits = self.teacher(rows[:, :-1]).logits
                flat = teacher_topk(logits.reshape(-1, logits.shape[-1]), self.cfg.top_k, self.cfg.temperature)
                B, T = rows.shape[0], rows.shape[1] - 1
                top = TopK(flat.logprobs_NK.view(B, T, -1), flat.indices_NK.view(B, T, -1))
        loss, out, metrics = distill_step_loss(model, rows, top, self.cfg)
        aux = {k: out.aux[k] for k in ("tokens_per_expert", "router_entropy") if k in out.aux}
        if out.terms.get("balance_loss") is not None:
            aux["balance_loss"] = out.terms["balance_loss"]
        return ObjectiveOutput(loss, aux, metrics)


@torch.no_grad()
def teacher_logprobs(teacher, rows_NT1: torch.Tensor, *, batch_size: int = 8, device="cpu") -> torch.Tensor:
    """Full-vocabulary log-probs of the teacher at every input position, (N, T, V) fp32 on the CPU."""
    teacher.eval()
    out = []
    for start in range(0, rows_NT1.shape[0], batch_size):
        logits = teacher(rows_NT1[start:start + batch_size, :-1].to(device)).logits
        out.append(F.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_student(student, rows_NT1: torch.Tensor, teacher_logp_NTV: torch.Tensor, *, batch_size: int = 8,
                     device="cpu") -> dict[str, float]:
    """Held-out ``kl_to_teacher`` (exact KL(teacher ‖ student) per token, T = 1) and ``val_loss``."""
    was_training = student.training
    student.eval()
    kl_sum = nll_sum = 0.0
    count = 0
    for start in range(0, rows_NT1.shape[0], batch_size):
        rows = rows_NT1[start:start + batch_size].to(device)
        logp_s = F.log_softmax(student(rows[:, :-1]).logits.float(), dim=-1)
        logp_t = teacher_logp_NTV[start:start + batch_size].to(device)
        kl_sum += float((logp_t.exp() * (logp_t - logp_s)).sum())
        nll_sum += float(-logp_s.gather(-1, rows[:, 1:, None]).sum())
        count += rows[:, 1:].numel()
    student.train(was_training)
    return {"kl_to_teacher": kl_sum / count, "val_loss": nll_sum / count}


# ------------------------------------------------------------------ the builder (every rank, and the driver)
def _rows(tokens_uri: str, split: str, num_rows: int, seq_len: int, seed: int, shuffle: bool) -> torch.Tensor:
    """``num_rows`` packed rows (BOS-aligned, ``seq_len + 1`` tokens) of a split, deterministic by seed."""
    from moeflow.platform.data.shards import TokenDataset
    from moeflow.platform.train.loader import PackedLoader

    ds = TokenDataset.open(tokens_uri, split)
    loader = PackedLoader(ds, seq_len=seq_len, batch_size=1, seed=seed, shuffle=shuffle, prefetch=0)
    rows, pieces = [], loader.rows(epoch=0)
    for _ in range(num_rows):
        row = next(pieces, None)
        if row is None:
            break
        rows.append(torch.from_numpy(loader.read_row(row)))
    if not rows:
        raise ValueError(f"{tokens_uri}: the {split} split has no row of {seq_len + 1} tokens")
    return torch.stack(rows)


def build_distill(job: PostTrainJob, base, tokenizer, ctx) -> StageParts:
    cfg = DistillConfig.model_validate(job.config)
    torch.manual_seed(cfg.seed)  # the student's init: the same on every rank, the driver and on resume
    student = MoETransformer(cfg.student_config(base.cfg))
    parts = StageParts(student, cfg)
    if ctx is None:  # the driver: export only
        return parts
    from moeflow.platform.train.distributed import open_store

    store = open_store(job.store_uri)
    tokens_uri = job.data_uris["tokens"]
    teacher = base.to(ctx.device).eval().requires_grad_(False)
    pool = _rows(tokens_uri, "train", cfg.pool_rows, cfg.seq_len, cfg.seed, shuffle=True)
    heldout = _rows(tokens_uri, "val", cfg.eval_rows, cfg.seq_len, cfg.seed, shuffle=False)
    held_logp = teacher_logprobs(teacher, heldout, batch_size=cfg.eval_batch_size, device=ctx.device)
    if cfg.teacher_logits == "cache":
        top, cache_uri, reused = teacher_topk_for_pool(store, teacher, teacher_uri=job.model_uri, tokens_uri=tokens_uri,
                                                       rows_NT1=pool, loss=cfg, device=ctx.device,
                                                       batch_size=cfg.eval_batch_size, write=ctx.rank == 0)
        log.info("distill: teacher top-%d of %d rows %s %s", cfg.top_k, len(pool), "reused from" if reused else
                 "cached at", cache_uri)
        parts.loader = PackedRowLoader(RowPool(pool, top), batch_size=cfg.micro_batch_size, seed=cfg.seed,
                                       rank=ctx.rank, world_size=ctx.world_size)
        parts.objective = DistillObjective(cfg)
        del teacher  # not needed again: the update sees only the student
    else:
        parts.loader = PackedRowLoader(RowPool(pool, None), batch_size=cfg.micro_batch_size, seed=cfg.seed,
                                       rank=ctx.rank, world_size=ctx.world_size)
        parts.objective = DistillObjective(cfg, teacher)

    def evaluate(m) -> dict[str, float]:
        return evaluate_student(m, heldout, held_logp, batch_size=cfg.eval_batch_size,
                                device=next(m.parameters()).device)

    parts.evaluate = evaluate
    return parts


# ------------------------------------------------------------------ the library entry
class DistillResult(StageResult):
    pass


def run_distill(config: DistillConfig | dict, store, *, model_uri: str, data_uri: str, output_prefix: str,
                tracker=None, catalog=None, parent_model_id: str | None = None, model_name: str = "moe-distill",
                run_name: str = "distill", num_workers: int = 1, use_gpu: bool = False,
                extra_job: dict | None = None) -> DistillResult:
    """Distil the teacher ``model_uri`` (an HF export) into a new student on the token shards at ``data_uri``."""
    cfg = config if isinstance(config, DistillConfig) else DistillConfig.model_validate(config)
    job = PostTrainJob(stage="distill", builder=BUILDER, config=cfg.to_dict(), model_uri=model_uri,
                       output_prefix=output_prefix, data_uris={"tokens": data_uri}, parent_model_id=parent_model_id,
                       model_name=model_name, run_name=run_name, **(extra_job or {}))
    result = run_posttrain(job, store, tracker=tracker, catalog=catalog, num_workers=num_workers, use_gpu=use_gpu)
    return DistillResult.from_posttrain(result)
