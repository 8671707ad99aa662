"""Expert load in MLflow: two summary series per layer, and one per-layer heatmap figure of every expert."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.platform.store import LocalStore
from moeflow.platform.tracking import NoopTracker
from moeflow.platform.train.expert_load import (NPZ_NAME, ExpertLoadRecorder, expert_load_figure, expert_metrics,
                                                log_expert_load_heatmap, relative_load_NLE)


def test_expert_metrics_are_two_per_layer_not_one_per_expert():
    counts_LE = np.array([[1.0, 3.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert expert_metrics(counts_LE) == {
        "expert_load/layer0/max_share": 0.75, "expert_load/layer0/min_share": 0.0,
        "expert_load/layer1/max_share": 0.25, "expert_load/layer1/min_share": 0.25,
    }
    assert len(expert_metrics(np.ones((60, 64)))) == 120  # not 3,840 series
    assert expert_metrics(np.zeros((0, 0))) == {}


def test_relative_load_against_a_hand_table():
    counts_NLE = np.array([[[2, 2, 0, 4]], [[0, 0, 0, 0]]], dtype=float)
    # shares [.25, .25, 0, .5] x 4 experts; an empty window is all zeros (no division by zero)
    assert relative_load_NLE(counts_NLE).tolist() == [[[1.0, 1.0, 0.0, 2.0]], [[0.0, 0.0, 0.0, 0.0]]]


def test_heatmap_has_one_panel_per_layer_showing_every_expert():
    counts_NLE = np.array([[[4, 4, 4, 4], [16, 0, 0, 0]], [[8, 0, 4, 4], [4, 4, 4, 4]], [[4, 4, 4, 4], [4, 4, 4, 4]]],
                          dtype=float)
    fig = expert_load_figure({"counts": counts_NLE, "steps": np.array([10, 20, 30])})
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2  # + the colour bar
    layer1 = np.asarray(panels[1].images[0].get_array())
    assert layer1.shape == (4, 3)  # experts x windows
    assert layer1[:, 0].tolist() == [4.0, 0.0, 0.0, 0.0]  # window 1: expert 0 took everything
    assert layer1[:, 1].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert panels[0].images[0].get_clim() == (0.0, 2.0)
    assert [t.get_text() for t in panels[1].get_xticklabels()] == ["10", "20", "30"]
    big = expert_load_figure({"counts": np.ones((2, 40, 8)), "steps": np.array([1, 2])}, max_layers=4)
    assert len([ax for ax in big.axes if ax.images]) == 4 and "first 4 of 40" in big.get_suptitle()
    with pytest.raises(ValueError, match="windows, layers, experts"):
        expert_load_figure({"counts": np.zeros((0,)), "steps": np.zeros(0)})


def test_heatmap_is_logged_from_the_runs_expert_load_artefact(tmp_path):
    store = LocalStore(tmp_path / "store")
    rec = ExpertLoadRecorder()
    rec.record(5, np.array([[3.0, 1.0]]))
    rec.record(10, np.array([[2.0, 2.0]]))
    with store.write_artifact("runs/x/expert_load") as w:
        w.put_bytes(NPZ_NAME, rec.to_npz_bytes())
    tracker = NoopTracker()
    with tracker.start_run("pretrain"):
        assert log_expert_load_heatmap(tracker, store, store.uri("runs/x/expert_load"))
    assert tracker.figures == ["expert_load/heatmap.png"]
    assert not log_expert_load_heatmap(tracker, store, None)
