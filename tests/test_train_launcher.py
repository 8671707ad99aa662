"""The platform side of pretraining: store checkpoints, in-process run_pretrain, the CLI killed and
resumed, and Ray Train runs (2 gloo workers; one of them SIGKILLed mid-run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow.platform.train.config import PretrainConfig
from moeflow.platform.store import LocalStore
from moeflow.platform.train.checkpoint import CheckpointManager
from moeflow.platform.train.expert_load import ExpertLoadRecorder, expert_metrics, load_expert_load
from moeflow.platform.train.launcher import LaunchConfig, run_pretrain, train_worker
from moeflow.platform.train.train_log import TrainLog
from moeflow.platform.tracking import NoopTracker
from train_fakes import one_thread, pattern_docs, tiny_model_overrides, write_token_artifact

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def token_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    store = LocalStore(root)
    uri = write_token_artifact(store, "datasets/fake/tokens/abc", pattern_docs(400, seed=0),
                               pattern_docs(60, seed=99), shard_tokens=3000)
    return store, uri


def tiny_config(**kw) -> PretrainConfig:
    base = dict(model_overrides=tiny_model_overrides(), seq_len=32, micro_batch_size=4, max_steps=24, lr=1e-2,
                warmup_steps=3, log_every=2, val_every=12, val_batches=2, checkpoint_every=4, keep_checkpoints=2)
    base.update(kw)
    return PretrainConfig(**base)


# ------------------------------------------------------------------ store pieces
def test_checkpoint_manager_commits_prunes_and_finds_latest(tmp_path):
    store = LocalStore(tmp_path / "s")
    manager = CheckpointManager(store, "runs/a", keep_last=2)
    assert manager.latest() is None
    for step in (4, 8, 12):
        d = tmp_path / f"c{step}"
        d.mkdir()
        (d / "model.pt").write_bytes(b"x" * step)
        manager.save(step, d)
    assert [r.step for r in manager.list()] == [8, 12]
    # a half-written checkpoint (staged files, no manifest) is invisible
    store.put_bytes("runs/a/checkpoints/step-00000016/.tmp-dead/model.pt", b"partial")
    assert manager.latest().step == 12
    out = manager.download(manager.latest(), tmp_path / "dl")
    assert (out / "model.pt").read_bytes() == b"x" * 12


def test_expert_load_recorder_round_trip():
    rec = ExpertLoadRecorder()
    rec.record(2, np.array([[1, 3], [2, 2]]), np.array([[0.1, -0.1], [0, 0]]))
    rec.record(4, np.array([[2, 2], [4, 0]]))
    back = ExpertLoadRecorder.from_npz_bytes(rec.to_npz_bytes())
    arrays = load_expert_load(back.to_npz_bytes())
    assert arrays["counts"].shape == (2, 2, 2) and arrays["steps"].tolist() == [2, 4]
    assert np.allclose(arrays["bias"][0], [[0.1, -0.1], [0, 0]]) and not arrays["bias"][1].any()
    back.truncate(2)
    assert len(back) == 1
    assert expert_metrics(np.array([[1.0, 3.0]])) == {"expert_load/layer0/max_share": 0.75,
                                                      "expert_load/layer0/min_share": 0.25}


# ------------------------------------------------------------------ in-process run_pretrain
def test_run_pretrain_in_process_learns_exports_and_registers(token_store, moeflow_home):
    from moeflow.platform.catalog import Catalog

    store, tokens_uri = token_store
    tracker, catalog = NoopTracker(), Catalog.from_settings()
    with tracker.start_run("pretrain-test"):
        result = run_pretrain(tiny_config(), store, tokens_uri=tokens_uri, output_prefix="runs/inproc",
                              num_workers=1, tracker=tracker, catalog=catalog)
    assert result.steps == 24 and result.checkpoint_uri.endswith("checkpoints/step-00000024")
    assert [r.step for r in CheckpointManager(store, "runs/inproc").list()] == [20, 24]  # keep_last=2
    losses = [v for _, v in tracker.metric_history("loss")]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]
    m = result.metrics  # what training measured: no second evaluation in finalisation
    assert set(m) == {"train_loss", "val_loss", "val_bpb"}, m
    assert m["train_loss"] == pytest.approx(losses[-1])
    assert m["val_bpb"] == pytest.approx(m["val_loss"] / np.log(2) / 3.0)
    for key in ("maxvio_batch/layer0", "router_entropy/layer0", "router_bias/max_abs", "grad_norm", "lr",
                "expert_load/layer0/max_share"):
        assert tracker.metric_history(key), key
    # one-off final values are single values, not series; expert load is one heatmap figure
    assert tracker.summary["final/val_loss"] == m["val_loss"] and not tracker.metric_history("final/val_loss")
    assert tracker.figures == ["expert_load/heatmap.png"]
    art = store.read_artifact(result.expert_load_uri)
    arrays = load_expert_load(art.get_bytes("expert_load.npz"))
    assert arrays["counts"].shape == (12, 1, 4) and arrays["steps"][-1] == 24
    assert arrays["counts"][0].sum() == 2 * 4 * 32 * 2  # 2 steps x rows x tokens x top-2
    hf = store.read_artifact(result.hf_uri)
    assert "config.json" in hf.names() and "tokenizer.json" in hf.names()
    assert json.loads(hf.get_bytes("config.json"))["model_type"] == "deepseek_v3"
    from moeflow.platform.train.evaluate import evaluate_checkpoint

    again = evaluate_checkpoint(result.checkpoint_uri, tokens_uri, batch_size=4, num_batches=2)
    assert again["val_loss"] == pytest.approx(m["val_loss"], rel=1e-6) and again["step"] == 24
    assert again["val_loss"] < again["unigram_loss"] - 0.5, again  # learnt more than token frequencies
    registered = [m["checkpoint_uri"] for m in catalog.list_models(name="moe")]
    # every committed checkpoint recorded once; the final model is the stage's to record (tasks/pretrain)
    assert sorted(registered) == sorted(f"{store.root_uri}/runs/inproc/checkpoints/step-{s:08d}"
                                        for s in range(4, 25, 4)), registered


# ------------------------------------------------------------------ the CLI: SIGKILL, then resume exactly
def _cli(config_path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeflow.platform.train.launcher", "--config", str(config_path)],
                          cwd=str(REPO.parent), env=env, capture_output=True, text=True, timeout=300)


def test_cli_killed_mid_run_resumes_to_the_uninterrupted_result(token_store, tmp_path):
    store, tokens_uri = token_store
    env = {**os.environ, "MOEFLOW_TRACKING": "noop", "OMP_NUM_THREADS": "1", "MOEFLOW_HOME": str(tmp_path / "home")}
    cfg = tiny_config(max_steps=12, log_every=1, val_every=0)
    base = dict(pretrain=cfg.to_dict(), tokens_uri=tokens_uri, store_uri=store.root_uri, tracking="noop",
                device="cpu")
    # uninterrupted, in this process
    train_worker({**base, "output_prefix": "runs/cli-ref"})
    # killed after step 6 (checkpoint at 4), then started again
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**base, "output_prefix": "runs/cli", "fault_step": 6,
                                "fault_marker": str(tmp_path / "killed")}))
    first = _cli(path, env)
    assert first.returncode == -9, first.stderr[-2000:]
    assert CheckpointManager(store, "runs/cli").latest().step == 4
    second = _cli(path, env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads(second.stdout)["steps"] == 12

    def history(prefix):  # the train log (checkpoints no longer carry the history)
        return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in TrainLog(store, prefix).read(12)[0]]

    assert history("runs/cli") == history("runs/cli-ref")


# ------------------------------------------------------------------ torchrun: DDP vs FSDP2, FSDP2 killed + resumed
def _torchrun(config_path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "moeflow.platform.train.launcher",
                           "--config", str(config_path)],
                          cwd=str(tmp_cwd()), env=env, capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tmp_cwd() -> Path:
    return REPO.parent


@pytest.mark.slow
def test_torchrun_fsdp2_killed_and_resumed_matches_ddp(token_store, tmp_path):
    store, tokens_uri = token_store
    env = {**os.environ, "MOEFLOW_TRACKING": "noop", "OMP_NUM_THREADS": "1", "MOEFLOW_HOME": str(tmp_path / "home")}
    runs = {}
    for name, parallelism, fault in (("ddp", "ddp", None), ("fsdp", "fsdp", 6)):
        cfg = tiny_config(max_steps=8, log_every=2, val_every=4, checkpoint_every=4, grad_accum_steps=2,
                          parallelism=parallelism)
        launch = {"pretrain": cfg.to_dict(), "tokens_uri": tokens_uri, "output_prefix": f"runs/tr-{name}",
                  "store_uri": store.root_uri, "tracking": "noop", "device": "cpu"}
        if fault:
            launch.update(fault_step=fault, fault_rank=1, fault_marker=str(tmp_path / "fsdp-killed"))
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(launch))
        proc = _torchrun(path, env)
        if fault:  # torchrun tears the group down when rank 1 dies; the checkpoint at step 4 survives
            assert proc.returncode != 0 and (tmp_path / "fsdp-killed").exists(), proc.stderr[-2000:]
            assert CheckpointManager(store, f"runs/tr-{name}").latest().step == 4
            proc = _torchrun(path, env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        last = CheckpointManager(store, f"runs/tr-{name}").latest().step
        runs[name] = [{k: v for k, v in h.items() if k != "tokens_per_s"}
                      for h in TrainLog(store, f"runs/tr-{name}").read(last)[0]]
    assert len(runs["ddp"]) == 4
    # identical losses, load statistics and biases; the gradient norm differs in the last bit only
    # (FSDP2 sums squares per shard before reducing: another summation order)
    for ddp_row, fsdp_row in zip(runs["ddp"], runs["fsdp"]):
        assert fsdp_row.pop("grad_norm") == pytest.approx(ddp_row.pop("grad_norm"), rel=1e-6)
        assert fsdp_row == ddp_row


def test_training_progress_reaches_the_library_log(token_store, caplog):
    """Each log step is a line on the 'moeflow' logger (Prefect forwards it: PREFECT_LOGGING_EXTRA_LOGGERS)."""
    import logging

    store, tokens_uri = token_store
    caplog.set_level(logging.INFO, logger="moeflow")
    train_worker({"pretrain": tiny_config(max_steps=4, log_every=2, val_every=4).to_dict(), "tokens_uri": tokens_uri,
                  "output_prefix": "runs/progress", "store_uri": store.root_uri, "tracking": "noop", "device": "cpu"})
    lines = [r.getMessage() for r in caplog.records if r.name == "moeflow.platform.train.worker"]
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["2/4", "4/4"], lines
    assert " loss " in steps[0] and " tok/s" in steps[0] and "val_loss" in steps[1]


def test_in_process_cpu_training_uses_one_thread_and_hands_the_setting_back(token_store, monkeypatch):
    """torch's default (a thread per core) made tiny CPU steps 10x slower on a loaded machine."""
    from moeflow.platform.train import worker

    store, tokens_uri = token_store
    seen = []
    real_fit = worker.Trainer.fit

    def fit(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(worker.Trainer, "fit", fit)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        launch = {"pretrain": tiny_config(max_steps=2, warmup_steps=1, log_every=1, val_every=0).to_dict(),
                  "tokens_uri": tokens_uri,
                  "store_uri": store.root_uri, "tracking": "noop", "device": "cpu"}
        train_worker({**launch, "output_prefix": "runs/threads-1"})
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        train_worker({**launch, "output_prefix": "runs/threads-2"})
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
