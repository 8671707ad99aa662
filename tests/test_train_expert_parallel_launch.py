"""Expert parallelism through the real launch path (torchrun, 2 gloo workers, ``expert_parallel=2``):
a run whose rank 1 is SIGKILLed after step 6 and re-launched resumes from the step-4 checkpoint and logs
exactly what the unbroken EP run logs; the EP run's checkpoint holds the one-process layout (all experts),
so it also resumes without EP (another EP size); its losses match a plain DDP run's within fp32 tolerance.
Config errors fail before launch."""

from __future__ import annotations

import json
import os

import pytest
import torch

from moeflow.models.train import state as train_state
from moeflow.platform.store import LocalStore
from moeflow.platform.train.checkpoint import CheckpointManager
from moeflow.platform.train.config import PretrainConfig
from moeflow.platform.train.launcher import run_pretrain
from moeflow.platform.train.train_log import TrainLog
from test_train_launcher import _torchrun, tiny_config, token_store  # noqa: F401 (token_store: a fixture)
from train_fakes import tiny_model_overrides


def _history(store, prefix: str) -> list[dict]:
    last = CheckpointManager(store, prefix).latest().step
    return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in TrainLog(store, prefix).read(last)[0]]


@pytest.mark.slow  # six torchrun launches of 2 workers
def test_torchrun_expert_parallel_killed_and_resumed_matches_unbroken(token_store, tmp_path):  # noqa: F811
    store, tokens_uri = token_store
    env = {**os.environ, "MOEFLOW_TRACKING": "noop", "OMP_NUM_THREADS": "1", "MOEFLOW_HOME": str(tmp_path / "home")}
    runs = {}
    # ep-to-ddp: an EP run killed after step 6 resumes from its step-4 checkpoint WITHOUT expert parallelism
    for name, ep, fault, resume_ep in (("ddp", 1, None, 1), ("ep", 2, None, 2), ("ep-killed", 2, 6, 2),
                                       ("ep-to-ddp", 2, 6, 1)):
        def write(ep_size: int):
            cfg = tiny_config(max_steps=8, log_every=2, val_every=4, checkpoint_every=4, grad_accum_steps=2,
                              expert_parallel=ep_size)
            launch = {"pretrain": cfg.to_dict(), "tokens_uri": tokens_uri, "output_prefix": f"runs/ep-{name}",
                      "store_uri": store.root_uri, "tracking": "noop", "device": "cpu"}
            if fault:
                launch.update(fault_step=fault, fault_rank=1, fault_marker=str(tmp_path / f"{name}-killed"))
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps(launch))
            return path

        proc = _torchrun(write(ep), env)
        if fault:
            assert proc.returncode != 0 and (tmp_path / f"{name}-killed").exists(), proc.stderr[-2000:]
            assert CheckpointManager(store, f"runs/ep-{name}").latest().step == 4
            proc = _torchrun(write(resume_ep), env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = _history(store, f"runs/ep-{name}")
    assert len(runs["ep"]) == 4
    assert runs["ep-killed"] == runs["ep"]  # kill -9 + resume: exactly the unbroken EP run
    # EP vs plain DDP, and EP resumed as DDP: same maths, another summation order
    for other in ("ddp", "ep-to-ddp"):
        for ep_row, row in zip(runs["ep"], runs[other]):
            assert ep_row.keys() == row.keys()
            for key, value in row.items():
                assert ep_row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (other, key)
    ref = CheckpointManager(store, "runs/ep-ep").latest()
    local = CheckpointManager(store, "runs/ep-ep").download(ref, tmp_path / "ckpt")
    weights = train_state.load_model_weights(local)
    experts = weights["model.layers.1.mlp.experts.gate_up_proj"]
    assert experts.shape[0] == tiny_model_overrides()["num_routed_experts"]  # gathered, not rank 0's shard


def test_mesh_shape_and_parallel_config_errors(tmp_path):
    cfg = tiny_config(expert_parallel=2)
    assert cfg.mesh_shape(4) == (2, 2, 1)
    with pytest.raises(ValueError, match="3 worker\\(s\\) cannot be split into expert_parallel=2"):
        cfg.mesh_shape(3)
    with pytest.raises(ValueError, match="expert_parallel=3 must divide num_routed_experts=4"):
        tiny_config(expert_parallel=3)
    with pytest.raises(ValueError, match="needs MoE layers"):
        tiny_config(expert_parallel=2, dense_twin=True)
    with pytest.raises(ValueError, match="needs at least 4 decoder layers"):
        tiny_config(pipeline_parallel=2, pipeline_schedule="interleaved_1f1b", grad_accum_steps=2)
    with pytest.raises(ValueError, match="grad_accum_steps=1 .* must be >= 2"):
        tiny_config(pipeline_parallel=2)
    # the defaults dump (and hash) as before the fields existed
    assert "expert_parallel" not in PretrainConfig().to_dict()
    assert tiny_config(expert_parallel=2).to_dict()["expert_parallel"] == 2
    # run_pretrain refuses a world that does not fit the mesh before launching anything
    with pytest.raises(ValueError, match="cannot be split"):
        run_pretrain(tiny_config(expert_parallel=2), LocalStore(tmp_path / "s"), tokens_uri="file:///nowhere",
                     output_prefix="runs/x", num_workers=3)


@pytest.mark.slow  # two spawned processes, four variants
def test_bench_parallel_smoke_on_cpu(tmp_path):
    """benchmarks/bench_parallel.py runs on CPU with gloo (its GPU run needs a multi-GPU machine)."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "parallel.jsonl"
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_parallel.py"), "--spawn", "2",
                           "--preset", "tiny", "--seq-len", "16", "--batch", "2", "--steps", "1", "--warmup", "1",
                           "--variants", "fsdp,ep_fsdp", "--out", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["variant"], r["dp"], r["ep"]) for r in rows] == [("fsdp", 2, 1), ("ep_fsdp", 1, 2)]
    assert rows[0]["all_to_all_share"] is None and 0 < rows[1]["all_to_all_share"] < 1
    assert all(r["tokens_per_s"] > 0 for r in rows)
