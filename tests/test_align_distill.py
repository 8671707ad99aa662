"""Distillation maths: top-k divergences against float64 full-vocabulary loops and a hand table."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.models.align.distill import TopK, class_logprobs, distill_loss, divergence, teacher_topk

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

N, V = 5, 9


def _kl(p, q) -> float:
    return float(sum(p[v] * math.log(p[v] / q[v]) for v in range(len(p)) if p[v] > 0))


def _full_reference(teacher, student, kind, beta=0.5, temperature=1.0) -> float:
    """Mean over rows of the divergence on the whole vocabulary, float64 loops."""
    total = 0.0
    for n in range(teacher.shape[0]):
        p = torch.softmax(teacher[n].double() / temperature, 0).tolist()
        q = torch.softmax(student[n].double() / temperature, 0).tolist()
        if kind == "forward_kl":
            total += _kl(p, q)
        elif kind == "reverse_kl":
            total += _kl(q, p)
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
            total += beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    return total / teacher.shape[0]


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return 2 * torch.randn(N, V), 2 * torch.randn(N, V)


def test_teacher_topk_keeps_full_softmax_logprobs(logits):
    teacher, _ = logits
    top = teacher_topk(teacher, k=3, temperature=2.0)
    full = torch.log_softmax(teacher / 2.0, -1)
    assert top.k == 3
    assert torch.equal(top.indices_NK, full.topk(3, -1).indices)
    assert torch.allclose(top.logprobs_NK, full.gather(-1, top.indices_NK))
    assert bool((top.logprobs_NK.exp().sum(-1) < 1).all())  # the tail is what is missing
    with pytest.raises(ValueError, match="k=10"):
        teacher_topk(teacher, k=V + 1)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucket_with_k_equal_vocab_is_the_full_divergence(logits, kind, temperature):
    teacher, student = logits
    t_log, s_log = class_logprobs(student, teacher_topk(teacher, V, temperature), temperature, "bucket")
    got = divergence(t_log, s_log, kind, beta=0.3).mean().item()
    assert got == pytest.approx(_full_reference(teacher, student, kind, 0.3, temperature), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_bucket_top_k_is_a_lower_bound(logits, kind):
    teacher, student = logits
    full = _full_reference(teacher, student, kind)
    for k in (1, 3, 6):
        t_log, s_log = class_logprobs(student, teacher_topk(teacher, k), 1.0, "bucket")
        assert torch.allclose(t_log.exp().sum(-1), torch.ones(N), atol=1e-5)  # proper distributions
        assert torch.allclose(s_log.exp().sum(-1), torch.ones(N), atol=1e-5)
        assert 0 <= divergence(t_log, s_log, kind).mean().item() <= full + 1e-6


def test_renormalize_matches_the_sparse_kd_loop(logits):
    teacher, student = logits
    top = teacher_topk(teacher, 3)
    t_log, s_log = class_logprobs(student, top, 1.0, "renormalize")
    got = divergence(t_log, s_log, "forward_kl").mean().item()
    expected = 0.0
    for n in range(N):
        ids = top.indices_NK[n].tolist()
        p_full = torch.softmax(teacher[n].double(), 0)
        q_full = torch.softmax(student[n].double(), 0)
        mass = float(sum(p_full[i] for i in ids))
        expected += sum(float(p_full[i]) / mass * math.log(float(p_full[i]) / mass / float(q_full[i])) for i in ids)
    assert got == pytest.approx(expected / N, rel=1e-5)


def test_jsd_two_class_table():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.9, 0.1]]))
    # M = (0.7, 0.3): ½·KL(P‖M) + ½·KL(Q‖M) = ½·0.0871767 + ½·0.1163218
    assert divergence(p, q, "jsd", 0.5).item() == pytest.approx(0.10174922507919676, rel=1e-5)
    assert divergence(p, q, "forward_kl").item() == pytest.approx(0.5108256237659907, rel=1e-5)  # ln(5/3)·½ + ...
    assert divergence(p, q, "reverse_kl").item() == pytest.approx(0.3680642071684971, rel=1e-5)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="beta"):
            divergence(p, q, "jsd", bad)


def test_mixed_loss_temperature_and_hard_labels(logits):
    teacher, student = logits
    labels = torch.tensor([1, 2, -100, 4, 0])
    top = teacher_topk(teacher, 4, temperature=2.0)
    pure = distill_loss(student, top, labels, temperature=2.0, alpha=1.0)
    assert pure.loss.item() == pytest.approx(4.0 * pure.divergence.item(), rel=1e-6)  # T² = 4
    hard = distill_loss(student, top, labels, temperature=2.0, alpha=0.0)
    expected_ce = torch.nn.functional.cross_entropy(student[labels != -100], labels[labels != -100]).item()
    assert hard.loss.item() == pytest.approx(expected_ce, rel=1e-6)
    mixed = distill_loss(student, top, labels, temperature=2.0, alpha=0.25)
    assert mixed.loss.item() == pytest.approx(0.25 * pure.loss.item() + 0.75 * hard.loss.item(), rel=1e-6)
    # the ignored row does not count in the divergence either
    scrambled = student.clone()
    scrambled[2] = 50 * torch.randn(V)
    assert distill_loss(scrambled, top, labels, temperature=2.0).loss.item() == pytest.approx(
        distill_loss(student, top, labels, temperature=2.0).loss.item(), rel=1e-6)


def test_gradients_stay_finite_without_a_tail(logits):
    """k = V leaves no tail mass: the bucket's log(0) must not leak NaN into backward."""
    teacher, student = logits
    student = student.clone().requires_grad_(True)
    top = teacher_topk(teacher, V)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        student.grad = None
        distill_loss(student, top, torch.zeros(N, dtype=torch.long), kind=kind, alpha=1.0).loss.backward()
        assert torch.isfinite(student.grad).all(), kind
        assert student.grad.abs().sum() > 0


def test_descending_the_loss_moves_the_student_onto_the_teacher(logits):
    teacher, student = logits
    student = student.clone().requires_grad_(True)
    top = teacher_topk(teacher, 4)
    opt = torch.optim.SGD([student], lr=2.0)
    start = _full_reference(teacher, student.detach(), "forward_kl")
    for _ in range(200):
        opt.zero_grad()
        distill_loss(student, top, torch.zeros(N, dtype=torch.long), alpha=1.0).loss.backward()
        opt.step()
    assert _full_reference(teacher, student.detach(), "forward_kl") < 0.2 * start


def test_bad_arguments(logits):
    teacher, student = logits
    top = TopK(*teacher.topk(2, -1))
    labels = torch.zeros(N, dtype=torch.long)
    with pytest.raises(ValueError, match="renormalize"):
        distill_loss(student, top, labels, kind="jsd", tail="renormalize")
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(student, top, labels, temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(student, top, labels, alpha=1.5)
    with pytest.raises(ValueError, match="tail"):
        class_logprobs(student, top, 1.0, "drop")
    with pytest.raises(ValueError, match="kind"):
        divergence(teacher, student, "tvd")
