"""Per-layer expert load over training, stored compactly for the dashboard's heatmap.

Every log interval the loop closes a window of GLOBAL tokens-per-expert counts (summed over the
interval's optimiser steps, micro-batches and data-parallel ranks). ``ExpertLoadRecorder``
appends that (L, E) matrix with its step; ``to_npz`` writes

    steps    (N,)       int64   optimiser step that closed each window
    counts   (N, L, E)  float32 routed token slots per expert in the window
    bias     (N, L, E)  float32 router balancing bias at the end of the window
    layers   (L,)       int64   router row index (main MoE layers first, then MTP blocks)

so the dashboard draws a layer × expert × step heatmap from one small file instead of
reading L·E MLflow metrics one by one. The file travels inside each checkpoint (so a resumed
run continues the same history) and is written as its own artefact at the end of the run.

``expert_metrics`` turns a window into per-layer/per-expert MLflow metrics (load share), capped
so a 64-expert × 60-layer model does not flood the tracking server.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

NPZ_NAME = "expert_load.npz"


class ExpertLoadRecorder:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.counts: list[np.ndarray] = []
        self.biases: list[np.ndarray] = []

    def record(self, step: int, counts_LE, bias_LE=None) -> None:
        counts = np.asarray(counts_LE, dtype=np.float32)
        if counts.ndim != 2:
            raise ValueError(f"counts must be (layers, experts), got shape {counts.shape}")
        if self.counts and counts.shape != self.counts[0].shape:
            raise ValueError(f"counts shape {counts.shape} differs from earlier windows {self.counts[0].shape}")
        bias = np.zeros_like(counts) if bias_LE is None else np.asarray(bias_LE, dtype=np.float32)
        self.steps.append(int(step))
        self.counts.append(counts)
        self.biases.append(bias)

    def __len__(self) -> int:
        return len(self.steps)

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.counts:
            return {"steps": np.zeros(0, np.int64), "counts": np.zeros((0, 0, 0), np.float32),
                    "bias": np.zeros((0, 0, 0), np.float32), "layers": np.zeros(0, np.int64)}
        counts = np.stack(self.counts)
        return {"steps": np.asarray(self.steps, np.int64), "counts": counts, "bias": np.stack(self.biases),
                "layers": np.arange(counts.shape[1], dtype=np.int64)}

    def to_npz_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, **self.arrays())
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_npz_bytes())
        return path

    @classmethod
    def from_npz_bytes(cls, data: bytes) -> "ExpertLoadRecorder":
        rec = cls()
        with np.load(io.BytesIO(data)) as arrays:
            for step, counts, bias in zip(arrays["steps"], arrays["counts"], arrays["bias"]):
                rec.record(int(step), counts, bias)
        return rec

    def truncate(self, last_step: int) -> None:
        """Drop windows after ``last_step`` (a resumed run replays them)."""
        keep = [i for i, s in enumerate(self.steps) if s <= last_step]
        self.steps = [self.steps[i] for i in keep]
        self.counts = [self.counts[i] for i in keep]
        self.biases = [self.biases[i] for i in keep]


def load_expert_load(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an ``expert_load.npz`` (for the dashboard)."""
    with np.load(io.BytesIO(data)) as arrays:
        return {k: arrays[k] for k in arrays.files}


def expert_metrics(counts_LE, max_metrics: int = 512) -> dict[str, float]:
    """Load share of every expert per layer (sums to 1 per layer) as flat MLflow metrics."""
    counts = np.asarray(counts_LE, dtype=np.float64)
    if counts.size == 0 or counts.size > max_metrics:
        return {}
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)
    return {f"expert_load/layer{l}/expert{e}": float(share[l, e])
            for l in range(share.shape[0]) for e in range(share.shape[1])}
