"""The reward model: a scalar head on our causal LM, and the Bradley–Terry pairwise loss that trains it.

``RewardModel`` keeps the whole ``MoETransformer`` (initialised from a model version, so its weights
and its HF export stay the LM's) and adds ``score``, a linear map from the final-normed hidden state of
the *last real token* of a sequence to one number. Sequences are right-padded: with causal attention a
real token never sees the padding after it, so the plain causal forward (the fast path) is exact and
only the gather position depends on the length.

Bradley–Terry with an optional margin m (per pair, e.g. from preference strength) and the centring term
of TRL's ``center_rewards_coefficient`` (keeps rewards near 0, since BT only fixes their differences):

    L = mean_pairs[ −log σ(r_c − r_r − m) ] + c · mean_pairs[ (r_c + r_r)² ]

Judged by pairwise accuracy (r_c > r_r strictly; ties lose) and the mean margin r_c − r_r.

Optional likelihood input (``likelihood_feature``): the head also reads the LM's own mean log-probability
of the reply, ``r = w·h_last + b + a · mean_{t ∈ reply} log π(y_t | y_<t)``, with ``a`` learned from 1: a fresh
model ranks replies by the input policy's own likelihood (plus the small random head), and training
corrects that judgement. (From 0, Adam moves the one scalar by about lr per step: at reward-model
learning rates it never reaches the scale of the head — measured.) Why: the policy a reward model starts from often
*knows* the better reply token by token — a small SFT model ranks held-out wrong-number pairs by its
own likelihood far better than chance — but that knowledge lives in its next-token predictions, and a
small model's last hidden state cannot re-derive "did each token match what I predicted" (measured in
``tests/test_posttrain_reward.py``). The reply is every token after the last ``<|assistant|>`` marker
(``reply_start_id``) up to the row's length, so the forward needs no mask and callers (RL, evaluation)
pass ``(input_ids, lengths)`` as before. Length-normalised (a mean), so a shorter reply gains nothing.

Shape suffixes: B sequences (or pairs), T tokens, D hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

HEAD_FILE = "reward_head.pt"


@dataclass
class RewardLoss:
    loss: torch.Tensor          # () attached
    accuracy: torch.Tensor      # () detached
    margin: torch.Tensor        # () detached, mean r_c − r_r

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """Detached 0-d tensors (a training loop logs them without a host sync per step)."""
        return {"accuracy": self.accuracy, "margin": self.margin}

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach()), "accuracy": float(self.accuracy), "margin": float(self.margin)}


def bradley_terry_loss(rewards_chosen_B: torch.Tensor, rewards_rejected_B: torch.Tensor, *,
                       margin: float | torch.Tensor = 0.0, centering: float = 0.0) -> RewardLoss:
    """The pairwise loss above; ``margin`` is a number or a (B,) tensor."""
    if centering < 0:
        raise ValueError(f"centering={centering}: must be >= 0")
    r_c, r_r = rewards_chosen_B.float(), rewards_rejected_B.float()
    diff_B = r_c - r_r
    loss = -F.logsigmoid(diff_B - margin).mean()
    if centering:
        loss = loss + centering * ((r_c + r_r) ** 2).mean()
    return RewardLoss(loss=loss, accuracy=(diff_B > 0).float().mean().detach(), margin=diff_B.mean().detach())


def last_token_index(lengths_B: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Index of the last real token of each right-padded row, (B,); a length outside [1, T] is an error."""
    if bool(((lengths_B < 1) | (lengths_B > seq_len)).any()):
        raise ValueError(f"sequence lengths must be in [1, {seq_len}], got {lengths_B.tolist()}")
    return lengths_B.long() - 1


@dataclass
class RewardOutput:
    rewards_B: torch.Tensor                                   # fp32
    balance_loss: torch.Tensor | None = None                  # attached MoE balancing losses (when asked)
    aux: dict = field(default_factory=dict)                   # the LM's router statistics


def reply_mean_logprob(lm: nn.Module, input_ids_BT: torch.Tensor, hidden_BTD: torch.Tensor, lengths_B: torch.Tensor,
                       reply_start_id: int) -> torch.Tensor:
    """(B,) fp32: the LM's mean log-probability of each row's reply (the tokens after the row's last
    ``reply_start_id`` and before its length), from the final-normed hidden states ``hidden_BTD``.
    Only reply positions go through the LM head. A row without the marker counts every token after the first."""
    B, T = input_ids_BT.shape
    pos_BT = torch.arange(T, device=input_ids_BT.device).expand(B, T)
    real_BT = pos_BT < lengths_B[:, None]
    start_B = torch.where((input_ids_BT == reply_start_id) & real_BT, pos_BT, 0).amax(dim=1)
    reply_BT = (pos_BT > start_B[:, None]) & real_BT           # tokens scored; position p is predicted at p − 1
    pred_mask_BT = reply_BT[:, 1:]                             # (B, T − 1), aligned with hidden[:, :-1]
    logits_ND = lm.lm_head(hidden_BTD[:, :-1][pred_mask_BT]).float()
    logp_N = torch.log_softmax(logits_ND, dim=-1).gather(-1, input_ids_BT[:, 1:][pred_mask_BT][:, None])[:, 0]
    row_N = torch.arange(B, device=input_ids_BT.device)[:, None].expand(B, T - 1)[pred_mask_BT]
    total_B = torch.zeros(B, device=logp_N.device).index_add(0, row_N, logp_N)
    return total_B / pred_mask_BT.sum(dim=1).clamp_min(1)


class RewardModel(nn.Module):
    """``lm`` (a ``MoETransformer``) + ``score`` (D → 1) on the last real token's final hidden state
    (+ ``likelihood_weight`` × the reply's mean log-probability when ``reply_start_id`` is given)."""

    def __init__(self, lm: nn.Module, *, reply_start_id: int | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.cfg = lm.cfg
        hidden = lm.cfg.hidden_size
        self.score = nn.Linear(hidden, 1)
        # small head: initial rewards ≈ 0 with unit-scale gradients (OpenRLHF/TRL use std 1/(D+1))
        nn.init.normal_(self.score.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.score.bias)
        self.reply_start_id = reply_start_id
        # from 1: start from the policy's own judgement (see the module docstring)
        self.likelihood_weight = nn.Parameter(torch.ones(())) if reply_start_id is not None else None

    def routers(self):
        return self.lm.routers()

    def apply_router_bias_update(self, counts_LE: torch.Tensor, gamma: float | None = None) -> None:
        self.lm.apply_router_bias_update(counts_LE, gamma)

    def forward(self, input_ids_BT: torch.Tensor, lengths_B: torch.Tensor, *, with_losses: bool = False) -> RewardOutput:
        out = self.lm(input_ids_BT, last_logits_only=True, return_hidden=True,
                      **({"with_losses": True} if with_losses else {}))
        idx_B = last_token_index(lengths_B.to(input_ids_BT.device), input_ids_BT.shape[1])
        last_BD = out.hidden[torch.arange(input_ids_BT.shape[0], device=input_ids_BT.device), idx_B]
        rewards_B = self.score(last_BD.to(self.score.weight.dtype)).squeeze(-1).float()
        if self.likelihood_weight is not None:
            lengths_B = lengths_B.to(input_ids_BT.device)
            rewards_B = rewards_B + self.likelihood_weight.float() * reply_mean_logprob(
                self.lm, input_ids_BT, out.hidden, lengths_B, self.reply_start_id)
        return RewardOutput(rewards_B, out.terms.get("balance_loss") if with_losses else None, out.aux)

    def head_state(self) -> dict:
        """The head alone (the LM part is saved and exported like any model version)."""
        state = {"weight": self.score.weight.detach().cpu().clone(), "bias": self.score.bias.detach().cpu().clone(),
                 "hidden_size": self.cfg.hidden_size}
        if self.likelihood_weight is not None:
            state.update(likelihood_weight=self.likelihood_weight.detach().cpu().clone(),
                         reply_start_id=int(self.reply_start_id))
        return state

    def load_head_state(self, state: dict) -> None:
        if int(state["hidden_size"]) != self.cfg.hidden_size:
            raise ValueError(f"reward head is for hidden size {state['hidden_size']}, model has {self.cfg.hidden_size}")
        if ("likelihood_weight" in state) != (self.likelihood_weight is not None):
            raise ValueError("reward head and model disagree on the likelihood input (build the model with "
                             "reply_start_id=state['reply_start_id'] when the state has one)")
        with torch.no_grad():
            self.score.weight.copy_(state["weight"])
            self.score.bias.copy_(state["bias"])
            if self.likelihood_weight is not None:
                self.likelihood_weight.copy_(state["likelihood_weight"])
