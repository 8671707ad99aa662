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

from moeflow.models.align.distill import TopK, distill_loss, teacher_topk
from moeflow.platform.config import StageConfig, config_hash

log = logging.getLogger(__name__)

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
                          loss: DistillLossConfig, device="cpu", batch_size: int = 8) -> tuple[TopK, str, bool]:
    """The pool's top-k from the store cache, computing and committing it first when absent.

    Returns (top-k, cache URI, whether it was reused). A cache whose rows differ from the pool is a
    hash collision or a corrupted artefact: refused, never used.
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
    uri = write_topk_cache(store, prefix, rows_NT1, top, {"teacher_uri": teacher_uri, "tokens_uri": tokens_uri,
                                                          "k": loss.top_k, "temperature": loss.temperature,
                                                          "shape": list(rows_NT1.shape)})
    # what the student trains on is what a later run will read: the fp16 round trip, not the fp32 values
    return read_topk_cache(store, prefix)[1], uri, False


# ------------------------------------------------------------------ objective and evaluation
def distill_step_loss(student, rows_BT1: torch.Tensor, top: TopK, loss: DistillLossConfig, *,
                      with_losses: bool = True):
    """(attached loss incl. the student's balancing losses, model output, metrics) of one micro-batch.

    ``top`` holds the teacher's top-k of the same rows, (B, T, K).
    """
    inputs_BT, labels_BT = rows_BT1[:, :-1], rows_BT1[:, 1:]
    out = student(inputs_BT, with_losses=with_losses)
    V = out.logits.shape[-1]
    flat_top = TopK(top.logprobs_NK.reshape(-1, top.k).to(out.logits.device),
                    top.indices_NK.reshape(-1, top.k).to(out.logits.device))
    d = distill_loss(out.logits.reshape(-1, V), flat_top, labels_BT.reshape(-1), kind=loss.divergence,
                     beta=loss.jsd_beta, temperature=loss.temperature, alpha=loss.alpha, tail=loss.tail)
    total = d.loss
    balance = out.terms.get("balance_loss")
    if balance is not None:
        total = total + balance
    return total, out, d.metrics()


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
