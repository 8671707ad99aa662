"""Next tokens for a whole decode batch at once, each row with its own sampling parameters.

``sample_rows`` gives row b what ``generation.sample_next(logits_BV[b:b+1], temperature[b], top_k[b],
top_p[b], generators[b])`` gives it alone, token for token (tested), in a fixed number of batched
tensor ops plus ONE op per seeded row (its draw from its own generator). Row by row, a sampled
token cost the host about fifteen ops, and ``torch.multinomial`` alone checks its input with
three device-to-host reads (two syncs on a GPU) before it draws.

How each step stays equal to the per-row one:

- temperature: ``logits / t`` with t per row. A CUDA division by a Python scalar is computed as a
  multiplication by its float32 reciprocal (PyTorch's ``div_true_kernel_cuda``), so on CUDA the
  rows multiply by ``1 / t`` too;
- top-k: the k-th largest value of a row is the same whichever k' >= k asks ``topk``, so one
  ``topk`` at the largest k serves every row that has a filter;
- top-p: the nucleus filter of ``generation.top_p_filter`` with p per row, on the rows that have one;
- the draw: ``torch.multinomial(probs, 1)`` is ``argmax(probs / q)`` with q ~ Exp(1) drawn by
  ``exponential_`` on a tensor shaped like ``probs`` (PyTorch's single-sample fast path). Here q of a
  seeded row is drawn by that row's generator over its own contiguous row: the same numbers.
  Unseeded rows share one draw from the default generator (their numbers change, not their law).

Unlike ``torch.multinomial``, nothing checks the probabilities for NaN (that check is the syncs).

Shape suffixes: B rows, S sampled rows, V vocab.
"""

from __future__ import annotations

from typing import Sequence

import torch


def host_to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without waiting for the device: on CUDA the list goes through pinned memory
    (a copy from pageable memory may wait for the work already queued on the stream, which would undo the
    engine's overlap of host and device work); pinned blocks come from PyTorch's caching host allocator, which
    reuses one only after the copy that read it has run."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def sample_rows(logits_BV: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int | None],
                top_p: Sequence[float | None], generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Next token ids (B,) on the logits' device; temperature 0 = greedy (argmax), as ``sample_next``."""
    B, V = logits_BV.shape
    rows = [b for b in range(B) if temperature[b] != 0.0]
    if not rows:
        return logits_BV.argmax(dim=-1)
    all_sampled = len(rows) == B
    rows_S = None if all_sampled else host_to_device(rows, torch.long, logits_BV.device)
    x_SV = filter_rows(logits_BV if all_sampled else logits_BV.index_select(0, rows_S),
                       [temperature[b] for b in rows], [top_k[b] for b in rows], [top_p[b] for b in rows])
    probs_SV = torch.softmax(x_SV, dim=-1)
    q_SV = _exponential_rows(probs_SV, [generators[b] for b in rows])
    picked_S = (probs_SV / q_SV).argmax(dim=-1)
    if all_sampled:
        return picked_S
    return logits_BV.argmax(dim=-1).index_copy_(0, rows_S, picked_S)


def filter_rows(logits_SV: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int | None],
                top_p: Sequence[float | None]) -> torch.Tensor:
    """Row s: ``top_p_filter(top_k_filter(logits.float() / temperature[s], top_k[s]), top_p[s])`` (temperature > 0)."""
    V = logits_SV.shape[-1]
    dev = logits_SV.device
    temp_S1 = host_to_device([[float(t)] for t in temperature], torch.float32, dev)
    x_SV = logits_SV.float()
    x_SV = x_SV * (1.0 / temp_S1) if dev.type == "cuda" else x_SV / temp_S1
    ks = [k if k is not None and k < V else None for k in top_k]
    x_SV = _on_rows(x_SV, [s for s, k in enumerate(ks) if k is not None], _top_k_rows, ks)
    ps = [p if p is not None and p < 1.0 else None for p in top_p]
    return _on_rows(x_SV, [s for s, p in enumerate(ps) if p is not None], _top_p_rows, ps)


def _on_rows(x_SV: torch.Tensor, rows: list[int], fn, values: list) -> torch.Tensor:
    """``fn(x of rows, their values)`` written back into those rows (a sort or top-k only where asked)."""
    if not rows:
        return x_SV
    if len(rows) == x_SV.shape[0]:
        return fn(x_SV, values)
    idx_R = host_to_device(rows, torch.long, x_SV.device)
    return x_SV.index_copy(0, idx_R, fn(x_SV.index_select(0, idx_R), [values[r] for r in rows]))


def _top_k_rows(x_SV: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """``top_k_filter`` with k per row."""
    if min(ks) <= 0:
        raise ValueError(f"top_k must be >= 1, got {min(ks)}")
    col_S1 = host_to_device([[k - 1] for k in ks], torch.long, x_SV.device)
    kth_S1 = torch.topk(x_SV, max(ks), dim=-1).values.gather(1, col_S1)
    return x_SV.masked_fill(x_SV < kth_S1, float("-inf"))


def _top_p_rows(x_SV: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """``top_p_filter`` with p per row."""
    if min(ps) <= 0.0:
        raise ValueError(f"top_p must be in (0, 1], got {min(ps)}")
    p_S1 = host_to_device([[p] for p in ps], torch.float32, x_SV.device)
    sorted_SV, order_SV = torch.sort(x_SV, dim=-1, descending=True)
    probs_SV = torch.softmax(sorted_SV, dim=-1)
    mass_before_SV = torch.cumsum(probs_SV, dim=-1) - probs_SV
    drop_sorted_SV = mass_before_SV >= p_S1
    drop_SV = torch.zeros_like(drop_sorted_SV).scatter(-1, order_SV, drop_sorted_SV)
    return x_SV.masked_fill(drop_SV, float("-inf"))


def _exponential_rows(probs_SV: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Exp(1) noise shaped like ``probs_SV``: a seeded row's from its generator, the rest from the default one."""
    q_SV = torch.empty_like(probs_SV)
    unseeded = [s for s, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        return q_SV.exponential_(1)
    if unseeded:
        idx_U = host_to_device(unseeded, torch.long, probs_SV.device)
        q_SV.index_copy_(0, idx_U, torch.empty_like(q_SV[: len(unseeded)]).exponential_(1))
    for s, g in enumerate(generators):
        if g is not None:
            q_SV[s].exponential_(1, generator=g)
    return q_SV
