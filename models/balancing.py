"""Load-balancing maths for the MoE router, as pure functions (tested against small tables).

- ``update_router_bias``: DeepSeek-V3 auxiliary-loss-free balancing. After each optimiser step,
  bias_i -= γ for overloaded experts, += γ for underloaded ones (vs the mean load), then the bias
  is mean-centred (adding a constant to every bias changes no top-k choice, so centring only keeps
  the values from drifting). Counts must be GLOBAL: summed over all micro-batches and ranks.
- ``seq_aux_loss``: DeepSeek-V3's complementary sequence-wise loss α Σ_i f_i P_i per sequence.
- ``z_loss``: router logit z-loss (ST-MoE), mean of logsumexp² over tokens.
- ``load_balancing_loss``: the classic Switch-Transformer loss E Σ_i f_i P_i over the batch.
- ``maxvio`` and ``router_entropy``: statistics; ``tokens_per_expert`` counts without host sync.

The loss functions return the loss already multiplied by their weight (α / weight argument).
Every function that averages over tokens takes an optional bool validity mask (``valid_BT`` /
``valid_T``: True = a real position) and then averages over the valid positions only, with masked
sums and ``clamp_min`` (no host sync, no boolean indexing: they run in compiled blocks and CUDA
graphs). An MTP depth passes the positions it has a target for: its last d positions see a padded
input token and its chains across a document boundary have nothing to predict.
Shape suffixes: B batch, T tokens, E experts, K experts per token, L MoE layers.
"""

from __future__ import annotations

import torch


def update_router_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, gamma: float) -> torch.Tensor:
    """Sign-rule update of the routing bias; works on (E,) or batched (L, E). Returns a new tensor.

    An expert exactly at the mean load gets no step. The result is mean-centred over experts.
    """
    counts = counts_E.to(torch.float32)
    step = gamma * torch.sign(counts.mean(dim=-1, keepdim=True) - counts)
    new_bias = bias_E.to(torch.float32) + step
    new_bias = new_bias - new_bias.mean(dim=-1, keepdim=True)
    return new_bias.to(bias_E.dtype)


def tokens_per_expert(topk_idx_TK: torch.Tensor, num_experts: int, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Float counts (E,) of routed token slots per expert. scatter_add (not bincount) avoids a host sync.

    ``valid_T`` (bool, any shape with T elements in topk_idx's leading order) leaves out the slots of
    positions that are not real tokens (e.g. the padded tail of an MTP depth), without a host sync.
    """
    flat = topk_idx_TK.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=flat.device)
    if valid_T is None:
        weights = torch.ones_like(flat, dtype=torch.float32)
    else:
        k = flat.numel() // valid_T.numel()
        weights = valid_T.reshape(-1, 1).expand(-1, k).reshape(-1).to(torch.float32)
    return counts.scatter_add_(0, flat, weights)


def maxvio(counts_E: torch.Tensor) -> torch.Tensor:
    """(max_i load_i − mean load) / mean load along the last dim; 0 when nothing was routed."""
    counts = counts_E.to(torch.float32)
    mean = counts.mean(dim=-1)
    return (counts.amax(dim=-1) - mean) / mean.clamp_min(1e-12)


def _normalised(scores_xE: torch.Tensor) -> torch.Tensor:
    return scores_xE / scores_xE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def _masked_mean(x_T: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """Mean of x over valid positions (all when ``valid_T`` is None); 0 when none is valid."""
    if valid_T is None:
        return x_T.mean()
    w_T = valid_T.reshape(x_T.shape).to(x_T.dtype)
    return (x_T * w_T).sum() / w_T.sum().clamp_min(1)


def router_entropy(scores_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (valid) tokens of the entropy (nats) of the scores normalised to sum to 1 per token."""
    p_TE = _normalised(scores_TE.to(torch.float32))
    return _masked_mean(-(p_TE * torch.log(p_TE.clamp_min(1e-20))).sum(dim=-1), valid_T)


def seq_aux_loss(scores_BTE: torch.Tensor, topk_idx_BTK: torch.Tensor, alpha: float,
                 valid_BT: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences.

    f_i = E / (K·T) · #{t : i ∈ topk(t)},  P_i = (1/T) Σ_t s'_{i,t}  with s' the scores normalised
    over experts per token;  L = α Σ_i f_i P_i. Perfect balance gives α. With ``valid_BT``, T and the
    sums run over each row's valid positions only; a row without one contributes 0 (still counted in B).
    """
    B, T, E = scores_BTE.shape
    K = topk_idx_BTK.shape[-1]
    p_BTE = _normalised(scores_BTE.to(torch.float32))
    counts_BE = torch.zeros(B, E, dtype=torch.float32, device=scores_BTE.device)
    if valid_BT is None:  # the unmasked formula exactly as it always was (same rounding, same training runs)
        counts_BE.scatter_add_(1, topk_idx_BTK.reshape(B, T * K),
                               torch.ones(B, T * K, dtype=torch.float32, device=scores_BTE.device))
        f_BE, p_BE = counts_BE * (E / (K * T)), p_BTE.mean(dim=1)
    else:
        w_BT = valid_BT.reshape(B, T).to(torch.float32)
        counts_BE.scatter_add_(1, topk_idx_BTK.reshape(B, T * K), w_BT[:, :, None].expand(B, T, K).reshape(B, T * K))
        num_valid_B1 = w_BT.sum(dim=1, keepdim=True).clamp_min(1)
        f_BE = counts_BE * (E / K) / num_valid_B1
        p_BE = (p_BTE * w_BT[:, :, None]).sum(dim=1) / num_valid_B1
    return alpha * (f_BE * p_BE).sum(dim=-1).mean()


def z_loss(logits_TE: torch.Tensor, weight: float, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """weight × mean over (valid) tokens of logsumexp(router logits)²."""
    return weight * _masked_mean(torch.logsumexp(logits_TE.to(torch.float32), dim=-1).pow(2), valid_T)


def load_balancing_loss(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, weight: float,
                        valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer loss weight × E Σ_i f_i P_i over the whole batch (its valid tokens).

    f_i = fraction of routed slots that went to expert i, P_i = mean normalised score of expert i.
    Perfect balance gives weight × 1.
    """
    T, E = scores_TE.shape
    K = topk_idx_TK.numel() // T
    p_TE = _normalised(scores_TE.to(torch.float32))
    if valid_T is None:  # the unmasked formula exactly as it always was
        f_E = tokens_per_expert(topk_idx_TK, E) / topk_idx_TK.numel()
        return weight * E * (f_E * p_TE.mean(dim=0)).sum()
    w_T = valid_T.reshape(T).to(torch.float32)
    num_valid = w_T.sum().clamp_min(1)
    f_E = tokens_per_expert(topk_idx_TK, E, valid_T) / (num_valid * K)
    return weight * E * (f_E * ((p_TE * w_T[:, None]).sum(dim=0) / num_valid)).sum()
