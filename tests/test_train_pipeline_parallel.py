"""Pipeline parallelism on CPU with gloo: the same losses, gradients, biases and weights as one process.

Reference: the one-process ``Trainer`` with ``grad_accum_steps`` = the pipeline's micro-batches, on the
same global micro-batches. The pipeline (1F1B, or interleaved with two stages per rank; MTP and the LM
head on the last stage, the embedding copy there kept tied) must match it within fp32 tolerance: the LM
and MTP losses and the gradient norm of each step, every gradient at the optimiser step, the router
biases after each step and the final weights.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from moeflow.models import MoETransformer
from moeflow.models.train.loop import Trainer
from moeflow.platform.train.config import PretrainConfig
from moeflow.platform.train.pipeline_parallel import split_layers
from train_fakes import one_thread, tiny_model_overrides

STEPS, MICRO, ROWS = 2, 2, 1  # steps, micro-batches per step, rows per micro-batch per replica


def _config(rows: int = ROWS, grad_accum: int = MICRO, schedule: str = "1f1b", pp: int = 2) -> PretrainConfig:
    overrides = {**tiny_model_overrides(), "num_layers": 4, "mtp_depth": 1, "seq_aux_alpha": 1e-2,
                 "bias_update_gamma": 1e-2}
    return PretrainConfig(model_overrides=overrides, seq_len=16, micro_batch_size=rows, grad_accum_steps=grad_accum,
                          max_steps=STEPS, warmup_steps=0, log_every=1, val_every=0, grad_clip=0.05, lr=1e-2,
                          pipeline_parallel=pp, pipeline_schedule=schedule)


def _replica_batches(dp: int) -> list[list[torch.Tensor]]:
    """Per step, each dp replica's rows (MICRO x ROWS, 17)."""
    gen = torch.Generator().manual_seed(11)
    return [[torch.randint(2, 64, (MICRO * ROWS, 17), generator=gen) for _ in range(dp)] for _ in range(STEPS)]


def _reference(dp: int) -> tuple[list[dict], list[dict], list[dict], dict]:
    micro = []  # global micro-batch m = the replicas' m-th chunks stacked
    for replicas in _replica_batches(dp):
        for m in range(MICRO):
            micro.append(torch.cat([r[m * ROWS:(m + 1) * ROWS] for r in replicas]))
    with one_thread():
        torch.manual_seed(0)
        model = MoETransformer(_config().build_model_config())
        trainer = Trainer(_config(rows=dp * ROWS), model, iter(micro))
        grads, step = [], trainer.optimizer.step
        trainer.optimizer.step = lambda *a, **k: (grads.append(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}), step(*a, **k))[1]
        history, biases = [], []
        for _ in range(STEPS):
            metrics = trainer.train_step()
            history.append({k: metrics[k] for k in ("lm_loss", "mtp_loss", "grad_norm")})
            biases.append({n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
        return history, grads, biases, {k: v.clone() for k, v in model.state_dict().items()}


def _pp_worker(rank: int, world: int, init_file: str, out_dir: str, dp: int, pp: int, schedule: str) -> None:
    import torch.distributed as dist

    from moeflow.platform.train.pipeline_parallel import PipelineRunner, build_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = _config(schedule=schedule, pp=pp)
        torch.manual_seed(0)
        model = MoETransformer(cfg.build_model_config())
        mesh = build_mesh("cpu", dp, pp)
        runner = PipelineRunner(model, cfg, mesh, torch.device("cpu"), schedule=schedule)
        grads, step = [], runner.optimizer.step

        def recording_step(*a, **k):
            grads.append({n: p.grad.clone() for st in runner.stages for n, p in st.named_parameters()
                          if p.grad is not None and not (st.is_last and not st.is_first and "embed" in n)})
            return step(*a, **k)

        runner.optimizer.step = recording_step
        dp_rank = mesh["dp"].get_local_rank()
        history, biases = [], []
        for replicas in _replica_batches(dp):
            history.append(runner.train_step(replicas[dp_rank]))
            biases.append({n: b.clone() for st in runner.stages for n, b in st.named_buffers()
                           if n.endswith("e_score_correction_bias")})
        state = {}
        for st in runner.stages:
            state.update({k: v for k, v in st.state_dict().items()
                          if not (st.is_last and not st.is_first and "embed" in k)})
        torch.save({"history": history, "grads": grads, "biases": biases, "state": state,
                    "layers": [st.layer_ids for st in runner.stages], "dp_rank": dp_rank},
                   os.path.join(out_dir, f"pp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _assert_matches_reference(dp: int, pp: int, schedule: str) -> None:
    import torch.multiprocessing as mp

    world = dp * pp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_pp_worker, args=(world, os.path.join(tmp, "init"), tmp, dp, pp, schedule), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(tmp, f"pp{r}.pt"), weights_only=False) for r in range(world)]
    history, grads, biases, state = _reference(dp)
    replica0 = [r for r in ranks if r["dp_rank"] == 0]
    assert sorted(i for r in replica0 for ids in r["layers"] for i in ids) == list(range(4))
    for r in ranks:  # every rank reports the global metrics
        for got, ref in zip(r["history"], history):
            for name in ref:
                assert got[name] == pytest.approx(ref[name], rel=1e-4), (name, got[name], ref[name])
    for step in range(STEPS):
        merged = {k: v for r in replica0 for k, v in r["grads"][step].items()}
        assert merged.keys() == grads[step].keys()
        for name, ref in grads[step].items():
            torch.testing.assert_close(merged[name], ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{step} {name}: {m}")
        merged_bias = {k: v for r in replica0 for k, v in r["biases"][step].items()}
        assert merged_bias.keys() == biases[step].keys()
        for name, ref in biases[step].items():
            torch.testing.assert_close(merged_bias[name], ref, rtol=0, atol=1e-7)
    merged_state = {k: v for r in replica0 for k, v in r["state"].items()}
    assert merged_state.keys() == state.keys()
    # weights: AdamW's first steps move by ~lr·sign(g), so a near-zero gradient's last-bit noise
    # (another summation order) can move a weight by a few 1e-6 (lr 1e-2); 1e-5 is 0.1 % of one step
    for name, ref in state.items():
        torch.testing.assert_close(merged_state[name], ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_split_layers_is_even_and_consecutive():
    assert split_layers(4, 2) == [[0, 1], [2, 3]]
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert split_layers(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="3 pipeline stages"):
        split_layers(2, 3)


def test_pipeline_1f1b_two_stages_matches_one_process():
    _assert_matches_reference(dp=1, pp=2, schedule="1f1b")


@pytest.mark.slow
def test_pipeline_interleaved_1f1b_matches_one_process():
    _assert_matches_reference(dp=1, pp=2, schedule="interleaved_1f1b")


@pytest.mark.slow  # four spawned processes
def test_pipeline_with_data_parallel_matches_one_process():
    _assert_matches_reference(dp=2, pp=2, schedule="1f1b")
