"""Ray Train V2 runs of the tiny model on 2 gloo CPU workers (one shared local Ray for the module):
the loss falls; a worker SIGKILLed mid-run is restarted by FailureConfig and the run finishes from
the last checkpoint with exactly the uninterrupted loss curve."""

from __future__ import annotations

import os
import pytest

from moeflow.platform.store import LocalStore
from moeflow.platform.train.checkpoint import CheckpointManager
from moeflow.platform.train.train_log import TrainLog
from moeflow.platform.train.launcher import run_pretrain
from moeflow.platform.tracking import NoopTracker
from test_train_launcher import tiny_config
from train_fakes import pattern_docs, write_token_artifact

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_store(tmp_path_factory):
    from moeflow.platform.compute import ensure_ray

    # ray.init() without an address joins any cluster named in /tmp/ray/ray_current_cluster (another
    # session's `ray start`, possibly stale); "local" makes it start our own
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    ensure_ray()  # one local Ray for the module (conftest bounds it: 2 CPUs, 256 MB object store)
    store = LocalStore(tmp_path_factory.mktemp("ray-store"))
    uri = write_token_artifact(store, "datasets/fake/tokens/ray", pattern_docs(400, seed=0),
                               pattern_docs(60, seed=99), shard_tokens=3000)
    yield store, uri
    import ray

    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


def _history(store, prefix, tmp_path):
    rows = TrainLog(store, prefix).read(CheckpointManager(store, prefix).latest().step)[0]  # the train log
    return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in rows]


def test_two_worker_ray_run_learns_and_survives_a_killed_worker(ray_store, tmp_path):
    """One Ray run (Ray starts are slow): rank 1 SIGKILLs itself after step 6 on the first attempt;
    FailureConfig restarts the worker group, which resumes from the step-4 checkpoint and finishes.
    (Exact equality of a resumed run with an uninterrupted one is tested without Ray, where it is
    cheap: tests/test_train_loop.py and test_train_launcher.py.)"""
    store, tokens_uri = ray_store
    cfg = tiny_config(max_steps=16, log_every=2, val_every=8, checkpoint_every=4)
    marker = tmp_path / "killed-once"
    tracker = NoopTracker()
    with tracker.start_run("ray"):
        result = run_pretrain(cfg, store, tokens_uri=tokens_uri, output_prefix="runs/ray", num_workers=2,
                              tracker=tracker, extra_launch={"fault_step": 6, "fault_rank": 1,
                                                             "fault_marker": str(marker)})
    assert marker.exists(), "the fault was never injected"
    assert "killed pid" in marker.read_text()
    assert result.steps == 16
    history = _history(store, "runs/ray", tmp_path)
    loss_steps = [h["step"] for h in history if "loss" in h]
    assert loss_steps == [2, 4, 6, 8, 10, 12, 14, 16]  # resumed at 4: steps 5-6 replayed once, not twice
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < 0.75 * losses[0], losses
    from moeflow.platform.train.evaluate import evaluate_checkpoint

    evaluated = evaluate_checkpoint(result.checkpoint_uri, tokens_uri, batch_size=4, num_batches=2)
    assert evaluated["val_loss"] < evaluated["unigram_loss"]
    assert result.metrics["val_loss"] == history[-1]["val_loss"]  # training's own last validation
    assert [v for _, v in tracker.metric_history("loss")] == losses  # replayed from rank 0's history
    # global batch: 2 ranks x 4 rows x 32 tokens per step
    assert history[0]["tokens_seen"] == 2 * 2 * 4 * 32


def test_workers_ray_cannot_place_fail_clearly_after_the_timeout(ray_store, caplog):
    """3 workers of 1 CPU on a 2-CPU Ray: say what it waits for, then give up (Ray Train alone waits forever)."""
    import logging
    import time

    from moeflow.platform.train.ray_launch import PlacementTimeout, launch_ray, wait_for_placement

    wait_for_placement(2, {"CPU": 1.0}, timeout_s=30)  # control: what fits is placed (and released)
    caplog.set_level(logging.WARNING, logger="moeflow")
    t0 = time.monotonic()
    with pytest.raises(PlacementTimeout, match=r"3 training worker\(s\) of \{'CPU': 1.0\} \(needs \{'CPU': 3.0\}\); "
                                               r"cluster total \{'CPU': 2.0\}.*gave up after 3s"):
        launch_ray({"run_name": "unplaceable"}, num_workers=3, placement_timeout_s=3)
    assert time.monotonic() - t0 < 30
    assert any("waiting for Ray to place 3 training worker(s)" in r.getMessage() for r in caplog.records)
    wait_for_placement(2, {"CPU": 1.0}, timeout_s=30)  # the failed attempt released what it reserved
