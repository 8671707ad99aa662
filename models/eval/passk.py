"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples of which c pass, the probability that at least one of k samples drawn without
replacement passes is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

The product form never forms a binomial coefficient, so it stays exact in floating point for
n in the thousands (C(200, 100) overflows a float64 long before that matters for C(n, k)).
The naive estimator 1 - (1 - c/n)^k is biased low for k > 1; it is not used anywhere.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: n samples, c correct, k <= n."""
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """pass@k averaged over problems (each problem may have its own n; problems with n < k are refused)."""
    if len(num_samples) != len(num_correct) or not num_samples:
        raise ValueError("mean_pass_at_k: need equally long, non-empty num_samples and num_correct")
    short = [i for i, n in enumerate(num_samples) if n < k]
    if short:
        raise ValueError(f"mean_pass_at_k: {len(short)} problem(s) have fewer than k={k} samples (first: {short[0]})")
    return float(np.mean([pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)]))
