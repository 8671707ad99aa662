"""Log-likelihood of continuations and of whole documents, batched, invariant to batch size and padding.

``score_continuations(model, requests)`` takes ``(context_ids, continuation_ids)`` pairs and returns,
per pair, the summed log-probability of the continuation given the context and whether greedy
decoding would have produced it (lm-eval's ``loglikelihood``). Requests are sorted by length
(longest first, so the first batch shows an out-of-memory at once), padded, scored and put back in
input order.

Padding is the known bug class here (a score that changes with the batch it sat in):

* only the continuation's positions are summed, never a pad position (the pad id is a real token
  with a real log-probability);
* the model gets ``attention_mask_BS``, so real tokens never attend to pads and RoPE positions count
  real tokens only; with left padding this is what keeps a row's positions at 0..n-1 (without the
  mask a left-padded row would start at position P - n, and its scores would move);
* log-softmax runs in fp32 on the continuation positions only (B·T·V in fp32 is what a long batch
  cannot afford).

``rolling_windows`` cuts a document longer than the context into windows that together predict
every token once, each with as much preceding context as fits (stride = tokens predicted per
window); ``score_document`` sums them (lm-eval's ``loglikelihood_rolling``).

Shape suffixes: B batch, T padded length, V vocab, C continuation positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float    # sum over the continuation's tokens, nats
    is_greedy: bool   # every continuation token was the argmax
    num_tokens: int


def _pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(ids (B, T), mask (B, T) bool, offsets): offset[b] = index in the padded row of seqs[b][0]."""
    T = max(len(s) for s in seqs)
    ids_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), T), dtype=torch.bool)
    offsets = []
    for b, s in enumerate(seqs):
        start = T - len(s) if side == "left" else 0
        ids_BT[b, start:start + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask_BT[b, start:start + len(s)] = True
        offsets.append(start)
    return ids_BT, mask_BT, offsets


def _check(requests, vocab_size: int) -> None:
    for i, (ctx, cont) in enumerate(requests):
        if not ctx:
            raise ValueError(f"request {i}: empty context (start it with BOS so the first token has a prediction)")
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        bad = [t for t in (*ctx, *cont) if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"request {i}: token ids outside [0, {vocab_size}): {bad[:5]}")


@torch.inference_mode()
def score_continuations(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 8,
                        max_len: int | None = None, pad_id: int = 0, padding_side: str = "right",
                        device=None) -> list[ContinuationScore]:
    """log p(continuation | context) per request; the context is cut from the left to fit ``max_len``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = model.cfg
    _check(requests, cfg.vocab_size)
    max_len = max_len or cfg.max_seq_len
    device = device or model.lm_head.weight.device
    inputs, num_cont = [], []
    for ctx, cont in requests:
        if len(cont) > max_len:
            raise ValueError(f"continuation of {len(cont)} tokens does not fit max_len {max_len}")
        seq = [*ctx, *cont][-(max_len + 1):]
        inputs.append(seq)
        num_cont.append(len(cont))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    results: list[ContinuationScore | None] = [None] * len(inputs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids_BT, mask_BT, offsets = _pad_batch([inputs[i][:-1] for i in idx], pad_id, padding_side)
        logits_BTV = model(ids_BT.to(device), attention_mask_BS=mask_BT.to(device)).logits
        for row, i in enumerate(idx):
            C, n_in = num_cont[i], len(inputs[i]) - 1
            first = offsets[row] + n_in - C           # the position whose logits predict cont[0]
            logp_CV = torch.log_softmax(logits_BTV[row, first:first + C].float(), dim=-1)
            target_C = torch.tensor(inputs[i][-C:], device=logp_CV.device)
            lp = logp_CV.gather(-1, target_C[:, None]).squeeze(-1)
            greedy = bool((logp_CV.argmax(-1) == target_C).all())
            results[i] = ContinuationScore(float(lp.double().sum()), greedy, C)
    return results  # type: ignore[return-value]


def rolling_windows(ids: Sequence[int], max_len: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows whose continuations cover ids[1:] exactly once, in order.

    ids[0] (BOS) is a prefix that is never predicted. Each window predicts ``stride`` new tokens
    (default max_len // 2) with the preceding tokens as context, up to max_len inputs in all.
    """
    if len(ids) < 2:
        raise ValueError("rolling_windows: a document needs at least BOS and one token")
    stride = stride or max(1, max_len // 2)
    if not 1 <= stride <= max_len:
        raise ValueError(f"rolling_windows: stride must be in [1, max_len={max_len}], got {stride}")
    windows, pos = [], 1
    while pos < len(ids):
        # the first window may predict max_len tokens (its context is only BOS)
        n = min(max_len if pos == 1 else stride, len(ids) - pos)
        ctx_start = max(0, pos + n - 1 - max_len)
        windows.append((list(ids[ctx_start:pos]), list(ids[pos:pos + n])))
        pos += n
    return windows


def score_documents(model, docs_ids: Sequence[Sequence[int]], *, max_len: int | None = None,
                    stride: int | None = None, batch_size: int = 8, pad_id: int = 0, device=None) -> list[float]:
    """Total log-probability (nats) of each document's tokens after its BOS, via rolling windows."""
    max_len = max_len or model.cfg.max_seq_len
    flat, owner = [], []
    for d, ids in enumerate(docs_ids):
        for w in rolling_windows(ids, max_len, stride):
            flat.append(w)
            owner.append(d)
    scores = score_continuations(model, flat, batch_size=batch_size, max_len=max_len, pad_id=pad_id, device=device)
    totals = [0.0] * len(docs_ids)
    for d, s in zip(owner, scores):
        totals[d] += s.logprob
    return totals


def bits_per_byte(total_logprob_nats: float, num_bytes: int) -> float:
    """−Σ log p / (ln 2 · Σ UTF-8 bytes): a tokenizer-independent cross-entropy."""
    if num_bytes <= 0:
        raise ValueError(f"bits_per_byte: num_bytes must be > 0, got {num_bytes}")
    return -total_logprob_nats / (math.log(2) * num_bytes)
