"""Throughput and model-FLOPs utilisation (MFU).

MFU follows BENCHMARKS.md exactly:

    MFU = (6 × active non-embedding params + causal attention FLOPs) × tokens/s ÷ peak

with the per-token numerator from ``ModelConfig.flops_per_token(seq_len)`` (one place for the
arithmetic) and peak = 798 TFLOP/s, the bf16 matmul rate measured on the lent H100. On CPU
MFU is meaningless and not reported.
"""

from __future__ import annotations

import time

H100_BF16_PEAK_FLOPS = 798e12
MFU_FORMULA = "(6 * active_nonembedding_params + causal_attention_flops) * tokens_per_s / 798e12"


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float = H100_BF16_PEAK_FLOPS,
        num_devices: int = 1) -> float:
    """Fraction of the aggregate peak reached; tokens_per_s is the global rate over all devices."""
    if peak_flops <= 0 or num_devices <= 0:
        raise ValueError(f"peak_flops={peak_flops}, num_devices={num_devices}: must be > 0")
    return tokens_per_s * flops_per_token / (peak_flops * num_devices)


class ThroughputMeter:
    """Tokens per second over the window since the last ``read()`` (excludes checkpoint/eval time
    when the caller calls ``pause()``/``resume()`` around them)."""

    def __init__(self, clock=time.perf_counter) -> None:
        self._clock = clock
        self._start = clock()
        self._tokens = 0
        self._paused_at: float | None = None

    def add(self, num_tokens: int) -> None:
        self._tokens += int(num_tokens)

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = self._clock()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._start += self._clock() - self._paused_at
            self._paused_at = None

    def read(self) -> float:
        """Tokens/s since the previous read, then restart the window."""
        now = self._clock()
        elapsed = max(now - self._start, 1e-9)
        rate = self._tokens / elapsed
        self._start, self._tokens = now, 0
        return rate
