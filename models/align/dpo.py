"""Direct preference optimisation: completion log-probs, the DPO / IPO / conservative-DPO losses, and
the implicit rewards, margins and accuracy they are judged by.

The policy is trained on pairs (prompt, chosen, rejected). With the per-sequence log-probability of the
completion tokens under the policy (``logp``) and under the frozen reference (``ref``),

    h = (logp_c − ref_c) − (logp_r − ref_r)                       the log-ratio margin
    sigmoid (DPO, Rafailov et al. 2023):  L = −log σ(β·h)
    cDPO / label smoothing ε (Mitchell 2023; TRL's ``label_smoothing``):
                                          L = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)
    ipo (Azar et al. 2023):               L = (h − 1/(2β))²

averaged over pairs. The implicit reward of a completion is β·(logp − ref); a pair is "won" when the
chosen reward is strictly greater than the rejected one (ties lose, as in TRL). IPO's paper and TRL use
length-averaged log-probs; which one a caller passes is its choice (``sequence_logprobs`` returns the
sum and the token count, so both are one division apart).

Reference log-probs are plain numbers here: the engine computes them once, before training, with the
reference model, and frees it — no second model is held during the update.

``pair_logprobs`` applies a model to a ``pairs.collate`` batch (chosen rows first, then rejected).

``policy_reference_kl`` is the exact per-token KL(π ‖ π_ref) over the whole vocabulary at given
positions, the "how far did we drift" figure logged beside the preference metrics.

Shape suffixes: B sequences (or pairs), T tokens, V vocabulary, N selected positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import pairs

IGNORE_INDEX = -100
METHODS = ("sigmoid", "ipo")


def sequence_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target) over counted tokens, number of counted tokens), both (B,).

    ``targets_BT`` are next-token ids aligned with the logits (targets[t] is predicted by logits[t]);
    ``-100`` marks a token that does not count (prompt, padding). Computed in fp32 through the fused
    cross-entropy, so the (B, T, V) log-softmax is never materialised.
    """
    B, T, V = logits_BTV.shape
    token_nll = F.cross_entropy(logits_BTV.reshape(B * T, V).float(), targets_BT.reshape(B * T),
                                ignore_index=IGNORE_INDEX, reduction="none").view(B, T)
    counted_BT = targets_BT != IGNORE_INDEX
    return -(token_nll * counted_BT).sum(dim=1), counted_BT.sum(dim=1)


@dataclass
class PreferenceLoss:
    loss: torch.Tensor              # () mean over pairs, attached
    losses_B: torch.Tensor          # per pair, attached
    chosen_rewards_B: torch.Tensor  # β·(logp_c − ref_c), detached
    rejected_rewards_B: torch.Tensor

    @property
    def margins_B(self) -> torch.Tensor:
        return self.chosen_rewards_B - self.rejected_rewards_B

    @property
    def accuracy(self) -> torch.Tensor:
        return (self.chosen_rewards_B > self.rejected_rewards_B).float().mean()

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """Detached 0-d tensors (a training loop logs them without a host sync per step)."""
        return {"rewards/chosen": self.chosen_rewards_B.mean(), "rewards/rejected": self.rejected_rewards_B.mean(),
                "rewards/margin": self.margins_B.mean(), "rewards/accuracy": self.accuracy}

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach()), **{k: float(v) for k, v in self.metric_tensors().items()}}


def preference_loss(policy_chosen_B: torch.Tensor, policy_rejected_B: torch.Tensor, ref_chosen_B: torch.Tensor,
                    ref_rejected_B: torch.Tensor, *, beta: float = 0.1, method: str = "sigmoid",
                    label_smoothing: float = 0.0) -> PreferenceLoss:
    """The DPO-family loss of a batch of pairs (see the module docstring for the formulas)."""
    if beta <= 0:
        raise ValueError(f"beta={beta}: must be > 0")
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {METHODS}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: must be in [0, 0.5)")
    if method == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid (DPO) loss only, not to ipo")
    chosen_logratio_B = policy_chosen_B.float() - ref_chosen_B.float()
    rejected_logratio_B = policy_rejected_B.float() - ref_rejected_B.float()
    h_B = chosen_logratio_B - rejected_logratio_B
    if method == "sigmoid":
        losses_B = -(1.0 - label_smoothing) * F.logsigmoid(beta * h_B)
        if label_smoothing:
            losses_B = losses_B - label_smoothing * F.logsigmoid(-beta * h_B)
    else:  # ipo: regress the log-ratio margin onto 1/(2β)
        losses_B = (h_B - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLoss(loss=losses_B.mean(), losses_B=losses_B,
                          chosen_rewards_B=(beta * chosen_logratio_B).detach(),
                          rejected_rewards_B=(beta * rejected_logratio_B).detach())


def policy_reference_kl(policy_logits_NV: torch.Tensor, ref_logprobs_NV: torch.Tensor) -> torch.Tensor:
    """Mean over N positions of KL(π ‖ π_ref) = Σ_v π(v)·(log π(v) − log π_ref(v)); () fp32.

    ``ref_logprobs_NV`` are the reference's log-softmax at the same positions (cached once, so the
    reference model need not be resident). 0 when N = 0.
    """
    if policy_logits_NV.shape[0] == 0:
        return policy_logits_NV.new_zeros((), dtype=torch.float32)
    logp_NV = F.log_softmax(policy_logits_NV.float(), dim=-1)
    kl_N = (logp_NV.exp() * (logp_NV - ref_logprobs_NV.float())).sum(dim=-1)
    return kl_N.mean()


def pair_logprobs(model, batch: dict[str, torch.Tensor], *, average: bool = False, with_losses: bool = False):
    """(completion log-probs (2B,) fp32 — sums, or per-token means with ``average`` —, the model output).

    One forward over ``input_ids[:, :-1]`` of the 2B rows; plain causal attention is exact because the
    rows are right-padded (a real token never attends to the padding after it).
    """
    out = model(batch["input_ids"][:, :-1], with_losses=with_losses)
    total_R, count_R = sequence_logprobs(out.logits, pairs.targets(batch))
    if average:
        total_R = total_R / count_R.clamp_min(1)
    return total_R, out
