"""Rollout tensors for online RL, and re-scoring them with the current policy (with routing replay).

A rollout is what ``models.generation.generate`` returned for a batch of prompts: token ids, per-token
log-probs at generation time and (optionally) the experts every MoE layer chose for every token.
``pack_rollout`` lays them out RIGHT-padded for the update: row b is prompt_b + completion_b, and the
model reads ``input_ids_BT = seq[:, :-1]`` to predict ``targets_BT = seq[:, 1:]``. Right padding keeps
each row's positions and causal context exactly those it had in generation (the decoder left-padded but
counted RoPE positions over real tokens only), so on-policy ratios are 1 up to rounding.

Routing replay (R3, "Rollout Routing Replay"): in the update the recorded expert ids are passed to every
MoE layer as ``forced_routing``. The router still computes its scores, and the gate weights are those
scores gathered at the *replayed* experts (``moe.Router``), so the router keeps receiving gradients while
the selection — a discrete, non-differentiable choice that flips under small weight or precision
changes — matches what produced the samples. Without replay, ``routing_agreement`` measures how often
the update's own choice matched the rollout's.

Padding positions replay experts 0..K−1 (any distinct ids would do: their outputs never reach a real
position); their routing is left out of the expert counts this module reports.

Shape suffixes: B rows, S padded sequence length, T = S − 1 model positions, L MoE layers, K top-k,
E experts, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import balancing
from .rl import token_logprobs


@dataclass
class PackedRollout:
    input_ids_BT: torch.Tensor      # int64, pad_id after each row's end
    targets_BT: torch.Tensor        # int64 = seq[:, 1:]
    completion_mask_BT: torch.Tensor  # bool: target t is a generated token
    token_mask_BT: torch.Tensor     # bool: input position t is a real token (prompt or completion)
    old_logp_BT: torch.Tensor       # fp32 generation-time log-probs at the completion targets (0 elsewhere)
    routing_LBTK: torch.Tensor | None  # int64 recorded expert ids at each input position


def pack_rollout(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                 logprobs: Sequence[Sequence[float]] | None, routing: Sequence[torch.Tensor] | None, *,
                 pad_id: int, top_k: int | None = None) -> PackedRollout:
    """Right-padded update tensors of a rollout (see the module docstring). ``routing[b]`` is
    (P_b + N_b, L, K) as ``GenerationResult.routing``."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    B, S = len(lengths), max(lengths)
    T = max(S - 1, 1)
    seq_BS = torch.full((B, T + 1), pad_id, dtype=torch.long)
    completion_BT = torch.zeros(B, T, dtype=torch.bool)
    tokens_BT = torch.zeros(B, T, dtype=torch.bool)
    old_BT = torch.zeros(B, T, dtype=torch.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        seq_BS[b, : lengths[b]] = torch.tensor(list(p) + list(c), dtype=torch.long)
        n_prompt, n_new = len(p), len(c)
        completion_BT[b, n_prompt - 1: n_prompt - 1 + n_new] = True  # target t predicts token t + 1
        tokens_BT[b, : min(lengths[b], T)] = True
        if logprobs is not None and n_new:
            old_BT[b, n_prompt - 1: n_prompt - 1 + n_new] = torch.tensor(list(logprobs[b]), dtype=torch.float32)
    routing_LBTK = None
    if routing is not None:
        L, K = routing[0].shape[1], routing[0].shape[2]
        routing_LBTK = torch.arange(K, dtype=torch.long).expand(L, B, T, K).clone()
        for b, r_SLK in enumerate(routing):
            n = min(r_SLK.shape[0], T)
            routing_LBTK[:, b, :n] = r_SLK[:n].permute(1, 0, 2).to(torch.long)
    return PackedRollout(seq_BS[:, :-1].clone(), seq_BS[:, 1:].clone(), completion_BT, tokens_BT, old_BT, routing_LBTK)


@dataclass
class PolicyPass:
    logp_BT: torch.Tensor            # fp32 log-probs of the targets (attached)
    logits_BTV: torch.Tensor
    hidden_BTD: torch.Tensor | None
    routing_LBTK: torch.Tensor | None  # the experts this pass used
    output: object                   # the ModelOutput (terms, aux)


def policy_pass(model, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor, *, temperature: float = 1.0,
                replay_LBTK: torch.Tensor | None = None, return_hidden: bool = False,
                with_losses: bool = True) -> PolicyPass:
    """One forward of ``model`` (a ``MoETransformer`` or a module with its call signature) over a packed
    rollout: target log-probs at the sampling temperature, optionally replaying recorded routing."""
    forced = list(replay_LBTK.unbind(0)) if replay_LBTK is not None else None
    out = model(input_ids_BT, forced_routing=forced, return_router_choices=True, return_hidden=return_hidden,
                with_losses=with_losses)
    logp_BT = token_logprobs(out.logits, targets_BT, temperature)
    return PolicyPass(logp_BT, out.logits, out.hidden, out.aux.get("router_choices"), out)


def routing_agreement(a_LBTK: torch.Tensor, b_LBTK: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """(L,) mean share of the K experts two routings have in common, over the masked positions."""
    common_LBT = (a_LBTK.unsqueeze(-1) == b_LBTK.unsqueeze(-2)).any(dim=-1).float().mean(dim=-1)
    m = mask_BT.to(common_LBT.dtype)
    return (common_LBT * m).sum(dim=(1, 2)) / m.sum().clamp_min(1)


def routing_counts(routing_LBTK: torch.Tensor, mask_BT: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(L, E) routed-slot counts of the masked positions."""
    m = mask_BT.bool()
    return torch.stack([balancing.tokens_per_expert(r_BTK[m], num_experts) for r_BTK in routing_LBTK])


def routing_maxvio(routing_LBTK: torch.Tensor, mask_BT: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(L,) MaxVio of the masked positions' routing: (max load − mean load) / mean load per layer."""
    return balancing.maxvio(routing_counts(routing_LBTK, mask_BT, num_experts))
