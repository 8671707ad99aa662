"""Expert and pipeline parallelism launched through Ray Train (``run_pretrain`` -> ``launch_ray``, one
local Ray of 2 CPUs, 2 gloo CPU workers), against the same runs without Ray:

* EP (expert_parallel=2): the Ray run logs what the same run spawned as 2 torchrun-style ranks logs, and
  its last checkpoint holds the same weights (its dp x ep split of the data has no one-process twin; the
  EP-vs-one-process equality is tests/test_train_expert_parallel.py's);
* PP (pipeline_parallel=2): the Ray run logs what the one-process run logs and its checkpoint (finalised
  and exported by ``run_pretrain``) holds the one-process weights.
"""

from __future__ import annotations

import os

import pytest
import torch

from moeflow.platform.store import LocalStore
from moeflow.platform.tracking import NoopTracker
from moeflow.platform.train.launcher import run_pretrain, train_worker
from test_train_pipeline_worker import (_assert_same_history, _assert_same_weights, _config, _history, _launch,
                                        _spawn)
from train_fakes import pattern_docs, write_token_artifact

pytestmark = pytest.mark.slow  # a local Ray start and four 2-worker runs


@pytest.fixture(scope="module")
def ray_data(tmp_path_factory):
    from moeflow.platform.compute import ensure_ray

    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"  # our own Ray, never another session's cluster
    ensure_ray()
    store = LocalStore(tmp_path_factory.mktemp("ray-par-store"))
    uri = write_token_artifact(store, "datasets/fake/tokens/par", pattern_docs(200, seed=0), pattern_docs(30, seed=99),
                               shard_tokens=3000)
    yield store, uri
    import ray

    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


def _ray_run(store, uri: str, cfg, prefix: str):
    tracker = NoopTracker()
    with tracker.start_run(prefix):
        return run_pretrain(cfg, store, tokens_uri=uri, output_prefix=prefix, num_workers=2, tracker=tracker,
                            use_ray=True)


def _weights(store, prefix: str, local):
    from moeflow.models.train import state as train_state
    from moeflow.platform.train.checkpoint import CheckpointManager

    manager = CheckpointManager(store, prefix)
    return train_state.load_model_weights(manager.download(manager.latest(), local))


def test_ray_expert_parallel_matches_the_spawned_ep_run(ray_data, tmp_path):
    store, uri = ray_data
    cfg = _config(pp=1, expert_parallel=2)
    _spawn(2, _launch(store, uri, cfg, "runs/ep-spawn"))
    result = _ray_run(store, uri, cfg, "runs/ep-ray")
    assert result.steps == cfg.max_steps
    _assert_same_history(_history(store, "runs/ep-ray"), _history(store, "runs/ep-spawn"))
    _assert_same_weights(store, "runs/ep-ray", _weights(store, "runs/ep-spawn", tmp_path / "spawn"), tmp_path / "ray")


def test_ray_pipeline_parallel_matches_one_process(ray_data, tmp_path):
    store, uri = ray_data
    torch.set_num_threads(1)
    train_worker(_launch(store, uri, _config(pp=1), "runs/one"))
    result = _ray_run(store, uri, _config(pp=2), "runs/pp-ray")
    assert result.steps == _config(pp=2).max_steps and result.hf_uri  # finalised: the PP checkpoint exported
    _assert_same_history(_history(store, "runs/pp-ray"), _history(store, "runs/one"))
    _assert_same_weights(store, "runs/pp-ray", _weights(store, "runs/one", tmp_path / "one"), tmp_path / "ray")
