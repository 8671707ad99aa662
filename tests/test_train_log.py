"""History and expert-load log as appended train-log segments, not re-pickled into every checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moeflow.models.train import state as train_state
from moeflow.platform.store import LocalStore, NotFoundError
from moeflow.platform.train.checkpoint import CheckpointManager
from moeflow.platform.train.config import PretrainConfig
from moeflow.platform.train.expert_load import NPZ_NAME, ExpertLoadRecorder
from moeflow.platform.train.launcher import train_worker
from moeflow.platform.train.train_log import HISTORY_NAME, TrainLog, checkpoint_log
from train_fakes import one_thread, pattern_docs, tiny_model_overrides, write_token_artifact


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _recorder(steps) -> ExpertLoadRecorder:
    rec = ExpertLoadRecorder()
    for s in steps:
        rec.record(s, np.full((2, 4), float(s)), np.zeros((2, 4)))
    return rec


def test_segments_chain_back_from_a_checkpoint_and_ignore_abandoned_branches(tmp_path):
    store = LocalStore(tmp_path / "s")
    log = TrainLog(store, "runs/x")
    history = [{"step": s, "loss": 10.0 - s} for s in (2, 4, 6, 8, 10, 12)]
    rec = _recorder([2, 4, 6, 8, 10, 12])
    log.append(4, 0, history, rec)
    log.append(8, 4, history, rec)
    log.append(12, 8, history, rec)  # a branch later abandoned (say checkpoint 12 never committed)
    # segment 8 holds only (4, 8]: nothing is written twice
    seg8 = store.read_artifact(log.segment_prefix(8))
    assert [json.loads(r)["step"] for r in seg8.get_bytes(HISTORY_NAME).decode().splitlines()] == [6, 8]
    # resumed from 8, the run re-logs 10 differently and checkpoints at 10 (from 8): 12 is not in its chain
    log.append(10, 8, [{"step": 10, "loss": -1.0}], _recorder([10]))
    rows, recorder = log.read(10)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10] and rows[-1]["loss"] == -1.0
    assert recorder.steps == [2, 4, 6, 8, 10]
    np.testing.assert_array_equal(recorder.arrays()["counts"][:, 0, 0], [2, 4, 6, 8, 10])
    with pytest.raises(NotFoundError, match="segment for step 6 is missing"):
        log.read(6)
    with pytest.raises(ValueError):
        log.append(4, 4, history, rec)


def test_checkpoints_no_longer_carry_the_history_and_resume_reads_the_log(tmp_path):
    store = LocalStore(tmp_path / "store")
    tokens_uri = write_token_artifact(store, "datasets/fake/tokens/abc", pattern_docs(200, seed=0),
                                      pattern_docs(30, seed=99), shard_tokens=3000)
    cfg = PretrainConfig(model_overrides=tiny_model_overrides(), seq_len=32, micro_batch_size=4, max_steps=12,
                         lr=1e-2, warmup_steps=2, log_every=2, val_every=0, checkpoint_every=4, keep_checkpoints=3)
    launch = {"pretrain": cfg.to_dict(), "tokens_uri": tokens_uri, "store_uri": store.root_uri,
              "tracking": "noop", "device": "cpu"}
    train_worker({**launch, "output_prefix": "runs/straight"})
    manager = CheckpointManager(store, "runs/straight")
    for ref in manager.list():
        local = manager.download(ref, tmp_path / f"ck{ref.step}")
        assert not (local / NPZ_NAME).exists()
        t_state = torch.load(local / train_state.TRAINER_FILE, weights_only=False)
        assert "history" not in t_state["loop"]  # the trainer state does not grow with the run
    straight, straight_load = TrainLog(store, "runs/straight").read(12)
    assert [r["step"] for r in straight] == [2, 4, 6, 8, 10, 12] and straight_load.steps == [2, 4, 6, 8, 10, 12]

    # stop at 8 (a run with max_steps 8), then continue to 12: the log reads back and is continued
    short = PretrainConfig(**{**cfg.to_dict(), "max_steps": 8}).to_dict()
    train_worker({**launch, "pretrain": short, "output_prefix": "runs/resumed"})
    before, _ = TrainLog(store, "runs/resumed").read(8)
    result = train_worker({**launch, "output_prefix": "runs/resumed"})
    assert result["steps"] == 12
    resumed, resumed_load = TrainLog(store, "runs/resumed").read(12)
    assert [r["step"] for r in resumed] == [2, 4, 6, 8, 10, 12] and resumed_load.steps == [2, 4, 6, 8, 10, 12]
    assert resumed[:4] == before  # the first 8 steps' rows are carried, not re-logged or lost


def test_an_older_checkpoint_with_history_inside_still_loads(tmp_path):
    """Checkpoints written before the train log: history in trainer.pt's loop, expert_load.npz beside it."""
    local = tmp_path / "old"
    local.mkdir()
    _recorder([2, 4, 6]).save(local / NPZ_NAME)
    t_state = {"loop": {"step": 4, "history": [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.0},
                                               {"step": 6, "loss": 1.0}]}}
    history, recorder, inside = checkpoint_log(local, t_state, TrainLog(LocalStore(tmp_path / "s"), "runs/o"), 4)
    assert inside and [r["step"] for r in history] == [2, 4] and recorder.steps == [2, 4]
