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

``expert_metrics`` turns a window into two MLflow metrics per layer (the busiest and the idlest
expert's share of the layer's routed slots): a line per expert would be 16 lines per layer that
nobody can read, and thousands of series on a 64-expert × 60-layer model. The per-expert picture
is ``expert_load_figure``: one heatmap per layer (experts × log windows, colour = load relative to
a fair share), logged once at the end of training by ``log_expert_load_heatmap``.

Shape suffixes: N windows, L layers, E experts.
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


def expert_metrics(counts_LE) -> dict[str, float]:
    """Per layer, the largest and smallest share of the window's routed slots (a fair share is 1/E)."""
    counts = np.asarray(counts_LE, dtype=np.float64)
    if counts.size == 0:
        return {}
    share_LE = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)
    out: dict[str, float] = {}
    for layer in range(share_LE.shape[0]):
        out[f"expert_load/layer{layer}/max_share"] = float(share_LE[layer].max())
        out[f"expert_load/layer{layer}/min_share"] = float(share_LE[layer].min())
    return out


def relative_load_NLE(counts_NLE) -> np.ndarray:
    """Load of each expert relative to a fair share: share × E (1 = balanced, 0 = idle, 2 = double)."""
    counts = np.asarray(counts_NLE, dtype=np.float64)
    share = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1e-12)
    return share * counts.shape[-1]


def expert_load_figure(arrays: dict[str, np.ndarray], max_layers: int = 16):
    """A matplotlib figure: one heatmap per layer, experts (rows) × log windows (columns).

    Colour is the relative load (``relative_load_NLE``) on a diverging map centred on 1, clipped
    at 2, so a balanced layer is one even colour and a dead expert is a dark stripe. Only the first
    ``max_layers`` layers are drawn (the npz keeps them all). Built on ``matplotlib.figure.Figure``,
    not pyplot: no global state, no GUI backend, safe in a worker thread.
    """
    from matplotlib.figure import Figure

    counts_NLE, steps_N = np.asarray(arrays["counts"]), np.asarray(arrays["steps"])
    if counts_NLE.ndim != 3 or counts_NLE.shape[0] == 0:
        raise ValueError(f"expert load needs (windows, layers, experts) counts, got shape {counts_NLE.shape}")
    rel_NLE = relative_load_NLE(counts_NLE)
    N, L, E = rel_NLE.shape
    shown = min(L, max_layers)
    fig = Figure(figsize=(max(6.0, min(16.0, 0.15 * N + 3)), 1.0 + shown * max(1.2, min(4.0, 0.12 * E))),
                 layout="constrained")
    axes = fig.subplots(shown, 1, squeeze=False)[:, 0]
    image = None
    for layer, ax in enumerate(axes):
        image = ax.imshow(rel_NLE[:, layer, :].T, aspect="auto", interpolation="nearest", cmap="RdBu_r",
                          vmin=0.0, vmax=2.0, extent=(-0.5, N - 0.5, E - 0.5, -0.5))
        ax.set_ylabel(f"layer {layer}\nexpert")
        ticks = np.linspace(0, N - 1, num=min(N, 8)).round().astype(int)
        ax.set_xticks(ticks, [str(int(steps_N[i])) for i in ticks] if len(steps_N) == N else ticks)
    axes[-1].set_xlabel("step (end of log window)")
    fig.colorbar(image, ax=list(axes), label="load / fair share")
    title = "expert load per layer" + (f" (first {shown} of {L} layers)" if shown < L else "")
    fig.suptitle(title)
    return fig


def log_expert_load_heatmap(tracker, store, expert_load_uri: str | None,
                            artifact_file: str = "expert_load/heatmap.png") -> bool:
    """Log the heatmap of the run's expert-load artefact into the tracker's active run; False if none."""
    if tracker is None or not expert_load_uri or not hasattr(tracker, "log_figure"):
        return False
    arrays = load_expert_load(store.read_artifact(expert_load_uri).get_bytes(NPZ_NAME))
    if arrays["counts"].ndim != 3 or arrays["counts"].shape[0] == 0:
        return False
    tracker.log_figure(expert_load_figure(arrays), artifact_file)
    return True
