"""Online RL maths (PPO and GRPO): advantages, clipped objectives, KL estimators, reward shaping, loss
normalisations. Pure torch on tensors, no model and no loop (the loop is ``platform/posttrain/rl.py``).

Conventions (the ones OpenRLHF, veRL and TRL share; see ``shared/REFERENCES.md``):

* per-token tensors are (B, T) over the *completion* positions of right-padded rows, with a 0/1 (or bool)
  ``mask_BT`` marking real completion tokens; every function ignores what the mask excludes;
* losses are returned per token, un-reduced; ``aggregate`` reduces them with a *named* normalisation and
  returns a ``(total, count)`` pair, so a loss split over micro-batches and data-parallel ranks adds up to
  exactly the full-batch value (Σ totals / Σ counts; the post-training engine weights micro-batch m by
  count_m / global count — see ``PostTrainer``);
* the KL estimators are of KL(π ‖ π_ref) from samples of π: with r = log π − log π_ref,
  k1 = r (unbiased, can be negative), k2 = r²/2, k3 = exp(−r) − 1 + r (unbiased, ≥ 0, low variance;
  Schulman's "Approximating KL divergence"). r is clamped to ±20 and k3 to ≤ 10 so one token whose
  probability collapsed cannot produce inf/NaN (veRL clamps the same way).

Shape suffixes: B sequences (rows), T completion positions, N prompts (groups), G samples per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
LossNormalisation = Literal["sequence_mean", "token_mean", "token_sum_const"]
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


# ------------------------------------------------------------------ advantages
def gae(rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's masked positions: (advantages, returns).

    δ_t = r_t + γ·V_{t+1} − V_t (V after the last real token is 0: the episode ends there),
    A_t = δ_t + γλ·A_{t+1}; returns = A + V (the value target). Masked positions get 0 and do not
    bridge: a position's successor is the next *real* position of the same row.
    """
    mask = mask_BT.to(rewards_BT.dtype)
    B, T = rewards_BT.shape
    adv_BT = torch.zeros_like(rewards_BT)
    next_value_B = rewards_BT.new_zeros(B)
    next_adv_B = rewards_BT.new_zeros(B)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
        a_B = delta_B + gamma * lam * next_adv_B
        adv_BT[:, t] = a_B * m
        # a masked position passes its successor's value and advantage through unchanged
        next_value_B = torch.where(m > 0, values_BT[:, t], next_value_B)
        next_adv_B = torch.where(m > 0, a_B, next_adv_B)
    return adv_BT, (adv_BT + values_BT) * mask


def group_advantages(rewards_NG: torch.Tensor, *, normalise_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each sample's reward minus its group's mean, divided by the group's std (unbiased, as TRL and
    veRL) when ``normalise_std``; Dr.GRPO (``normalise_std=False``) keeps the plain difference, which does
    not up-weight groups whose rewards barely differ. Identical rewards give exactly 0."""
    centred_NG = rewards_NG - rewards_NG.mean(dim=1, keepdim=True)
    if not normalise_std:
        return centred_NG
    std_N1 = rewards_NG.std(dim=1, keepdim=True) if rewards_NG.shape[1] > 1 else torch.zeros_like(centred_NG[:, :1])
    return centred_NG / (std_N1 + eps)


def identical_group_fraction(rewards_NG: torch.Tensor) -> float:
    """Share of groups whose G rewards are all equal (they carry no GRPO signal)."""
    if rewards_NG.numel() == 0:
        return 0.0
    return float((rewards_NG == rewards_NG[:, :1]).all(dim=1).float().mean())


def whiten(x_BT: torch.Tensor, mask_BT: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked (x − mean)/std over the batch (PPO's advantage whitening); masked positions stay 0."""
    m = mask_BT.to(x_BT.dtype)
    n = m.sum().clamp_min(1)
    mean = (x_BT * m).sum() / n
    var = (((x_BT - mean) * m) ** 2).sum() / n
    out = (x_BT - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# ------------------------------------------------------------------ KL
def kl_estimate(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, kind: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the sampled tokens' log-probs (see the module docstring)."""
    r = (logp_BT - ref_logp_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        return r
    if kind == "k2":
        return 0.5 * r * r
    if kind == "k3":
        return (torch.exp(-r) - 1 + r).clamp(max=K3_CLAMP)
    raise ValueError(f"unknown KL estimator {kind!r}: choose k1, k2 or k3")


def shape_rewards(scores_B: torch.Tensor, kl_BT: torch.Tensor, mask_BT: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token PPO rewards: −β·KL at every real token, plus the sequence's scalar score at its LAST real
    token (rows without a real token get nothing)."""
    m = mask_BT.to(kl_BT.dtype)
    rewards_BT = -kl_coef * kl_BT * m
    T = mask_BT.shape[1]
    positions_BT = torch.arange(T, device=mask_BT.device).expand_as(mask_BT)
    last_B = torch.where(mask_BT.bool(), positions_BT, torch.full_like(positions_BT, -1)).amax(dim=1)
    has_B = last_B >= 0
    rows = torch.arange(len(last_B), device=mask_BT.device)[has_B]
    rewards_BT[rows, last_B[has_B]] += scores_B[has_B].to(rewards_BT.dtype)
    return rewards_BT


class AdaptiveKLController:
    """Ziegler et al. (2019)'s proportional controller of the KL coefficient β: after each rollout batch,
    β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon), n = samples in the batch. ``target=None`` keeps β fixed."""

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10_000) -> None:
        self.value, self.target, self.horizon = float(init_coef), target, int(horizon)

    def update(self, current_kl: float, num_samples: int) -> float:
        if self.target is not None and self.target > 0:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * num_samples / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


# ------------------------------------------------------------------ clipped objectives
@dataclass
class PolicyLoss:
    loss_BT: torch.Tensor      # per-token loss (masked positions arbitrary; aggregate with the mask)
    clipped_BT: torch.Tensor   # bool: the clip (or the dual clip) was the active branch
    ratio_BT: torch.Tensor


def ppo_policy_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_BT: torch.Tensor, *,
                    clip_eps: float = 0.2, clip_eps_high: float | None = None,
                    dual_clip: float | None = None) -> PolicyLoss:
    """PPO's clipped surrogate, per token: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε_high)), ρ = π/π_old.

    ``clip_eps_high`` (DAPO's clip-higher) defaults to ``clip_eps``. ``dual_clip`` = c > 1 (Ye et al. 2020)
    bounds the loss of negative-advantage tokens by −c·A, so a huge ratio on a bad token cannot dominate.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = (logp_BT - old_logp_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio_BT = torch.exp(log_ratio)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * ratio_BT.clamp(1.0 - clip_eps, 1.0 + high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    was_clipped = clipped_BT > unclipped_BT
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound_BT = -dual_clip * advantages_BT
        negative = advantages_BT < 0
        dual_active = negative & (loss_BT > bound_BT)
        loss_BT = torch.where(dual_active, bound_BT, loss_BT)
        was_clipped = was_clipped | dual_active
    return PolicyLoss(loss_BT, was_clipped, ratio_BT)


def clipped_value_loss(values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor, *,
                       clip: float | None = 0.2) -> torch.Tensor:
    """½·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²) per token; ``clip=None``: ½·(V − R)²."""
    plain_BT = (values_BT - returns_BT) ** 2
    if clip is None:
        return 0.5 * plain_BT
    clipped_values_BT = old_values_BT + (values_BT - old_values_BT).clamp(-clip, clip)
    return 0.5 * torch.maximum(plain_BT, (clipped_values_BT - returns_BT) ** 2)


# ------------------------------------------------------------------ loss normalisation
def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: LossNormalisation, *,
              max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, count) of a per-token loss; the loss is Σ totals / Σ counts over everything it spans.

    * ``sequence_mean``: every row's token mean, then the mean over rows (GRPO's paper; long and short
      replies weigh the same) — count = rows with a real token;
    * ``token_mean``: the sum over all real tokens / their number (DAPO's token-level loss) — count = tokens;
    * ``token_sum_const``: each row's token SUM / ``max_tokens`` (a constant), mean over rows (Dr.GRPO: no
      length bias) — count = rows.
    """
    m = mask_BT.to(loss_BT.dtype)
    masked_BT = loss_BT * m
    tokens_B = m.sum(dim=1)
    if mode == "token_mean":
        return masked_BT.sum(), m.sum()
    has_B = (tokens_B > 0).to(loss_BT.dtype)
    if mode == "sequence_mean":
        return (masked_BT.sum(dim=1) / tokens_B.clamp_min(1) * has_B).sum(), has_B.sum()
    if mode == "token_sum_const":
        if not max_tokens or max_tokens <= 0:
            raise ValueError("token_sum_const needs max_tokens > 0 (the constant divisor)")
        return (masked_BT.sum(dim=1) / max_tokens * has_B).sum(), has_B.sum()
    raise ValueError(f"unknown loss normalisation {mode!r}: choose sequence_mean, token_mean or token_sum_const")


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    m = mask_BT.to(x_BT.dtype)
    return (x_BT * m).sum() / m.sum().clamp_min(1)


# ------------------------------------------------------------------ log-probs of chosen tokens
def token_logprobs(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token], fp32. The sampler draws from the temperature-scaled
    distribution, so the ratio must use it too (temperature 0 = greedy: the raw logits)."""
    logits = logits_BTV.float()
    if temperature and temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)
