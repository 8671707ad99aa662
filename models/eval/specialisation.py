"""Expert specialisation: which experts each domain's tokens go to, per MoE layer.

Counts are routed *slots*: a token routed to k experts adds one count to each (so the expert
marginal is the load the balancer sees). From counts_LDE (layers × domains × experts):

* ``share_LDE``: per layer and domain, the fraction of that domain's slots each expert receives;
* ``mutual_information_L``: I(domain; expert) in bits, each slot a sample of (domain, expert).
  0 = the router ignores the domain; log2(#domains) = the domain decides the expert set. Also
  reported divided by H(domain) (``normalized_mi_L``, in [0, 1]);
* ``maxvio_L``: (max load − mean load) / mean load over all domains' slots (DeepSeek's MaxVio).

``route_counts`` runs the model over tokenized documents of each domain and counts the real
(non-pad) tokens' chosen experts from ``return_router_choices``.

Shape suffixes: L MoE layers, D domains, E experts, B batch, T tokens, K top-k.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch


def shares(counts_LDE: np.ndarray) -> np.ndarray:
    totals_LD1 = counts_LDE.sum(-1, keepdims=True)
    return np.divide(counts_LDE, totals_LD1, out=np.zeros_like(counts_LDE, dtype=np.float64), where=totals_LD1 > 0)


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information(counts_LDE: np.ndarray) -> np.ndarray:
    """I(domain; expert) in bits per layer, (L,)."""
    out = []
    for counts_DE in np.asarray(counts_LDE, dtype=np.float64):
        total = counts_DE.sum()
        if total == 0:
            out.append(0.0)
            continue
        p_DE = counts_DE / total
        h_d, h_e, h_de = _entropy_bits(p_DE.sum(1)), _entropy_bits(p_DE.sum(0)), _entropy_bits(p_DE.ravel())
        out.append(max(0.0, h_d + h_e - h_de))
    return np.array(out)


def domain_entropy(counts_LDE: np.ndarray) -> np.ndarray:
    """H(domain) in bits per layer (the upper bound of the mutual information)."""
    return np.array([_entropy_bits(c.sum(1) / c.sum()) if c.sum() else 0.0 for c in np.asarray(counts_LDE, float)])


def maxvio(counts_LDE: np.ndarray) -> np.ndarray:
    load_LE = np.asarray(counts_LDE, dtype=np.float64).sum(1)
    mean_L = load_LE.mean(-1)
    return np.divide(load_LE.max(-1) - mean_L, mean_L, out=np.zeros_like(mean_L), where=mean_L > 0)


def specialisation_report(counts_LDE: np.ndarray, domains: Sequence[str]) -> dict:
    """Per layer: MI (bits), normalised MI, MaxVio, and each domain's top expert and its share."""
    counts_LDE = np.asarray(counts_LDE, dtype=np.float64)
    if counts_LDE.ndim != 3 or counts_LDE.shape[1] != len(domains):
        raise ValueError(f"counts must be (layers, {len(domains)} domains, experts), got {counts_LDE.shape}")
    mi_L, h_L, mv_L, share_LDE = mutual_information(counts_LDE), domain_entropy(counts_LDE), maxvio(counts_LDE), shares(counts_LDE)
    layers = []
    for layer in range(counts_LDE.shape[0]):
        top = {d: {"expert": int(share_LDE[layer, i].argmax()), "share": float(share_LDE[layer, i].max())}
               for i, d in enumerate(domains)}
        layers.append({"layer": layer, "mutual_information_bits": float(mi_L[layer]),
                       "normalized_mi": float(mi_L[layer] / h_L[layer]) if h_L[layer] > 0 else 0.0,
                       "maxvio": float(mv_L[layer]), "top_expert": top})
    return {"domains": list(domains), "layers": layers, "share": share_LDE.tolist()}


@torch.inference_mode()
def route_counts(model, docs_by_domain: Mapping[str, Sequence[Sequence[int]]], *, max_len: int | None = None,
                 batch_size: int = 8, pad_id: int = 0) -> tuple[list[str], np.ndarray]:
    """(domains, counts_LDE) of the experts each domain's real tokens were routed to."""
    cfg = model.cfg
    if cfg.num_moe_layers == 0:
        raise ValueError("route_counts: the model has no MoE layers")
    max_len = max_len or cfg.max_seq_len
    device = model.lm_head.weight.device
    domains = list(docs_by_domain)
    counts_LDE = np.zeros((cfg.num_moe_layers, len(domains), cfg.num_routed_experts), dtype=np.int64)
    for d, name in enumerate(domains):
        docs = [list(ids)[:max_len] for ids in docs_by_domain[name] if len(ids)]
        for start in range(0, len(docs), batch_size):
            batch = docs[start:start + batch_size]
            T = max(len(x) for x in batch)
            ids_BT = torch.full((len(batch), T), pad_id, dtype=torch.long)
            mask_BT = torch.zeros((len(batch), T), dtype=torch.bool)
            for b, x in enumerate(batch):
                ids_BT[b, :len(x)] = torch.tensor(x)
                mask_BT[b, :len(x)] = True
            out = model(ids_BT.to(device), attention_mask_BS=mask_BT.to(device), last_logits_only=True,
                        return_router_choices=True)
            choices_LBTK = out.aux["router_choices"].cpu()
            real_choices_LNK = choices_LBTK[:, mask_BT]  # (L, real tokens, K)
            for layer in range(choices_LBTK.shape[0]):
                counts_LDE[layer, d] += np.bincount(real_choices_LNK[layer].reshape(-1).numpy(),
                                                    minlength=cfg.num_routed_experts)
    return domains, counts_LDE
