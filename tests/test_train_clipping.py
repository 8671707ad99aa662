"""Gradient clipping acts on the gradients the optimiser steps with, and the log shows the raw norm.

AdamW's first step is nearly invariant to a gradient's scale (m/√v), so the weights alone cannot show
whether clipping happened: the test reads the gradient norm at the moment ``optimizer.step`` runs.
"""

from __future__ import annotations

import pytest
import torch

from moeflow.models import MoETransformer
from moeflow.models.train.loop import Trainer
from moeflow.platform.train.config import PretrainConfig
from train_fakes import one_thread, tiny_model_overrides


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _norm_at_step(grad_clip: float) -> tuple[float, float]:
    cfg = PretrainConfig(model_overrides=tiny_model_overrides(), seq_len=16, micro_batch_size=2, grad_accum_steps=2,
                         max_steps=1, warmup_steps=0, log_every=1, val_every=0, grad_clip=grad_clip)
    torch.manual_seed(0)
    model = MoETransformer(cfg.build_model_config())
    gen = torch.Generator().manual_seed(1)
    batches = iter([torch.randint(2, 64, (2, 17), generator=gen) for _ in range(2)])
    trainer = Trainer(cfg, model, batches)
    seen = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    metrics = trainer.train_step()
    return seen[0], metrics["grad_norm"]


def test_clipping_scales_the_gradient_to_the_threshold_and_logs_the_raw_norm():
    raw_at_step, raw_logged = _norm_at_step(grad_clip=0.0)  # 0 = off
    assert raw_at_step == pytest.approx(raw_logged, rel=1e-5)
    assert raw_logged > 0.05
    clipped_at_step, logged = _norm_at_step(grad_clip=0.01)
    assert logged == pytest.approx(raw_logged, rel=1e-5)  # the log reports the pre-clip norm
    assert clipped_at_step == pytest.approx(0.01, rel=1e-3)
    loose_at_step, _ = _norm_at_step(grad_clip=1e6)  # above the norm: untouched
    assert loose_at_step == pytest.approx(raw_logged, rel=1e-5)
