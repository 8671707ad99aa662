"""Expert parallelism on CPU with gloo: the same losses, gradients, router biases and weights as one process.

Reference: the one-process model (same seed) trained by the same ``Trainer`` on the GLOBAL batch (the
ranks' rows stacked). The EP ranks (mesh (dp, ep), each rank its own rows, experts sharded) must match
it within fp32 tolerance: per-step loss and gradient norm, every gradient at the optimiser step (expert
shards gathered), the router biases after each step (global expert counts), and the final weights,
also after gathering them into the one-process layout (``plain_state_dict``). Clipping is on, so the
global gradient norm over expert shards is exercised. MTP is on, so its MoE block is sharded too.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from moeflow.models import MoETransformer
from moeflow.models.train.loop import Trainer, router_biases
from moeflow.platform.train.config import PretrainConfig
from train_fakes import one_thread, tiny_model_overrides

STEPS, ROWS_PER_RANK = 2, 2


def _config(world: int, grad_accum: int, rows: int = ROWS_PER_RANK, **fields) -> PretrainConfig:
    overrides = {**tiny_model_overrides(), "mtp_depth": 1, "num_routed_experts": 4, "num_experts_per_tok": 2,
                 "seq_aux_alpha": 1e-2, "bias_update_gamma": 1e-2}
    return PretrainConfig(model_overrides=overrides, seq_len=16, micro_batch_size=rows, grad_accum_steps=grad_accum,
                          max_steps=STEPS, warmup_steps=0, log_every=1, val_every=0, grad_clip=0.05, lr=1e-2,
                          **fields)


def _global_batches(world: int, grad_accum: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(2, 64, (world * ROWS_PER_RANK, 17), generator=gen) for _ in range(STEPS * grad_accum)]


def _recording(trainer: Trainer, gather) -> list[dict]:
    """Record every gradient (gathered to full shape) at each optimiser step."""
    seen: list[dict] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append({n: gather(p.grad).clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return seen


def _run(trainer: Trainer, gather) -> dict:
    grads = _recording(trainer, gather)
    history, biases, counts = [], [], []
    for _ in range(STEPS):
        metrics = trainer.train_step()
        history.append({k: metrics[k] for k in ("loss", "lm_loss", "mtp_loss", "seq_aux_loss", "grad_norm",
                                                "maxvio_batch/mean")})
        biases.append(router_biases(trainer.model))
        counts.append(trainer.last_counts_LE.clone())  # global expert counts: the bias update's and MaxVio's input
    return {"history": history, "grads": grads, "biases": biases, "counts": counts}


def _reference(world: int, grad_accum: int) -> tuple[dict, dict]:
    with one_thread():
        torch.manual_seed(0)
        model = MoETransformer(_config(world, grad_accum).build_model_config())
        cfg = _config(world, grad_accum, rows=world * ROWS_PER_RANK)
        trainer = Trainer(cfg, model, iter(_global_batches(world, grad_accum)))
        out = _run(trainer, lambda g: g)
        return out, {k: v.clone() for k, v in model.state_dict().items()}


def _ep_worker(rank: int, world: int, init_file: str, out_dir: str, dp: int, ep: int, parallelism: str,
               grad_accum: int) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from moeflow.platform.train import expert_parallel as EP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = _config(world, grad_accum)
        torch.manual_seed(0)
        model = MoETransformer(cfg.build_model_config())
        mesh = EP.build_mesh("cpu", dp, ep)
        wrapped = EP.parallelize(model, mesh, parallelism, "fp32", torch.device("cpu"))
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        batches = iter([b[rows] for b in _global_batches(world, grad_accum)])
        trainer = Trainer(cfg, model, batches, wrapped=wrapped)
        out = _run(trainer, lambda g: g.full_tensor() if isinstance(g, DTensor) else g)
        plain = EP.plain_state_dict(model)
        # the other direction: the gathered weights loaded into a fresh EP model give the same loss
        torch.manual_seed(1)
        fresh = MoETransformer(cfg.build_model_config())
        EP.parallelize(fresh, mesh, parallelism, "fp32", torch.device("cpu"))
        EP.load_plain_state_dict(fresh, plain)
        probe = _global_batches(world, grad_accum)[0][rows]
        with torch.no_grad():
            losses = [float(m(probe[:, :-1], targets=probe[:, 1:]).aux["lm_loss"]) for m in (model, fresh)]
        if rank == 0:
            out["plain"] = plain
            out["reload_losses"] = losses
            out["local_expert_shape"] = tuple(model.model.layers[1].mlp.experts._local("gate_up_proj").shape)
            torch.save(out, os.path.join(out_dir, "ep.pt"))
    finally:
        dist.destroy_process_group()


def _spawn_ep(dp: int, ep: int, parallelism: str = "ddp", grad_accum: int = 2) -> dict:
    import torch.multiprocessing as mp

    world = dp * ep
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ep_worker, args=(world, os.path.join(tmp, "init"), tmp, dp, ep, parallelism, grad_accum),
                 nprocs=world, join=True)
        return torch.load(os.path.join(tmp, "ep.pt"), weights_only=False)


def _assert_matches_reference(dp: int, ep: int, parallelism: str = "ddp", grad_accum: int = 2) -> None:
    got = _spawn_ep(dp, ep, parallelism, grad_accum)
    ref, ref_state = _reference(dp * ep, grad_accum)
    # each rank holds E/ep experts (FSDP2 shards those rows over dp too)
    assert got["local_expert_shape"][0] == 4 // ep // (dp if parallelism == "fsdp" else 1)
    # the gradients first: a wrong one is named here, where the history would only show the norm
    assert len(got["grads"]) == len(ref["grads"]) == STEPS
    for step, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
        assert g.keys() == r.keys()
        for name in r:
            torch.testing.assert_close(g[name], r[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")
    for step, (g, r) in enumerate(zip(got["history"], ref["history"])):
        for name in r:
            assert g[name] == pytest.approx(r[name], rel=1e-4, abs=1e-6), (step, name, g[name], r[name])
    for g, r in zip(got["counts"], ref["counts"]):
        assert torch.equal(g, r)  # every rank's tokens, all MoE layers (MTP's too)
    for g, r in zip(got["biases"], ref["biases"]):
        assert r.abs().max() > 0  # the bias moved: the test can see a wrong count
        torch.testing.assert_close(g, r, rtol=0, atol=1e-7)
    assert got["plain"].keys() == ref_state.keys()
    # weights: AdamW's first steps move by ~lr·sign(g), so a near-zero gradient's last-bit noise
    # (another summation order) can move a weight by a few 1e-6 (lr 1e-2); 1e-5 is 0.1 % of one step
    for name, value in ref_state.items():
        torch.testing.assert_close(got["plain"][name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    one_process = MoETransformer(_config(1, grad_accum).build_model_config())
    one_process.load_state_dict(got["plain"], strict=True)  # the EP checkpoint loads into a plain model
    assert got["reload_losses"][0] == pytest.approx(got["reload_losses"][1], rel=1e-6)


def test_expert_parallel_two_ranks_matches_one_process():
    """Fast default: dp 1 x ep 2 with DDP, two micro-batches per step, MTP on."""
    _assert_matches_reference(dp=1, ep=2)


def test_fsdp2_expert_gradient_divided_by_the_world_once_at_dp_one():
    """The experts' FSDP2 group over dp 1 reduces nothing, yet divides by the world size once (gloo, one process).

    Forcing SUM reductions (what gloo needs for dp > 1) on a one-rank group made torch 2.13 divide twice:
    at dp 1 x ep 2 every expert gradient came out halved.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from moeflow.platform.train import expert_parallel as EP

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            experts, x_TD = torch.nn.Linear(4, 4, bias=False), torch.randn(3, 4)
            grad = torch.autograd.grad(experts(x_TD).sum(), experts.weight)[0]
            EP._shard_experts(experts, init_device_mesh("cpu", (1,), mesh_dim_names=("dp",)), 2, MixedPrecisionPolicy())
            experts(x_TD).sum().backward()
            torch.testing.assert_close(experts.weight.grad.full_tensor(), grad / 2)
        finally:
            dist.destroy_process_group()


@pytest.mark.slow  # four spawned processes
def test_expert_parallel_dp2_ep2_ddp_matches_one_process():
    _assert_matches_reference(dp=2, ep=2)


def test_expert_parallel_with_fsdp2_matches_one_process():
    """Fast default too (~5 s): the only end-to-end check of EP x FSDP2's gradients in the default suite."""
    _assert_matches_reference(dp=1, ep=2, parallelism="fsdp")


@pytest.mark.slow  # four spawned processes
def test_expert_parallel_dp2_ep2_fsdp2_matches_one_process():
    _assert_matches_reference(dp=2, ep=2, parallelism="fsdp")
