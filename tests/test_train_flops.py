"""MFU numerator and bits per byte against references that do not share their formula.

- FLOPs: ``ModelConfig.flops_per_token`` vs torch's ``FlopCounterMode`` over a real forward + backward
  (it counts the matmuls the model executes: 2 FLOPs per multiply-add, backward included). SDPA with
  ``is_causal`` is counted by torch as full S×S attention, while MFU conventionally counts the causal
  half, so the counted attention matmuls (``aten.bmm`` here: the CPU SDPA path) are halved. The
  formula also counts 6 FLOPs per norm weight, which no matmul does: a few hundred parameters out of
  ~10^5, hence the 1 % tolerance. A missing LM head per MTP depth is ~20 % of the tiny model.
- Bits per byte: a model whose LM head is zero predicts the uniform distribution, so its validation
  loss is ln V nats/token exactly, and with b bytes/token its bpb is log2(V) / b.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moeflow.models import MoETransformer
from moeflow.models.config import ModelConfig
from moeflow.models.train.loop import Trainer
from moeflow.platform.train.config import PretrainConfig
from train_fakes import one_thread, tiny_model_overrides


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _counted_flops(cfg: ModelConfig, batch: int, seq_len: int, training: bool) -> float:
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        if training:
            model(ids, targets=ids).loss.backward()
        else:
            with torch.no_grad():
                model(ids)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(by_op) <= {"aten.mm", "aten.bmm", "aten.addmm"}, by_op  # nothing uncounted slipped in
    return by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0) + by_op.get("aten.bmm", 0) / 2


@pytest.mark.parametrize("kw", [{}, {"mtp_depth": 1}, {"mtp_depth": 2}, {"dense": True}])
def test_flops_per_token_matches_torch_flop_counter(kw):
    cfg = ModelConfig.preset("tiny")
    cfg = cfg.dense_twin() if kw.pop("dense", False) else cfg.replace(**kw)
    batch, seq_len = 2, 32
    tokens = batch * seq_len
    counted = _counted_flops(cfg, batch, seq_len, training=True)
    assert cfg.flops_per_token(seq_len) * tokens == pytest.approx(counted, rel=0.01)
    if not cfg.mtp_depth:  # forward only (MTP runs only with targets)
        counted_fwd = _counted_flops(cfg, batch, seq_len, training=False)
        assert cfg.flops_per_token(seq_len, training=False) * tokens == pytest.approx(counted_fwd, rel=0.01)


def test_val_bpb_of_a_uniform_model_is_log2_vocab_over_bytes_per_token():
    cfg = PretrainConfig(model_overrides=tiny_model_overrides(vocab=64), seq_len=16, micro_batch_size=2,
                         max_steps=1, warmup_steps=0)
    model = MoETransformer(cfg.build_model_config())
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0: uniform over the 64 ids
    rows = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(cfg, model, iter(()), val_batches=lambda: [rows], bytes_per_token=2.0)
    metrics = trainer.evaluate()
    assert metrics["val_loss"] == pytest.approx(math.log(64), rel=1e-6)
    assert metrics["val_bpb"] == pytest.approx(3.0, rel=1e-6)  # log2(64) bits over 2 bytes
