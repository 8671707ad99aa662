"""Knowledge distillation on the teacher's top-k logits: forward KL, reverse KL, generalised JSD, mixed
with the hard-label cross-entropy.

What the teacher contributes per token is its top-k (log-prob, id) pairs at temperature T — what the
engine caches to the store (``TopK``) or computes on the fly; the full (N, V) teacher distribution is
never needed. The log-probs are normalised over the *whole* vocabulary before the cut, so the mass the
top-k leave out (the tail) is known: 1 − Σ_k p_k.

How the tail is handled (``tail``):

* ``"bucket"`` (default): one extra class holds the tail. Teacher and student become proper
  distributions over k + 1 classes (the top-k ids, then "everything else"); the student's tail is
  1 − Σ_k q_k of its full softmax. Every divergence below is then an exact divergence between these
  coarse-grained distributions: a lower bound of the full-vocabulary one (data processing), equal to
  it when k = V, and the student is not pushed to put zero mass outside the teacher's top-k.
* ``"renormalize"``: the teacher is renormalised over its top-k (its tail counted as 0); the student
  keeps its full-vocabulary log-probs at those ids (not renormalised). Forward KL is then the sparse-KD
  objective Σ_k p̃_k·(log p̃_k − log q_k) ≥ 0, which also drives the student's tail mass to 0 (veRL-style
  top-k distillation). Only the forward KL is defined in this mode.

Divergences (over the classes C above, per token, then averaged over counted tokens):

    forward KL   KL(P ‖ Q)  = Σ p·(log p − log q)       mode-covering; the classic KD loss
    reverse KL   KL(Q ‖ P)                              mode-seeking
    jsd(β)       β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M),  M = β·P + (1 − β)·Q   (TRL GKD's generalised JSD;
                 β → 0 and β → 1 vanish, so β is in (0, 1); TRL's default 0.5 is the symmetric JSD)

with P the teacher and Q the student, both at temperature T. Temperature convention (Hinton et al.
2015): the divergence is multiplied by T², so its gradient keeps the same scale as T changes.

    loss = α · T² · D(P_T, Q_T) + (1 − α) · CE(student logits at T = 1, hard labels)

Shape suffixes: N tokens, V vocabulary, K teacher top-k, C classes (K or K + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TAILS = ("bucket", "renormalize")
_TINY = 1e-30  # floor of a tail mass (fp32 normal range ends at 1.2e-38)


@dataclass
class TopK:
    """The teacher's top-k per token at temperature T (log-probs over the whole vocabulary)."""

    logprobs_NK: torch.Tensor   # fp32, sorted descending
    indices_NK: torch.Tensor    # int64 token ids

    @property
    def k(self) -> int:
        return int(self.logprobs_NK.shape[-1])


def teacher_topk(teacher_logits_NV: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The k most likely ids of the teacher at temperature T, with their full-softmax log-probs."""
    if not 0 < k <= teacher_logits_NV.shape[-1]:
        raise ValueError(f"k={k}: must be in [1, vocab={teacher_logits_NV.shape[-1]}]")
    logp_NV = F.log_softmax(teacher_logits_NV.float() / temperature, dim=-1)
    values_NK, indices_NK = logp_NV.topk(k, dim=-1)
    return TopK(values_NK, indices_NK)


def _log_tail(log_mass_N: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)): the log of the mass left outside the top-k, given x = log Σ_k p_k ≤ 0.

    ``-expm1`` is exact near x = 0 (a tiny tail); the floor keeps a vanished tail (k = V) finite with a
    zero gradient instead of the −inf · 0 = NaN that torch.where-style guards leak into backward.
    """
    return torch.log(torch.clamp_min(-torch.expm1(log_mass_N.clamp(max=0.0)), _TINY))


def class_logprobs(student_logits_NV: torch.Tensor, teacher: TopK, temperature: float = 1.0,
                   tail: str = "bucket") -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher_logp_NC, student_logp_NC) over the classes ``tail`` defines (module docstring)."""
    if tail not in TAILS:
        raise ValueError(f"tail={tail!r}: must be one of {TAILS}")
    student_full_NV = F.log_softmax(student_logits_NV.float() / temperature, dim=-1)
    student_NK = student_full_NV.gather(-1, teacher.indices_NK)
    teacher_NK = teacher.logprobs_NK.float()
    if tail == "renormalize":
        return teacher_NK - teacher_NK.logsumexp(dim=-1, keepdim=True), student_NK
    teacher_tail_N1 = _log_tail(teacher_NK.logsumexp(dim=-1)).unsqueeze(-1)
    student_tail_N1 = _log_tail(student_NK.logsumexp(dim=-1)).unsqueeze(-1)
    return torch.cat([teacher_NK, teacher_tail_N1], -1), torch.cat([student_NK, student_tail_N1], -1)


def _kl_NC(p_log_NC: torch.Tensor, q_log_NC: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per row; classes with p = 0 contribute 0 (also where q = 0)."""
    p_NC = p_log_NC.exp()
    diff_NC = torch.where(p_NC > 0, p_log_NC - q_log_NC, torch.zeros_like(p_log_NC))
    return (p_NC * diff_NC).sum(dim=-1)


def divergence(teacher_logp_NC: torch.Tensor, student_logp_NC: torch.Tensor, kind: str = "forward_kl",
               beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence (N,) between teacher P and student Q given as log-probs over C classes."""
    if kind == "forward_kl":
        return _kl_NC(teacher_logp_NC, student_logp_NC)
    if kind == "reverse_kl":
        return _kl_NC(student_logp_NC, teacher_logp_NC)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta={beta}: must be in (0, 1) (the limits vanish; use forward_kl/reverse_kl)")
        mix_NC = torch.logaddexp(teacher_logp_NC + math.log(beta), student_logp_NC + math.log(1.0 - beta))
        return beta * _kl_NC(teacher_logp_NC, mix_NC) + (1.0 - beta) * _kl_NC(student_logp_NC, mix_NC)
    raise ValueError(f"divergence kind={kind!r}: must be one of {DIVERGENCES}")


@dataclass
class DistillLoss:
    loss: torch.Tensor        # () attached: α·T²·D + (1 − α)·CE
    divergence: torch.Tensor  # () detached, mean D over counted tokens (at T, without the T² factor)
    hard_loss: torch.Tensor   # () detached, mean CE on the hard labels

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """Detached 0-d tensors (a training loop logs them without a host sync per step)."""
        return {"divergence": self.divergence, "hard_loss": self.hard_loss}

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach()), **{k: float(v) for k, v in self.metric_tensors().items()}}


def distill_loss(student_logits_NV: torch.Tensor, teacher: TopK, labels_N: torch.Tensor, *,
                 kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0, alpha: float = 0.5,
                 tail: str = "bucket") -> DistillLoss:
    """The mixed distillation objective over N tokens; labels −100 are excluded from both terms.

    ``teacher`` holds the top-k of the same N positions (computed at the same ``temperature``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must be in [0, 1]")
    if tail == "renormalize" and kind != "forward_kl":
        raise ValueError(f"tail='renormalize' defines only forward_kl (got {kind!r}); use tail='bucket'")
    counted_N = labels_N != IGNORE_INDEX
    num = counted_N.sum().clamp_min(1)
    t_log, s_log = class_logprobs(student_logits_NV, teacher, temperature, tail)
    div_N = divergence(t_log, s_log, kind, beta)
    div = (div_N * counted_N).sum() / num
    hard = F.cross_entropy(student_logits_NV.float(), labels_N, ignore_index=IGNORE_INDEX, reduction="sum") / num
    loss = alpha * temperature ** 2 * div + (1.0 - alpha) * hard
    return DistillLoss(loss=loss, divergence=div.detach(), hard_loss=hard.detach())
