"""The reward stage: preference pairs + a model version -> a Bradley–Terry reward model, exported for RL/eval.

The reward model is the input model version with a scalar head (``models.align.reward.RewardModel``)
on the last real token of ``prompt + reply`` (that token is the reply's closing ``<|end|>``). Both
sides of a batch of pairs go through one forward (chosen rows first).

Headline figures on held-out pairs, before (the freshly initialised head) and after training:
``accuracy`` (share of pairs with r_c > r_r) and ``margin`` (mean r_c − r_r).

Shape suffixes: P pairs, R rows (2 per pair).
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from moeflow.models.align import pairs as P
from moeflow.models.align.reward import bradley_terry_loss
from moeflow.platform.config import StageConfig

log = logging.getLogger(__name__)


class BTLossConfig(StageConfig):
    """The Bradley–Terry loss (see ``moeflow.models.align.reward``)."""

    margin: float = Field(0.0, ge=0.0, le=10.0, description="m in −log σ(r_c − r_r − m): demand a reward gap")
    centering: float = Field(0.0, ge=0.0, le=1.0, description="c · mean((r_c + r_r)²): keeps rewards centred "
                                                              "near 0 (TRL's center_rewards_coefficient, e.g. 0.01)")


def reward_step_loss(model, batch: dict[str, torch.Tensor], loss: BTLossConfig, *, with_losses: bool = True):
    """(attached loss incl. the balancing losses, reward output, metrics) of one micro-batch of pairs."""
    out = model(batch["input_ids"], batch["lengths"], with_losses=with_losses)
    B = P.num_pairs(batch)
    bt = bradley_terry_loss(out.rewards_B[:B], out.rewards_B[B:], margin=loss.margin, centering=loss.centering)
    total = bt.loss if out.balance_loss is None else bt.loss + out.balance_loss
    return total, out, bt.metrics()


@torch.no_grad()
def evaluate_rewards(model, heldout: P.PairSet, *, batch_size: int = 8, device="cpu") -> dict[str, float]:
    """Held-out pairwise ``accuracy`` and mean ``margin`` (plus the mean rewards of each side)."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for batch in heldout.batches(batch_size):
        rewards_R = model(batch["input_ids"].to(device), batch["lengths"].to(device)).rewards_B
        B = P.num_pairs(batch)
        chosen.append(rewards_R[:B].cpu())
        rejected.append(rewards_R[B:].cpu())
    model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"accuracy": float((c > r).float().mean()), "margin": float((c - r).mean()),
            "reward_chosen": float(c.mean()), "reward_rejected": float(r.mean()), "pairs": float(len(c))}
