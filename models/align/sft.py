"""Supervised fine-tuning data maths: conversations -> packed rows of (inputs, targets, document ids).

A conversation is rendered by the one chat template (``models/chat.py::render_ids``), whose loss
mask marks the assistant tokens and each assistant turn's closing ``<|end|>`` — over every turn of a
multi-turn conversation. A document of ids ``x_0..x_n`` contributes inputs ``x_0..x_{n-1}`` and
targets ``x_{i+1}`` where ``loss_mask[i+1]`` is 1, else -100: the model is trained only to produce
the assistant's tokens, never the system/user text or the markers around it.

Packing: documents are placed first-fit-decreasing into rows of ``seq_len`` input tokens (a
document longer than a row is cut to ``seq_len + 1`` ids and counted as truncated). Each row carries
``document_ids`` so that attention is block-diagonal (``MoETransformer(document_ids_BT=...)``):
a document in a packed row computes exactly what it would alone, and no target is predicted across a
document boundary (the first id of a document is BOS, never a target). Unused row tail is padding:
``pad_id`` inputs, -100 targets, its own document id.

``PackedRowLoader`` serves the packed rows as dict micro-batches for ``Trainer`` (shuffled per
epoch by seed, split over data-parallel ranks, resumable with ``state_dict``).

Shape suffixes: N rows, B rows per micro-batch, T tokens per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..chat import render_ids
from ..mtp import IGNORE_INDEX


@dataclass
class Document:
    """One conversation in training form: inputs and next-token targets (-100 = no loss)."""

    inputs: list[int]
    targets: list[int]

    @property
    def num_targets(self) -> int:
        return sum(1 for t in self.targets if t != IGNORE_INDEX)


def document_from_ids(ids: Sequence[int], loss_mask: Sequence[int]) -> Document:
    """inputs = ids[:-1]; targets[i] = ids[i+1] where loss_mask[i+1] else -100."""
    if len(ids) != len(loss_mask):
        raise ValueError(f"ids ({len(ids)}) and loss_mask ({len(loss_mask)}) differ in length")
    targets = [int(t) if m else IGNORE_INDEX for t, m in zip(ids[1:], loss_mask[1:])]
    return Document(list(ids[:-1]), targets)


def conversation_document(tokenizer, messages: Sequence[dict]) -> Document:
    rendered = render_ids(tokenizer, messages)
    return document_from_ids(rendered.ids, rendered.loss_mask)


@dataclass
class PackedRows:
    input_ids_NT: torch.Tensor
    targets_NT: torch.Tensor
    document_ids_NT: torch.Tensor
    num_documents: int = 0
    num_truncated: int = 0
    num_dropped: int = 0  # documents without a single target after truncation
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids_NT.shape[0])

    def batch(self, rows: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(rows, dtype=torch.long)
        return {"input_ids": self.input_ids_NT[idx], "targets": self.targets_NT[idx],
                "document_ids": self.document_ids_NT[idx]}


def pack_documents(docs: Iterable[Document], seq_len: int, pad_id: int) -> PackedRows:
    """First-fit-decreasing packing of documents into rows of ``seq_len`` tokens (see the module docstring)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len}: must be > 0")
    kept: list[Document] = []
    truncated = dropped = 0
    for doc in docs:
        if len(doc.inputs) > seq_len:
            doc = Document(doc.inputs[:seq_len], doc.targets[:seq_len])
            truncated += 1
        if doc.num_targets == 0:
            dropped += 1
            continue
        kept.append(doc)
    # first fit decreasing; a stable order (length, then input order) keeps it deterministic
    order = sorted(range(len(kept)), key=lambda i: (-len(kept[i].inputs), i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(kept[i].inputs)
        for r, space in enumerate(free):
            if space >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    N = len(rows)
    inputs = torch.full((N, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((N, seq_len), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.zeros((N, seq_len), dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for j, i in enumerate(members):
            doc = kept[i]
            n = len(doc.inputs)
            inputs[r, pos:pos + n] = torch.tensor(doc.inputs)
            targets[r, pos:pos + n] = torch.tensor(doc.targets)
            doc_ids[r, pos:pos + n] = j
            pos += n
        doc_ids[r, pos:] = len(members)  # padding: a document of its own
    num_tokens = sum(len(d.inputs) for d in kept)
    stats = {"rows": N, "documents": len(kept), "truncated": truncated, "dropped": dropped,
             "fill": num_tokens / max(1, N * seq_len), "targets": int((targets != IGNORE_INDEX).sum())}
    return PackedRows(inputs, targets, doc_ids, len(kept), truncated, dropped, stats)


def pack_conversations(tokenizer, conversations: Iterable[Sequence[dict]], seq_len: int) -> PackedRows:
    return pack_documents((conversation_document(tokenizer, m) for m in conversations), seq_len, tokenizer.pad_id)


class PackedRowLoader:
    """Endless dict micro-batches over packed rows: shuffled per epoch, this rank's share, resumable.

    Every rank sees ``len(rows) // world_size`` rows per epoch (the remainder is dropped so ranks
    stay in step); rows repeat across epochs in a new order (``seed + epoch``).
    """

    def __init__(self, rows: PackedRows, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if len(rows) < world_size:
            raise ValueError(f"{len(rows)} packed rows cannot feed {world_size} workers: add data or shorten seq_len")
        self.rows, self.batch_size = rows, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position = 0, 0  # position: rows of this rank consumed in this epoch

    def _order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng(self.seed + epoch).permutation(len(self.rows))
        per_rank = len(self.rows) // self.world_size
        return perm[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked: list[int] = []
        while len(picked) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.position:self.position + self.batch_size - len(picked)]
            picked += take.tolist()
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return self.rows.batch(picked)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def close(self) -> None:
        pass


def batches_of(rows: PackedRows, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Every row once, in order, as dict batches (evaluation)."""
    return [rows.batch(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def assistant_token_loss(model, rows: PackedRows, batch_size: int = 8, device: str | torch.device = "cpu") -> float:
    """Mean cross-entropy (nats) over the assistant targets of ``rows`` (token-weighted, no MTP/aux)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches_of(rows, batch_size):
        targets = batch["targets"].to(device)
        out = model(batch["input_ids"].to(device), targets=targets, document_ids_BT=batch["document_ids"].to(device))
        n = int((targets != IGNORE_INDEX).sum())
        total += float(out.aux["lm_loss"]) * n
        count += n
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def answer_exact_match(model, tokenizer, prompts: Sequence[Sequence[dict]], answers: Sequence[str], *,
                       max_new_tokens: int = 12, batch_size: int = 32) -> float:
    """Share of prompts whose greedy reply (up to the end-of-turn token) equals the answer, whitespace-stripped.

    Generation runs on the cached (absorbed-MLA) path, which reads ``kv_b_proj.weight`` directly:
    merge LoRA adapters into a copy before calling this, or their kv_b_proj update is ignored.
    """
    from ..chat import prompt_ids, stop_ids
    from ..generation import generate

    was_training = model.training
    model.eval()
    stops = stop_ids(tokenizer)
    hits = 0
    for i in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, list(p)) for p in prompts[i:i + batch_size]]
        out = generate(model, ids, max_new_tokens, stop_token_ids=stops, pad_id=tokenizer.pad_id)
        for tokens, answer in zip(out.tokens, answers[i:i + batch_size]):
            reply = tokenizer.decode([t for t in tokens if t not in stops])
            hits += int(reply.strip() == answer.strip())
    model.train(was_training)
    return hits / max(1, len(prompts))
