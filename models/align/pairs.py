"""Preference pairs as tensors: both sides rendered with the one chat template, padded into one batch.

A pair is (prompt messages, chosen reply, rejected reply). Each side renders as the conversation
``prompt + [assistant: reply]`` through ``models.chat.render_ids``, so its loss mask marks the reply and
its closing ``<|end|>`` — exactly the tokens DPO scores and the last of which the reward head reads.

A batch of B pairs is ONE tensor of 2B right-padded rows, chosen sides first (rows [0, B)), then the
rejected sides (rows [B, 2B)): one forward pass scores both (TRL's "concatenated forward"), and the
router sees both sides in the same step.

    input_ids  (2B, T) int64, padded with the tokenizer's pad id (pad ≠ eos)
    loss_mask  (2B, T) bool, True on reply tokens (and their <|end|>)
    lengths    (2B,)   int64, real tokens per row

``targets(batch)`` turns this into next-token targets for ``input_ids[:, :-1]`` with −100 off the reply.

Shape suffixes: B pairs, R = 2B rows, T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..chat import render_ids

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Pair:
    prompt: tuple[dict, ...]  # messages before the reply (system/user/assistant turns)
    chosen: str
    rejected: str


@dataclass
class RenderedPair:
    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]

    @property
    def max_len(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


def render_pair(tokenizer, pair: Pair) -> RenderedPair:
    prompt = list(pair.prompt)
    c = render_ids(tokenizer, prompt + [{"role": "assistant", "content": pair.chosen}])
    r = render_ids(tokenizer, prompt + [{"role": "assistant", "content": pair.rejected}])
    return RenderedPair(c.ids, c.loss_mask, r.ids, r.loss_mask)


def collate(rendered: Sequence[RenderedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """The (2B, T) batch described in the module docstring."""
    rows = [(p.chosen_ids, p.chosen_mask) for p in rendered] + [(p.rejected_ids, p.rejected_mask) for p in rendered]
    T = max(len(ids) for ids, _ in rows)
    input_ids_RT = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask_RT = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (ids, mask) in enumerate(rows):
        input_ids_RT[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask_RT[i, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
    lengths_R = torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long)
    return {"input_ids": input_ids_RT, "loss_mask": mask_RT, "lengths": lengths_R}


def targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets (R, T − 1) for ``input_ids[:, :-1]``: the reply tokens, −100 elsewhere."""
    ids_RT, mask_RT = batch["input_ids"], batch["loss_mask"]
    return torch.where(mask_RT[:, 1:], ids_RT[:, 1:], torch.full_like(ids_RT[:, 1:], IGNORE_INDEX))


def num_pairs(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0] // 2


class PairSet:
    """Rendered pairs that hand out batches by index (``sft.PackedRowLoader`` draws from it).

    ``reference`` (P, 2) holds each pair's reference log-probs (chosen, rejected) once computed;
    batches then carry them as ``ref_logps`` (2B,), in the batch's row order.
    """

    def __init__(self, rendered: Sequence[RenderedPair], pad_id: int, reference: torch.Tensor | None = None) -> None:
        self.rendered, self.pad_id = list(rendered), pad_id
        if reference is not None and tuple(reference.shape) != (len(self.rendered), 2):
            raise ValueError(f"reference log-probs have shape {tuple(reference.shape)}, expected ({len(self.rendered)}, 2)")
        self.reference = reference

    def __len__(self) -> int:
        return len(self.rendered)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = [int(i) for i in indices]
        out = collate([self.rendered[i] for i in idx], self.pad_id)
        if self.reference is not None:
            ref_P2 = self.reference[idx]
            out["ref_logps"] = torch.cat([ref_P2[:, 0], ref_P2[:, 1]])
        return out

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Every pair once, in order (evaluation, reference scoring)."""
        return [self.batch(range(i, min(i + batch_size, len(self)))) for i in range(0, len(self), batch_size)]
