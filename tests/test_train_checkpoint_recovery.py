"""A corrupted newest checkpoint does not block resume: the newest intact one is used, and said so.

The store verifies every downloaded file against its manifest's sha256; here the newest checkpoint's
weights are overwritten in place (a bad disk or a truncated upload), which only the checksum sees.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from moeflow.models.train.state import load_model_weights

from moeflow.platform.store import ChecksumError, LocalStore
from moeflow.platform.train.checkpoint import CheckpointManager
from moeflow.platform.train.config import PretrainConfig
from moeflow.platform.train.launcher import train_worker
from moeflow.platform.train.train_log import TrainLog
from train_fakes import one_thread, pattern_docs, tiny_model_overrides, write_token_artifact


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _corrupt(store: LocalStore, manager: CheckpointManager, step: int, name: str = "model.pt") -> None:
    ref = next(r for r in manager.list() if r.step == step)
    path = store._path(f"{ref.prefix}/{name}")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))


def test_manager_skips_corrupted_newest_and_refuses_when_all_are_corrupted(tmp_path, caplog):
    store = LocalStore(tmp_path / "s")
    manager = CheckpointManager(store, "runs/a", keep_last=3)
    for step in (4, 8, 12):
        d = tmp_path / f"c{step}"
        d.mkdir()
        (d / "model.pt").write_bytes(bytes([step]) * 64)
        manager.save(step, d)
    _corrupt(store, manager, 12)
    caplog.set_level(logging.WARNING, logger="moeflow")
    loaded = []
    ref, checkpoint, skipped = manager.resume_newest_intact(tmp_path / "dl", lambda r, c: loaded.append(r.step))
    assert ref.step == 8 and loaded == [8] and (checkpoint.path / "model.pt").read_bytes() == bytes([8]) * 64
    assert len(skipped) == 1 and skipped[0].startswith("step 12 at ") and "corrupted" in skipped[0]
    assert any("checkpoint step 12 is corrupted" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "dl" / "resume-12").exists()  # no half-verified copy left behind
    for step in (4, 8):
        _corrupt(store, manager, step)
    with pytest.raises(ChecksumError, match="every checkpoint .* is corrupted: step 12 .*; step 8 .*; step 4 "):
        manager.resume_newest_intact(tmp_path / "dl2", lambda r, c: None)
    empty = CheckpointManager(store, "runs/empty")
    assert empty.resume_newest_intact(tmp_path / "dl3", lambda r, c: None) is None


def test_training_resumes_from_the_newest_intact_checkpoint_and_rewrites_the_corrupted_step(tmp_path, caplog):
    store = LocalStore(tmp_path / "store")
    tokens_uri = write_token_artifact(store, "datasets/fake/tokens/abc", pattern_docs(200, seed=0),
                                      pattern_docs(30, seed=99), shard_tokens=3000)
    cfg = PretrainConfig(model_overrides=tiny_model_overrides(), seq_len=32, micro_batch_size=4, max_steps=8,
                         lr=1e-2, warmup_steps=2, log_every=2, val_every=0, checkpoint_every=4, keep_checkpoints=3)
    launch = {"pretrain": cfg.to_dict(), "tokens_uri": tokens_uri, "output_prefix": "runs/c",
              "store_uri": store.root_uri, "tracking": "noop", "device": "cpu"}
    train_worker(launch)
    manager = CheckpointManager(store, "runs/c")
    assert [r.step for r in manager.list()] == [4, 8]
    reference = load_model_weights(manager.download(manager.list()[-1], tmp_path / "ref"))
    history_before, load_before = TrainLog(store, "runs/c").read(8)
    _corrupt(store, manager, 8, "model/__0_0.distcp")  # a shard of the sharded checkpoint

    caplog.set_level(logging.INFO, logger="moeflow")
    result = train_worker(launch)  # same config: resumes, re-trains steps 5..8, re-saves step 8
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("resuming from step 4, the newest intact checkpoint; skipped 1 corrupted: step 8 at ")
               for m in messages), messages
    assert result["steps"] == 8
    assert len(result["skipped_corrupted_checkpoints"]) == 1 and "step 8 at " in result["skipped_corrupted_checkpoints"][0]
    rewritten = load_model_weights(manager.download(manager.list()[-1], tmp_path / "new"))
    for name, tensor in reference.items():  # exact resume: bit-identical to the uninterrupted run
        assert torch.equal(tensor, rewritten[name]), name
    # and the train log read back at step 8 is the uninterrupted run's (throughput aside)
    history_after, load_after = TrainLog(store, "runs/c").read(8)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(history_after) == strip(history_before)
    np.testing.assert_array_equal(load_after.arrays()["counts"], load_before.arrays()["counts"])


def test_pruned_checkpoints_are_marked_in_the_catalog(tmp_path):
    from moeflow.platform.catalog import Catalog

    store = LocalStore(tmp_path / "s")
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    manager = CheckpointManager(store, "runs/p", keep_last=2, catalog=catalog, model_name="moe-p")
    for step in (4, 8, 12, 16):
        d = tmp_path / f"c{step}"
        d.mkdir()
        (d / "model.pt").write_bytes(bytes([step]) * 8)
        manager.save(step, d)
    rows = {m["metrics"]["step"]: m for m in catalog.list_models("moe-p")}
    assert sorted(rows) == [4, 8, 12, 16]  # every checkpoint stays registered (lineage) ...
    for step, row in rows.items():
        exists = store.artifact_exists(f"runs/p/checkpoints/step-{step:08d}")
        assert exists == (step in (12, 16))
        assert row["metrics"].get("pruned", 0) == (0 if exists else 1), (step, row["metrics"])  # ... marked
