"""The distill stage: teacher top-k cache in the store, held-out KL, and learning evidence."""

from __future__ import annotations

import pytest
import torch

from moeflow.models import MoETransformer
from moeflow.models.config import ModelConfig
from moeflow.platform.posttrain import distill as D
from moeflow.platform.store import LocalStore

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=40, **kw))


def _rows(n=6, t=9, seed=0):
    return torch.randint(0, 40, (n, t + 1), generator=torch.Generator().manual_seed(seed))


def test_topk_cache_is_written_once_and_reused(tmp_path):
    store, teacher, rows = LocalStore(tmp_path / "store"), _model(), _rows()
    loss = D.DistillLossConfig(top_k=5, temperature=2.0)
    top, uri, reused = D.teacher_topk_for_pool(store, teacher, teacher_uri="m://t", tokens_uri="s://x",
                                               rows_NT1=rows, loss=loss, batch_size=4)
    assert not reused and top.logprobs_NK.shape == (6, 9, 5) and top.indices_NK.shape == (6, 9, 5)
    # the values are the teacher's full-softmax log-probs at T (to fp16 precision)
    with torch.no_grad():
        full = torch.log_softmax(teacher(rows[:, :-1]).logits / 2.0, -1)
    assert torch.allclose(top.logprobs_NK, full.gather(-1, top.indices_NK), atol=2e-3)
    assert torch.equal(top.indices_NK, full.topk(5, -1).indices)

    class NoTeacher:  # a second run must not call the teacher at all
        def __call__(self, *a, **k):
            raise AssertionError("teacher called although the cache exists")

        def eval(self):
            return self

    again, uri2, reused2 = D.teacher_topk_for_pool(store, NoTeacher(), teacher_uri="m://t", tokens_uri="s://x",
                                                   rows_NT1=rows, loss=loss)
    assert reused2 and uri2 == uri and torch.equal(again.logprobs_NK, top.logprobs_NK)
    # another k, temperature, teacher or pool is another cache
    for kw in (dict(loss=D.DistillLossConfig(top_k=4, temperature=2.0)), dict(teacher_uri="m://other"),
               dict(rows_NT1=_rows(seed=1))):
        args = dict(teacher_uri="m://t", tokens_uri="s://x", rows_NT1=rows, loss=loss) | kw
        assert D.cache_prefix(args["teacher_uri"], "s://x", args["rows_NT1"], args["loss"].top_k,
                              args["loss"].temperature) != store.key_for_uri(uri)


def test_cache_with_other_rows_is_refused(tmp_path):
    store, rows = LocalStore(tmp_path / "store"), _rows()
    loss = D.DistillLossConfig(top_k=3)
    top = D.compute_topk(_model(), rows, k=3, temperature=1.0)
    prefix = D.cache_prefix("m://t", "s://x", rows, 3, 1.0)
    D.write_topk_cache(store, prefix, _rows(seed=5), top, {})   # a corrupted / colliding artefact
    with pytest.raises(RuntimeError, match="other rows"):
        D.teacher_topk_for_pool(store, _model(), teacher_uri="m://t", tokens_uri="s://x", rows_NT1=rows, loss=loss)


def test_held_out_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
    teacher, rows = _model(0), _rows(4, 7, seed=3)
    logp = D.teacher_logprobs(teacher, rows, batch_size=3)
    same = D.evaluate_student(teacher, rows, logp, batch_size=3)
    assert same["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # val_loss is the plain mean next-token NLL
        nll = torch.nn.functional.cross_entropy(teacher(rows[:, :-1]).logits.reshape(-1, 40), rows[:, 1:].reshape(-1))
    assert same["val_loss"] == pytest.approx(float(nll), rel=1e-5)
    other = D.evaluate_student(_model(1), rows, logp)
    assert other["kl_to_teacher"] > 1e-4
