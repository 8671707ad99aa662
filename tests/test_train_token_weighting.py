"""Token-weighted loss over the global batch: accumulated gradients == one big batch's gradient.

The reference is the model's own objective on all rows at once (lm mean over every valid
target + λ · mean over MTP depths of each depth's mean), with balancing losses off (they are
per-micro-batch means by design). Masks are deliberately uneven across micro-batches, where a
mean of micro-batch means differs (checked too, so the test can tell the two apart).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from moeflow.models import MoETransformer
from moeflow.models.train.loop import Trainer
from moeflow.platform.train.config import PretrainConfig
from train_fakes import one_thread, tiny_model_overrides

MODEL_KW = {**tiny_model_overrides(), "mtp_depth": 2, "seq_aux_alpha": 0.0}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _config(grad_accum_steps: int, **model_kw) -> PretrainConfig:
    return PretrainConfig(model_overrides={**MODEL_KW, **model_kw}, seq_len=16, micro_batch_size=2,
                          grad_accum_steps=grad_accum_steps, max_steps=1, warmup_steps=0)


def _micro_batches(num: int, keep_fractions: list[float], seed: int = 0) -> list[dict]:
    """``num`` dict micro-batches (2 rows × 16) whose targets keep about keep_fractions[i] of the tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        ids = torch.randint(2, 64, (2, 17), generator=gen)
        targets = ids[:, 1:].clone()
        drop = torch.rand(targets.shape, generator=gen) > keep_fractions[i]
        drop[0, 0] = False  # at least one target per micro-batch
        out.append({"input_ids": ids[:, :-1], "targets": targets.masked_fill(drop, -100)})
    return out


def _model(cfg: PretrainConfig) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(cfg.build_model_config())


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _big_batch_grads(cfg: PretrainConfig, batches: list[dict]) -> dict[str, torch.Tensor]:
    model = _model(cfg)
    out = model(torch.cat([b["input_ids"] for b in batches]), targets=torch.cat([b["targets"] for b in batches]))
    out.loss.backward()
    return _grads(model)


def _trainer_grads(cfg: PretrainConfig, batches: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    model = _model(cfg)
    trainer = Trainer(cfg, model, iter(()))
    parts, _, _ = trainer.accumulate_gradients([trainer._split(b) for b in batches])
    return _grads(model), parts


def _assert_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m: f"{name}: {m}")


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12)) for n in a)


def test_accumulated_gradient_equals_one_big_batch_with_uneven_masks_and_mtp():
    batches = _micro_batches(3, [0.9, 0.15, 0.5])
    big = _big_batch_grads(_config(1), batches)
    accumulated, parts = _trainer_grads(_config(3), batches)
    _assert_close(accumulated, big, rtol=1e-4, atol=1e-6)
    # the logged lm loss is the global token mean too
    model = _model(_config(1))
    with torch.no_grad():
        out = model(torch.cat([b["input_ids"] for b in batches]), targets=torch.cat([b["targets"] for b in batches]))
    assert float(parts["lm_loss"]) == pytest.approx(float(out.aux["lm_loss"]), rel=1e-5)
    assert float(parts["mtp_loss"]) == pytest.approx(float(out.aux["mtp_loss"]), rel=1e-5)
    # a mean of micro-batch means is measurably different here, so the comparison above can fail
    model = _model(_config(1))
    for b in batches:
        (model(b["input_ids"], targets=b["targets"]).loss / 3).backward()
    assert _max_rel_diff(_grads(model), big) > 1e-2


def test_unmasked_rows_keep_the_pretraining_objective():
    """Full rows: every micro-batch has N/k targets, so the step is the old ``loss / k`` (no MTP)."""
    batches = _micro_batches(2, [1.0, 1.0])
    cfg = _config(2, mtp_depth=0, seq_aux_alpha=1e-2)  # balancing on: still the mean over micro-batches
    accumulated, _ = _trainer_grads(cfg, batches)
    model = _model(cfg)
    for b in batches:
        (model(b["input_ids"], targets=b["targets"]).loss / 2).backward()
    _assert_close(accumulated, _grads(model), rtol=1e-5, atol=1e-7)


def _rank_worker(rank: int, world_size: int, init_file: str, out_dir: str, batches: list[dict]) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cfg = _config(2)
        model = _model(cfg)
        trainer = Trainer(cfg, model, iter(()), wrapped=DDP(model))
        mine = batches[2 * rank: 2 * rank + 2]  # two micro-batches per rank, uneven across ranks
        trainer.accumulate_gradients([trainer._split(b) for b in mine])
        torch.save(_grads(model), os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_big_batch():
    import torch.multiprocessing as mp

    batches = _micro_batches(4, [0.95, 0.8, 0.1, 0.3], seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_worker, args=(2, os.path.join(tmp, "init"), tmp, batches), nprocs=2, join=True)
        rank0 = torch.load(os.path.join(tmp, "grads0.pt"))
        rank1 = torch.load(os.path.join(tmp, "grads1.pt"))
    _assert_close(rank0, rank1, rtol=0, atol=0)  # DDP: identical on every rank
    _assert_close(rank0, _big_batch_grads(_config(1), batches), rtol=1e-4, atol=1e-6)
