"""Counting forms of the two sorts in MoE routing: the router's top-k and the stable order of slots by expert.

At decode sizes inside torch.compile a comparison count fuses into one kernel where ``torch.topk`` /
``argsort`` launch a select-then-sort pair or a radix sort (benchmarks/profile_decode.py, issue 13); at training
sizes, and eagerly, the sorts stay (``rank_form_pays``). Its own module because both the MoE layer
(``models/moe.py``) and the fused decode kernels (``models/kernels/moe_decode.py``) use it, and the layer imports
the kernels.

Shape suffixes: T tokens, E experts, N routed slots.
"""

from __future__ import annotations

import torch

RANK_TOPK_MAX_PAIRS = 1 << 20  # up to T·E² comparisons topk_by_rank replaces torch.topk (decode sizes)


def rank_form_pays(num_pairs: int, limit: int) -> bool:
    """Whether a counting form (``topk_by_rank``, ``stable_expert_order``'s rank) should replace the sort.

    Only inside torch.compile, where its comparisons and count fuse into one kernel (a compiled decode step);
    run eagerly they are about eight kernels against the sort's two, a loss where launches bound the step
    (the uncompiled CUDA-graph step at small batch). And only up to ``limit`` comparisons (decode sizes).
    """
    return 0 < num_pairs <= limit and torch.compiler.is_compiling()


def topk_by_rank(choice_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of each row's k largest values, largest first (torch.topk's indices), by counting.

    An expert's rank is the number of experts that beat it (a larger value, or an equal one with a lower
    id); the ids sorted by rank are one scatter of that permutation. One fused comparison-and-count over
    (T, E, E) instead of torch.topk's select-then-sort pair of kernels (9 µs a layer at batch 1 on an
    H100, benchmarks/profile_decode.py). Equal values: the lower id first (torch.topk leaves ties unordered).
    """
    T, E = choice_TE.shape
    id_E = torch.arange(E, device=choice_TE.device)
    other_TE1E, this_TEE1 = choice_TE[:, None, :], choice_TE[:, :, None]
    beats_TEE = (other_TE1E > this_TEE1) | ((other_TE1E == this_TEE1) & (id_E[None, None, :] < id_E[None, :, None]))
    rank_TE = beats_TEE.sum(dim=-1)
    by_rank_TE = torch.empty_like(rank_TE).scatter_(1, rank_TE, id_E.expand(T, E))
    return by_rank_TE[:, :k]


RANK_ORDER_MAX_SLOTS = 2048  # up to here stable_expert_order ranks by comparison (N² work), above it sorts


def stable_expert_order(flat_N: torch.Tensor, force_rank: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_N, inv_order_N): the stable sort of slots by expert id and its inverse (slot n goes to inv_order_N[n]).

    Few slots (decode: batch × K): each slot's destination is the number of slots that come before it,
    ``#{m : (e_m, m) < (e_n, n)}``, one fused comparison-and-count (N² booleans) instead of a sort. On an
    H100 the sort of 192 int64 ids (batch 32 × top-6) ran a radix sort of 27 µs a layer, 12 % of the
    compiled decode step (benchmarks/profile_decode.py). Many slots (training), or not compiled (see
    ``rank_form_pays``): ``argsort(stable=True)``. Both give the same permutation (``force_rank``: tests).
    """
    N = flat_N.numel()
    slot_N = torch.arange(N, device=flat_N.device)
    if rank_form_pays(N * N, RANK_ORDER_MAX_SLOTS ** 2) or (force_rank and N > 0):
        e_m, e_n = flat_N[None, :], flat_N[:, None]
        before_NM = (e_m < e_n) | ((e_m == e_n) & (slot_N[None, :] < slot_N[:, None]))
        inv_order_N = before_NM.sum(dim=1)
        return torch.empty_like(inv_order_N).scatter_(0, inv_order_N, slot_N), inv_order_N
    order_N = torch.argsort(flat_N, stable=True)
    return order_N, torch.empty_like(order_N).scatter_(0, order_N, slot_N)
