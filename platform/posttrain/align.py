"""The align stage, ``method: dpo``: preference pairs + a model version -> a policy tuned by DPO / IPO / cDPO.

The reference is the input model version. Its log-probs of every training and held-out completion are
computed ONCE, before the first update, and written to the store (``<output_prefix>/reference``, an
atomic artefact, reused on resume); the reference model is then dropped, so only the policy (and its
optimiser) is in memory during the update. For the held-out KL(π ‖ π_ref) the reference's full
log-softmax at the held-out chosen reply positions is kept as well (``kl_pairs`` pairs; small).

Headline figures, on held-out pairs, before and after training (before = the reference itself):

* ``reward_accuracy``: share of pairs whose implicit reward β·(logπ − logπ_ref) is higher for the chosen
  reply (0 before training: every pair ties, and ties lose);
* ``reward_margin``: mean implicit-reward margin (0 before);
* ``logp_accuracy``: share of pairs where the policy itself gives the chosen reply a higher per-token
  log-prob (the reference's own preference before training; no β, no reference);
* ``kl_to_reference``: exact per-token KL(π ‖ π_ref) over the vocabulary on the held-out chosen replies.

Shape suffixes: P pairs, R rows (2 per pair), N reply positions, V vocabulary.
"""

from __future__ import annotations

import io
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from moeflow.models.align import pairs as P
from moeflow.models.align.dpo import pair_logprobs, policy_reference_kl, preference_loss, sequence_logprobs
from moeflow.platform.config import StageConfig

log = logging.getLogger(__name__)

REFERENCE_DIR = "reference"
REFERENCE_FILE = "reference.pt"


class DPOLossConfig(StageConfig):
    """The preference loss (see ``moeflow.models.align.dpo``)."""

    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid = DPO (with label_smoothing: cDPO); "
                                                                  "ipo = identity preference optimisation")
    beta: float = Field(0.1, gt=0.0, le=10.0, description="β: strength of the pull towards the reference "
                                                           "(DPO's KL coefficient; IPO's target margin is 1/(2β))")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="cDPO: assumed probability that a pair's "
                                                                    "label is flipped (sigmoid loss only)")
    average_log_prob: bool = Field(False, description="use per-token mean completion log-probs instead of sums "
                                                      "(IPO's convention; makes long and short replies comparable)")


# ------------------------------------------------------------------ reference log-probs, computed once
@torch.no_grad()
def reference_logprobs(model, pairs: P.PairSet, *, average: bool, batch_size: int = 8, device="cpu") -> torch.Tensor:
    """(P, 2) fp32: the reference's completion log-probs of each pair's chosen and rejected reply."""
    was_training = model.training
    model.eval()
    out = []
    for batch in pairs.batches(batch_size):
        logps_R, _ = pair_logprobs(model, {k: v.to(device) for k, v in batch.items()}, average=average)
        B = P.num_pairs(batch)
        out.append(torch.stack([logps_R[:B], logps_R[B:]], dim=1).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


@torch.no_grad()
def reference_reply_logprobs(model, pairs: P.PairSet, *, batch_size: int = 8, device="cpu") -> list[torch.Tensor]:
    """The reference's log-softmax at the chosen replies' target positions, one (N_b, V) tensor per batch
    of ``pairs.batches(batch_size)`` — what ``kl_to_reference`` compares the policy with."""
    was_training = model.training
    model.eval()
    out = []
    for batch in pairs.batches(batch_size):
        logits_RTV, mask_RT = _chosen_reply_logits(model, batch, device)
        out.append(F.log_softmax(logits_RTV[mask_RT].float(), dim=-1).cpu())
    model.train(was_training)
    return out


def _chosen_reply_logits(model, batch, device):
    B = P.num_pairs(batch)
    ids = batch["input_ids"][:B].to(device)
    targets = P.targets({k: v[:B] for k, v in batch.items() if k in ("input_ids", "loss_mask")}).to(device)
    return model(ids[:, :-1]).logits, targets != P.IGNORE_INDEX


def save_reference(store, prefix: str, train_ref: torch.Tensor, heldout_ref: torch.Tensor,
                   heldout_reply_logp: list[torch.Tensor], metadata: dict) -> str:
    buf = io.BytesIO()
    torch.save({"train": train_ref, "heldout": heldout_ref, "heldout_reply_logp": heldout_reply_logp}, buf)
    with store.write_artifact(prefix, metadata={"kind": "dpo-reference", **metadata}, overwrite=True) as w:
        w.put_bytes(REFERENCE_FILE, buf.getvalue())
    return store.uri(prefix)


def load_reference(store, prefix: str) -> dict | None:
    if not store.artifact_exists(prefix):
        return None
    return torch.load(io.BytesIO(store.read_artifact(prefix).get_bytes(REFERENCE_FILE)), weights_only=True)


# ------------------------------------------------------------------ objective and evaluation
def dpo_step_loss(policy, batch: dict[str, torch.Tensor], loss: DPOLossConfig, *, with_losses: bool = True):
    """(attached loss incl. the balancing losses, model output, metrics) of one micro-batch of pairs."""
    logps_R, out = pair_logprobs(policy, batch, average=loss.average_log_prob, with_losses=with_losses)
    B = P.num_pairs(batch)
    ref_R = batch["ref_logps"].to(logps_R.device)
    pref = preference_loss(logps_R[:B], logps_R[B:], ref_R[:B], ref_R[B:], beta=loss.beta, method=loss.loss,
                           label_smoothing=loss.label_smoothing)
    total = pref.loss
    balance = out.terms.get("balance_loss")
    if balance is not None:
        total = total + balance
    return total, out, pref.metrics()


@torch.no_grad()
def evaluate_preferences(policy, heldout: P.PairSet, reply_ref_logp: list[torch.Tensor], loss: DPOLossConfig, *,
                         batch_size: int = 8, device="cpu") -> dict[str, float]:
    """The held-out headline figures of the module docstring. ``heldout`` carries its reference log-probs."""
    was_training = policy.training
    policy.eval()
    chosen, rejected, own_c, own_r, kls, kl_weights = [], [], [], [], [], []
    for b, batch in enumerate(heldout.batches(batch_size)):
        batch = {k: v.to(device) for k, v in batch.items()}
        B = P.num_pairs(batch)
        out = policy(batch["input_ids"][:, :-1])
        targets_RT = P.targets(batch)
        total_R, count_R = sequence_logprobs(out.logits, targets_RT)
        mean_R = total_R / count_R.clamp_min(1)
        logps_R = mean_R if loss.average_log_prob else total_R
        ref_R = batch["ref_logps"]
        chosen.append(loss.beta * (logps_R[:B] - ref_R[:B]))
        rejected.append(loss.beta * (logps_R[B:] - ref_R[B:]))
        own_c.append(mean_R[:B])
        own_r.append(mean_R[B:])
        reply_logits = out.logits[:B][targets_RT[:B] != P.IGNORE_INDEX]
        ref_logp = reply_ref_logp[b].to(device)
        kls.append(policy_reference_kl(reply_logits, ref_logp) * ref_logp.shape[0])
        kl_weights.append(ref_logp.shape[0])
    policy.train(was_training)
    chosen_P, rejected_P = torch.cat(chosen), torch.cat(rejected)
    return {"reward_accuracy": float((chosen_P > rejected_P).float().mean()),
            "reward_margin": float((chosen_P - rejected_P).mean()),
            "rewards_chosen": float(chosen_P.mean()), "rewards_rejected": float(rejected_P.mean()),
            "logp_accuracy": float((torch.cat(own_c) > torch.cat(own_r)).float().mean()),
            "kl_to_reference": float(sum(kls) / max(1, sum(kl_weights))),
            "pairs": float(len(chosen_P))}
