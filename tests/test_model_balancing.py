"""Balancing maths against hand-computed tables, and aux-free balancing in a closed loop."""

import math

import pytest
import torch

from moeflow.models import balancing as bal
from moeflow.models.moe import select_experts


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.mark.parametrize("bias,counts,gamma,want", [
    # mean 4: steps [-γ, 0, +γ, +γ] (mean 0.025), then centred.
    ([0.0, 0.0, 0.0, 0.0], [10, 4, 1, 1], 0.1, [-0.125, -0.025, 0.075, 0.075]),
    # already balanced: nothing moves, a non-centred bias gets centred.
    ([0.3, 0.1, 0.2, 0.2], [5, 5, 5, 5], 0.1, [0.1, -0.1, 0.0, 0.0]),
    ([0.0, 0.0], [3, 1], 1e-3, [-1e-3, 1e-3]),
])
def test_update_router_bias_table(bias, counts, gamma, want):
    got = bal.update_router_bias(torch.tensor(bias), torch.tensor(counts, dtype=torch.float32), gamma)
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-7, rtol=0)
    assert abs(got.sum().item()) < 1e-6


def test_update_router_bias_batched_rows_are_independent():
    counts = torch.tensor([[10.0, 4.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    got = bal.update_router_bias(torch.zeros(2, 4), counts, 0.1)
    torch.testing.assert_close(got[0], torch.tensor([-0.125, -0.025, 0.075, 0.075]))
    torch.testing.assert_close(got[1], torch.zeros(4))


def test_maxvio_and_counts():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1]])
    counts = bal.tokens_per_expert(idx, 4)
    assert counts.tolist() == [3.0, 2.0, 1.0, 0.0]
    assert bal.maxvio(counts).item() == pytest.approx((3 - 1.5) / 1.5)
    assert bal.maxvio(torch.tensor([[2.0, 2.0], [4.0, 0.0]])).tolist() == [0.0, 1.0]


def test_seq_aux_loss_hand_computed():
    # One sequence, T=2, E=2, K=1. Scores normalise to p = [[0.75, 0.25], [0.5, 0.5]].
    scores = torch.tensor([[[0.6, 0.2], [0.4, 0.4]]])
    idx = torch.tensor([[[0], [0]]])
    # f = E/(K T) * counts = [2, 0]; P = mean p = [0.625, 0.375]; L = α * 2 * 0.625
    assert bal.seq_aux_loss(scores, idx, alpha=0.1).item() == pytest.approx(0.1 * 1.25)
    # Two sequences are averaged: second perfectly balanced (f = [1, 1], P = [.5, .5]) -> α * 1
    scores2 = torch.cat([scores, torch.full((1, 2, 2), 0.5)])
    idx2 = torch.cat([idx, torch.tensor([[[0], [1]]])])
    assert bal.seq_aux_loss(scores2, idx2, alpha=0.1).item() == pytest.approx(0.1 * (1.25 + 1.0) / 2)


def test_seq_aux_loss_hand_computed_with_two_experts_per_token():
    """K = 2, where f_i's 1/K matters: f = E/(K·T) · counts, so perfect balance gives exactly α."""
    # T=2, E=4, K=2: tokens pick {0, 1} and {0, 2} -> counts [2, 1, 1, 0], f = 4/(2·2) · counts = [2, 1, 1, 0]
    scores = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.8, 0.6, 0.4, 0.2]]])  # both normalise to [.4, .3, .2, .1]
    idx = torch.tensor([[[0, 1], [0, 2]]])
    # Σ f P = 2·0.4 + 1·0.3 + 1·0.2 + 0 = 1.3
    assert bal.seq_aux_loss(scores, idx, alpha=0.01).item() == pytest.approx(0.01 * 1.3)
    balanced = torch.tensor([[[0, 1], [2, 3]]])  # f = [1, 1, 1, 1], P = 1/4 each: Σ f P = 1
    assert bal.seq_aux_loss(torch.full((1, 2, 4), 0.3), balanced, alpha=0.01).item() == pytest.approx(0.01)


def test_z_loss_and_lb_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2, log 4
    want_z = 0.5 * (math.log(2) ** 2 + math.log(4) ** 2)
    assert bal.z_loss(logits, 2.0).item() == pytest.approx(2.0 * want_z)
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    idx = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.625, 0.375]; E Σ f P = 2 * 0.625
    assert bal.load_balancing_loss(probs, idx, 0.01).item() == pytest.approx(0.01 * 1.25)


def test_router_entropy():
    uniform = torch.full((3, 4), 0.25)
    assert bal.router_entropy(uniform).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert bal.router_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)


def _routed_batch(B=4, T=9, E=6, K=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, T, E, generator=gen, dtype=torch.float64)
    idx = torch.rand(B, T, E, generator=gen).argsort(dim=-1)[..., :K]
    valid = torch.rand(B, T, generator=gen) < 0.6
    valid[0] = True                    # a full row
    valid[1] = False                   # an empty row: contributes 0, no NaN
    valid[2, 0] = valid[2, -1] = True  # not only a prefix or a suffix
    return scores, idx, valid


def test_seq_aux_loss_with_mask_equals_the_loss_of_each_rows_valid_positions():
    """Reference: each row sliced to its valid positions, unmasked loss, 0 for an empty row, mean over B."""
    scores, idx, valid = _routed_batch()
    got = bal.seq_aux_loss(scores, idx, alpha=0.3, valid_BT=valid)
    per_row = [bal.seq_aux_loss(scores[b, valid[b]][None], idx[b, valid[b]][None], alpha=0.3)
               if valid[b].any() else torch.zeros((), dtype=torch.float32) for b in range(scores.shape[0])]
    want = torch.stack(per_row).mean()
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want.to(got.dtype))
    # all-valid mask = no mask; a fully masked batch gives 0 (and a finite, zero gradient)
    all_valid = torch.ones_like(valid)
    torch.testing.assert_close(bal.seq_aux_loss(scores, idx, 0.3, all_valid), bal.seq_aux_loss(scores, idx, 0.3))
    s = scores.clone().requires_grad_()
    none = bal.seq_aux_loss(s, idx, 0.3, torch.zeros_like(valid))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0


def test_seq_aux_loss_with_mask_hand_computed():
    # the hand table above (L = α·1.25) plus two masked positions that would otherwise change it
    scores = torch.tensor([[[0.6, 0.2], [0.1, 0.9], [0.4, 0.4], [0.0, 1.0]]])
    idx = torch.tensor([[[0], [1], [0], [1]]])
    valid = torch.tensor([[True, False, True, False]])
    assert bal.seq_aux_loss(scores, idx, alpha=0.1, valid_BT=valid).item() == pytest.approx(0.1 * 1.25)


def test_router_entropy_with_mask_is_the_entropy_of_the_valid_tokens():
    scores, _, valid = _routed_batch()
    scores_TE, valid_T = scores.reshape(-1, scores.shape[-1]), valid.reshape(-1)
    torch.testing.assert_close(bal.router_entropy(scores_TE, valid_T), bal.router_entropy(scores_TE[valid_T]))
    torch.testing.assert_close(bal.router_entropy(scores_TE, valid), bal.router_entropy(scores_TE[valid_T]))  # (B, T)
    assert bal.router_entropy(scores_TE, torch.zeros_like(valid_T)).item() == 0.0
    # hand: a uniform token (log 4) kept, a peaked one dropped
    two = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert bal.router_entropy(two, torch.tensor([True, False])).item() == pytest.approx(math.log(4))


def test_z_loss_and_lb_loss_with_mask_equal_the_losses_of_the_valid_tokens():
    scores, idx, valid = _routed_batch()
    E, K = scores.shape[-1], idx.shape[-1]
    scores_TE, idx_TK, valid_T = scores.reshape(-1, E), idx.reshape(-1, K), valid.reshape(-1)
    torch.testing.assert_close(bal.z_loss(scores_TE, 0.2, valid_T), bal.z_loss(scores_TE[valid_T], 0.2))
    torch.testing.assert_close(bal.load_balancing_loss(scores_TE, idx_TK, 0.2, valid_T),
                               bal.load_balancing_loss(scores_TE[valid_T], idx_TK[valid_T], 0.2))
    nothing = torch.zeros_like(valid_T)
    assert bal.z_loss(scores_TE, 0.2, nothing).item() == 0.0
    assert bal.load_balancing_loss(scores_TE, idx_TK, 0.2, nothing).item() == 0.0


def test_aux_free_updates_drive_maxvio_down_on_skewed_router():
    torch.manual_seed(0)
    E, K, T = 16, 2, 2048
    # Skewed router: expert e gets a fixed score offset growing with e, so the top experts hog tokens.
    skew = torch.linspace(-2.0, 2.0, E)
    bias = torch.zeros(E)
    history = []
    for _ in range(300):
        scores = torch.sigmoid(torch.randn(T, E) + skew)
        idx = select_experts(scores, bias, K, n_group=1, topk_group=1)
        counts = bal.tokens_per_expert(idx, E)
        history.append(bal.maxvio(counts).item())
        bias = bal.update_router_bias(bias, counts, gamma=1e-2)
    assert history[0] > 2.0
    assert sum(history[-20:]) / 20 < 0.25 * history[0]
    assert sum(history[-20:]) / 20 < 0.5
