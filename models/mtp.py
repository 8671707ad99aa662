"""Multi-token prediction (DeepSeek-V3 §2.2): D sequential modules, each predicting one token further.

Module d (1-based) at position i combines the previous depth's hidden state h^{d-1}_i (the main
model's last block output for d = 1) with the embedding of token i+d:
    h'_i = eh_proj([enorm(Emb(t_{i+d})) ; hnorm(h^{d-1}_i)])   (this order matches DeepSeek's checkpoints)
then runs one transformer block and predicts t_{i+d+1} through its own final norm and the SHARED
LM head; the embedding table is shared too. The MTP loss is the mean over depths of the
cross-entropy (the transformer multiplies it by λ = mtp_loss_weight).

Document boundaries: a target of -100 at position j means "t_{j+1} does not follow t_j" (a
boundary or padding). The depth-d target at i, t_{i+d+1} = targets[i+d], is kept only when
targets[i], ..., targets[i+d] are all valid, so neither the extra input token nor the target
crosses a boundary.

Parameter names: mtp.{d-1}.{enorm, hnorm, eh_proj, norm, block.*}; the block has the decoder
layer's HF names, so export maps mtp.{j}.block.* ↔ model.layers.{num_layers + j}.*.
Shape suffixes: B batch, T tokens, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm

IGNORE_INDEX = -100


def shift_left(x_BT: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """x shifted n places to the left along T, the last n positions filled with ``fill``."""
    if n == 0:
        return x_BT
    out = torch.full_like(x_BT, fill)
    if n < x_BT.shape[1]:
        out[:, : x_BT.shape[1] - n] = x_BT[:, n:]
    return out


def mtp_targets(targets_BT: torch.Tensor, depth: int) -> torch.Tensor:
    """Targets for MTP depth ``depth`` (≥1): targets[i+depth] where targets[i..i+depth] are all valid, else -100."""
    valid_BT = targets_BT != IGNORE_INDEX
    keep_BT = valid_BT.clone()
    for j in range(1, depth + 1):
        keep_BT &= shift_left(valid_BT, j, False)
    shifted = shift_left(targets_BT, depth, IGNORE_INDEX)
    return torch.where(keep_BT, shifted, torch.full_like(shifted, IGNORE_INDEX))


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = block
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, h_prev_BTD: torch.Tensor, emb_next_BTD: torch.Tensor, cos, sin, mask_B1TS=None,
                valid_BT: torch.Tensor | None = None):
        """Returns (h_BTD before the final norm — the next depth's input, normed_BTD for the head, MoE stats).

        valid_BT: the positions this depth has a target for; only they count in the block's router
        statistics and balancing losses (the padded tail and cross-document chains do not).
        """
        x_BTD = self.eh_proj(torch.cat([self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)], dim=-1))
        h_BTD, stats = self.block(x_BTD, cos, sin, mask_B1TS, valid_BT=valid_BT)
        return h_BTD, self.norm(h_BTD), stats
