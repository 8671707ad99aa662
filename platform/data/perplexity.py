"""A character n-gram language model (interpolated Kneser-Ney) in numpy, and CCNet buckets.

CCNet scores each document with a language model trained on a clean reference corpus and
cuts the corpus into head / middle / tail at the 30th and 60th perplexity percentiles.
We do the same with a small model that needs no download: characters (so it works for
code and any script), order ``order`` (default 5), interpolated Kneser-Ney with one
absolute discount per order estimated from the count-of-counts (D = n1 / (n1 + 2 n2)).

Everything is vectorised: the text becomes an int64 code-point array, every n-gram and
context becomes one 64-bit polynomial hash (collisions at this size are negligible and
would only merge two counts), count tables are sorted key arrays, and lookups are
``np.searchsorted``. Scoring cost is O(chars x order x log table), so documents are scored
on their first ``max_score_chars`` characters.

Shape suffixes: ``_N`` positions in the text, ``_U`` unique keys of one table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from moeflow.platform.config import StageConfig

from .choices import check_choices

_MULT = np.uint64(1_000_003)  # polynomial hash multiplier (odd, so the map is invertible mod 2^64)
_BOS = 2  # code point used to pad the start of a document (STX: never a real character here)
BUCKETS = ("head", "middle", "tail")


PPLBucket = Literal["head", "middle", "tail"]  # == BUCKETS


class PerplexityConfig(StageConfig):
    order: int = Field(5, ge=1, le=12, description="character n-gram order of the reference LM")
    reference: str = Field(
        "corpus", min_length=1,
        description="'corpus' (first reference_docs docs of the corpus, in plan order), 'seed', or a file path")
    reference_docs: int = Field(200, ge=1, le=1 << 24, description="documents the reference LM is trained on")
    reference_max_chars: int = Field(500_000, ge=1, le=1 << 34, description="characters the reference LM is trained on, at most")
    max_score_chars: int = Field(5_000, ge=1, le=1 << 30, description="score each document on its first max_score_chars characters")
    percentiles: tuple[float, float] = Field(
        (30.0, 60.0), description="head/middle and middle/tail cuts, corpus percentiles (CCNet: 30, 60)")
    drop_buckets: list[PPLBucket] = Field(default_factory=list, description="buckets to exclude; keep all by default")

    @field_validator("percentiles")
    @classmethod
    def _ordered_percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 <= low <= high <= 100.0:
            raise ValueError(f"percentiles {value}: need 0 <= head cut <= tail cut <= 100")
        return value

    @field_validator("drop_buckets", mode="before")
    @classmethod
    def _known_buckets(cls, value):
        return check_choices(value, BUCKETS, "perplexity bucket")


def _codes(text: str, order: int) -> np.ndarray:
    """int64 code points of the text with order-1 BOS pads in front."""
    arr_N = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    return np.concatenate([np.full(order - 1, _BOS, dtype=np.uint64), arr_N + np.uint64(3)])


def _gram_keys(codes_N: np.ndarray, k: int) -> np.ndarray:
    """Hash of the k-gram ending at each position >= k-1 (k >= 1); result length N-k+1.

    Keys of different orders never need to be told apart: each order has its own table.
    """
    n = len(codes_N) - k + 1
    key = np.zeros(max(n, 0), dtype=np.uint64)
    for j in range(k):
        key = key * _MULT + codes_N[j : j + n]
    return key


def _lookup(table_keys_U: np.ndarray, table_vals_U: np.ndarray, keys_N: np.ndarray) -> np.ndarray:
    if len(table_keys_U) == 0:
        return np.zeros(len(keys_N), dtype=table_vals_U.dtype)
    idx = np.searchsorted(table_keys_U, keys_N)
    idx = np.minimum(idx, len(table_keys_U) - 1)
    found = table_keys_U[idx] == keys_N
    return np.where(found, table_vals_U[idx], 0)


@dataclass
class _OrderTable:
    gram_keys_U: np.ndarray  # sorted hashes of k-grams
    gram_counts_U: np.ndarray  # raw count (top order) or continuation count (lower orders)
    ctx_keys_U: np.ndarray  # sorted hashes of (k-1)-gram contexts
    ctx_totals_U: np.ndarray  # sum of gram counts over the context's continuations
    ctx_types_U: np.ndarray  # number of distinct continuations with count > 0
    discount: float


class CharNgramLM:
    """Interpolated Kneser-Ney character LM. ``fit`` once, then ``perplexity`` per text."""

    def __init__(self, order: int = 5):
        self.order = order
        self.tables: list[_OrderTable] = []  # index k-1 for order k
        self.vocab_size = 0

    # ------------------------------------------------------------ training
    def fit(self, texts: list[str]) -> "CharNgramLM":
        order = self.order
        per_order_grams: list[list[np.ndarray]] = [[] for _ in range(order + 1)]
        per_order_ctx: list[list[np.ndarray]] = [[] for _ in range(order + 1)]
        for text in texts:
            codes_N = _codes(text, order)
            for k in range(1, order + 1):
                # n-grams ending at real characters only (positions >= order-1)
                grams = _gram_keys(codes_N, k)[order - k :]
                ctx = _gram_keys(codes_N[:-1], k - 1)[order - k :] if k > 1 else np.zeros(len(grams), np.uint64)
                per_order_grams[k].append(grams)
                per_order_ctx[k].append(ctx)
        grams = {k: np.concatenate(per_order_grams[k]) if per_order_grams[k] else np.zeros(0, np.uint64) for k in range(1, order + 1)}
        ctxs = {k: np.concatenate(per_order_ctx[k]) if per_order_ctx[k] else np.zeros(0, np.uint64) for k in range(1, order + 1)}
        self.vocab_size = int(len(np.unique(grams[1]))) + 1  # +1: mass for unseen characters

        counts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        # top order: raw counts
        keys, first, cnt = np.unique(grams[order], return_index=True, return_counts=True)
        counts[order] = (keys, cnt.astype(np.float64), ctxs[order][first])
        # lower orders: continuation counts = distinct left extensions (k+1)-grams per k-gram
        for k in range(order - 1, 0, -1):
            _, up_first = np.unique(grams[k + 1], return_index=True)
            # the k-gram suffix of each distinct (k+1)-gram, read at the same position
            suffix = grams[k][up_first]  # both arrays are aligned on the end position
            keys_k, cont = np.unique(suffix, return_counts=True)
            _, first_k = np.unique(grams[k], return_index=True)
            all_keys_k = np.unique(grams[k])
            ctx_of = ctxs[k][first_k]
            # every k-gram seen has at least one left extension unless it starts the text
            cont_full = _lookup(keys_k, cont.astype(np.float64), all_keys_k)
            counts[k] = (all_keys_k, np.maximum(cont_full, 1.0), ctx_of)

        self.tables = []
        for k in range(1, order + 1):
            keys, vals, ctx = counts[k]
            n1 = float(np.sum(vals == 1))
            n2 = float(np.sum(vals == 2))
            discount = min(0.9, max(0.1, n1 / (n1 + 2 * n2))) if n1 + n2 > 0 else 0.5
            ctx_keys, inverse = np.unique(ctx, return_inverse=True)
            totals = np.bincount(inverse, weights=vals, minlength=len(ctx_keys))
            types = np.bincount(inverse, minlength=len(ctx_keys)).astype(np.float64)
            self.tables.append(_OrderTable(keys, vals, ctx_keys, totals, types, discount))
        return self

    # ------------------------------------------------------------ scoring
    def log_probs(self, text: str) -> np.ndarray:
        """Natural-log probability of each character of ``text`` (length len(text))."""
        if not self.tables:
            raise RuntimeError("CharNgramLM is not fitted")
        order = self.order
        codes_N = _codes(text, order)
        num_chars = len(codes_N) - (order - 1)
        prob_N = np.full(num_chars, 1.0 / self.vocab_size)
        for k in range(1, order + 1):
            table = self.tables[k - 1]
            grams = _gram_keys(codes_N, k)[order - k :]
            ctx = _gram_keys(codes_N[:-1], k - 1)[order - k :] if k > 1 else np.zeros(num_chars, np.uint64)
            cnt_N = _lookup(table.gram_keys_U, table.gram_counts_U, grams)
            tot_N = _lookup(table.ctx_keys_U, table.ctx_totals_U, ctx)
            typ_N = _lookup(table.ctx_keys_U, table.ctx_types_U, ctx)
            seen = tot_N > 0
            safe_tot = np.where(seen, tot_N, 1.0)
            interp = np.maximum(cnt_N - table.discount, 0.0) / safe_tot + table.discount * typ_N / safe_tot * prob_N
            prob_N = np.where(seen, interp, prob_N)
        return np.log(prob_N)

    def perplexity(self, text: str, max_chars: int | None = None) -> float:
        if max_chars is not None:
            text = text[:max_chars]
        if not text:
            return math.inf
        return float(math.exp(-float(np.mean(self.log_probs(text)))))


def bucket_thresholds(scores: np.ndarray, percentiles: tuple[float, float] = (30.0, 60.0)) -> tuple[float, float]:
    """Perplexity values at the head/middle and middle/tail cuts (CCNet: 30th and 60th percentile)."""
    finite = np.sort(scores[np.isfinite(scores)])
    if len(finite) == 0:
        return math.inf, math.inf
    lo, hi = np.percentile(finite, list(percentiles), method="lower")
    return float(lo), float(hi)


def bucket_of(score: float, thresholds: tuple[float, float]) -> str:
    """head below the first cut, middle below the second, tail above (ties go to the lower bucket)."""
    if score <= thresholds[0]:
        return "head"
    if score <= thresholds[1]:
        return "middle"
    return "tail"
