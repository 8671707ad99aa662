"""Choosing MinHash LSH bands x rows from the near-dedup threshold, and the S-curve to publish.

A pair of documents with Jaccard similarity J agrees on each MinHash entry with probability J,
independently across entries. Near dedup finds a pair when (1) the two signatures are equal on
all ``rows`` entries of at least one of ``bands`` bands (a candidate), and (2) with verification,
the fraction of equal entries over all ``n = bands * rows`` is at least ``verify_threshold``.
``detection_probability`` computes P(1 and 2) exactly: the count of agreeing entries is a sum
of per-band binomials, so P(2 and no full band) comes from convolving the band distribution
without its "all rows agree" term. The two events are positively correlated, so this is higher
than the product of the banding S-curve and the verification tail.

``choose_banding(threshold, num_perm, verify_threshold, min_recall)`` takes, among the splits
``bands = num_perm // rows`` (for every ``rows``), those that detect a pair exactly at the
threshold with probability >= ``min_recall`` (the detection probability grows with J, so every
pair above the threshold is caught at least as often), and returns the one with the smallest
false-candidate area ``integral_0^v P(candidate | J) dJ``: the candidate pairs below the
verification threshold that only cost work. The fixed 14 x 8 with verification at 0.75 detects
0.87 of the pairs at J = 0.8; the default (threshold 0.8, 128 permutations, verification at 0.72,
min_recall 0.95) chooses 18 x 7 = 126 hashes and detects 0.97 of them.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

S_CURVE_POINTS = (0.7, 0.8, 0.9)
_AREA_POINTS = 401  # Simpson's rule over [0, v]: the integrand is smooth and monotone


def candidate_probability(j: float, bands: int, rows: int) -> float:
    """P(a pair with Jaccard ``j`` shares at least one band): the LSH S-curve."""
    return float(1.0 - (1.0 - j**rows) ** bands)


def _agreement_pmf(j: float, rows: int, bands: int, full_bands: bool) -> np.ndarray:
    """Distribution of the number of agreeing entries over all bands; without ``full_bands``
    only the outcomes where no band agrees on all its rows (improper: sums to P(no candidate))."""
    band = np.array([math.comb(rows, c) * j**c * (1.0 - j) ** (rows - c) for c in range(rows + 1)])
    if not full_bands:
        band = band[:-1]
    pmf = np.ones(1)
    for _ in range(bands):
        pmf = np.convolve(pmf, band)
    return pmf


def detection_probability(j: float, bands: int, rows: int, verify_threshold: float | None) -> float:
    """P(candidate and, with ``verify_threshold``, estimated Jaccard >= it) for true Jaccard ``j``."""
    if verify_threshold is None:
        return candidate_probability(j, bands, rows)
    n = bands * rows
    passes = np.arange(n + 1) / n >= verify_threshold  # the same float test as the verification
    tail = _agreement_pmf(j, rows, bands, True)[passes].sum()
    no_candidate = _agreement_pmf(j, rows, bands, False)
    no_candidate_tail = no_candidate[passes[: len(no_candidate)]].sum()
    return float(min(1.0, max(0.0, tail - no_candidate_tail)))


def false_candidate_area(bands: int, rows: int, upto: float) -> float:
    """integral_0^upto P(candidate | J) dJ (Simpson's rule)."""
    x = np.linspace(0.0, upto, _AREA_POINTS)
    y = 1.0 - (1.0 - x**rows) ** bands
    weights = np.ones(_AREA_POINTS)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return float((x[1] - x[0]) / 3.0 * (weights @ y))


@lru_cache(maxsize=256)
def choose_banding(threshold: float, num_perm: int, verify_threshold: float | None, min_recall: float) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm, chosen as the module docstring says."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    upto = threshold if verify_threshold is None else verify_threshold
    best, feasible = None, []
    for rows in range(1, min(num_perm, 64) + 1):
        bands = num_perm // rows
        p = detection_probability(threshold, bands, rows, verify_threshold)
        if best is None or p > best[0]:
            best = (p, bands, rows)
        if p >= min_recall:
            feasible.append((false_candidate_area(bands, rows, upto), -rows, bands, rows))
    if not feasible:
        p, bands, rows = best
        raise ValueError(
            f"near dedup cannot reach recall {min_recall} at J={threshold} with {num_perm} permutations and "
            f"verification at {verify_threshold}: the best split, {bands}x{rows}, detects {p:.3f}; raise num_perm "
            "or verify_margin, or lower min_recall")
    _, _, bands, rows = min(feasible)
    return bands, rows


def s_curve(bands: int, rows: int, verify_threshold: float | None, points=S_CURVE_POINTS) -> list[dict]:
    """Rows {jaccard, p_candidate, p_detect} of the S-curve at ``points``."""
    return [{"jaccard": j, "p_candidate": round(candidate_probability(j, bands, rows), 4),
             "p_detect": round(detection_probability(j, bands, rows, verify_threshold), 4)} for j in points]


def s_curve_rows(near_dedup) -> list[dict]:
    """The S-curve of a ``NearDedupConfig`` (its chosen or explicit banding and verification)."""
    bands, rows = near_dedup.banding()
    return s_curve(bands, rows, near_dedup.verify_threshold)
