"""The online-RL maths (models/align/rl.py) against small hand-computed tables."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.models.align import rl


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_matches_hand_table_and_stops_at_the_last_real_token():
    # row 0: γ=λ=½ worked by hand; row 1: its last position is padding (garbage reward/value ignored)
    adv, ret = rl.gae(t([[0, 0, 1]]), t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]]), gamma=0.5, lam=0.5)
    assert torch.allclose(adv, t([[-0.24375, -0.175, 0.3]]))
    assert torch.allclose(ret, t([[0.25625, 0.425, 1.0]]))
    adv, ret = rl.gae(t([[0, 2, 5]]), t([[1, 1, 9]]), t([[1, 1, 0]]), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, t([[1, 1, 0]])) and torch.allclose(ret, t([[2, 2, 0]]))
    # γ = λ = 1: advantage = return-to-go − V
    adv, _ = rl.gae(t([[0, 0, 1]]), t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]]), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, t([[0.5, 0.4, 0.3]]))


def test_ppo_surrogate_clips_the_right_side_and_dual_clip_bounds_negative_advantages():
    ratios = t([[1.5, 0.5, 1.5, 0.5]])
    adv = t([[1, 1, -1, -1]])
    out = rl.ppo_policy_loss(ratios.log(), torch.zeros_like(ratios), adv, clip_eps=0.2)
    assert torch.allclose(out.loss_BT, t([[-1.2, -0.5, 1.5, 0.8]]))
    assert out.clipped_BT.tolist() == [[True, False, False, True]]
    dual = rl.ppo_policy_loss(ratios.log(), torch.zeros_like(ratios), adv, clip_eps=0.2, dual_clip=1.3)
    assert torch.allclose(dual.loss_BT, t([[-1.2, -0.5, 1.3, 0.8]]))
    high = rl.ppo_policy_loss(ratios.log(), torch.zeros_like(ratios), adv, clip_eps=0.2, clip_eps_high=0.4)
    assert torch.allclose(high.loss_BT, t([[-1.4, -0.5, 1.5, 0.8]]))
    with pytest.raises(ValueError):
        rl.ppo_policy_loss(ratios.log(), torch.zeros_like(ratios), adv, dual_clip=0.9)


def test_ratio_one_gives_minus_advantage_and_its_gradient():
    logp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    out = rl.ppo_policy_loss(logp, torch.zeros(1, 3, dtype=torch.float64), t([[2, -1, 0.5]]))
    out.loss_BT.sum().backward()
    assert torch.allclose(logp.grad, t([[-2, 1, -0.5]]))


def test_clipped_value_loss_table():
    v, old, ret = t([[1.0, 0.0, 0.6, 1.0]]), t([[0.5, 0.5, 0.5, 0.5]]), t([[0.0, 1.0, 2.0, 1.5]])
    assert torch.allclose(rl.clipped_value_loss(v, old, ret, clip=0.2), t([[0.5, 0.5, 0.98, 0.32]]))
    assert torch.allclose(rl.clipped_value_loss(v, old, ret, clip=None), t([[0.5, 0.5, 0.98, 0.125]]))


def test_kl_estimators_table_and_clamps():
    half, quarter = math.log(0.5), math.log(0.25)
    logp, ref = t([[half, quarter]]), t([[quarter, half]])
    assert torch.allclose(rl.kl_estimate(logp, ref, "k1"), t([[math.log(2), -math.log(2)]]))
    assert torch.allclose(rl.kl_estimate(logp, ref, "k2"), t([[0.5 * math.log(2) ** 2] * 2]))
    assert torch.allclose(rl.kl_estimate(logp, ref, "k3"), t([[0.5 - 1 + math.log(2), 2 - 1 - math.log(2)]]))
    extreme = rl.kl_estimate(t([[0.0, -100.0]]), t([[-100.0, 0.0]]), "k3")
    assert torch.isfinite(extreme).all() and extreme.tolist() == [[10.0, 10.0]]
    assert rl.kl_estimate(t([[0.0]]), t([[-100.0]]), "k1").item() == 20.0
    with pytest.raises(ValueError):
        rl.kl_estimate(logp, ref, "k9")


def test_kl_shaping_puts_the_score_on_the_last_real_token():
    kl, mask = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [1, 1, 1]]), t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    shaped = rl.shape_rewards(t([1.0, 2.0, 7.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(shaped, t([[-0.05, 0.9, 0.0], [-0.2, -0.25, 1.7], [0, 0, 0]]))


def test_adaptive_kl_controller_steps_and_is_fixed_without_target():
    c = rl.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(12.0, 100) == pytest.approx(0.1 * 1.002)   # error clipped at +0.2
    assert c.update(6.6, 100) == pytest.approx(0.1 * 1.002 * 1.001)
    assert c.update(0.0, 100) == pytest.approx(0.1 * 1.002 * 1.001 * 0.998)  # clipped at −0.2
    fixed = rl.AdaptiveKLController(0.1)
    assert fixed.update(100.0, 1000) == 0.1
    restored = rl.AdaptiveKLController(1.0, target=6.0)
    restored.load_state_dict(c.state_dict())
    assert restored.value == c.value


def test_group_advantages_table_identical_groups_zero_and_dr_grpo():
    r = t([[1, 0, 0, 1], [1, 1, 1, 1], [3, 1, 2, 2]])
    std_adv = rl.group_advantages(r, eps=0.0 + 1e-12)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert torch.allclose(std_adv[0], t([0.5, -0.5, -0.5, 0.5]) / s, atol=1e-9)
    assert std_adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(std_adv[2], t([1, -1, 0, 0]) / math.sqrt(2 / 3), atol=1e-9)
    dr = rl.group_advantages(r, normalise_std=False)
    assert torch.allclose(dr, t([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [1, -1, 0, 0]]))
    assert rl.identical_group_fraction(r) == pytest.approx(1 / 3)


LOSS = t([[1, 2, 3], [4, 9, 9], [5, 7, 0]])
MASK = t([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
FULL = {"token_mean": (1 + 2 + 3 + 4 + 5 + 7) / 6, "sequence_mean": (2 + 4 + 6) / 3,
        "token_sum_const": (6 / 4 + 4 / 4 + 12 / 4) / 3}


@pytest.mark.parametrize("mode", sorted(FULL))
def test_loss_normalisations_over_uneven_lengths_equal_the_full_batch_when_split(mode):
    total, count = rl.aggregate(LOSS, MASK, mode, max_tokens=4)
    assert float(total / count) == pytest.approx(FULL[mode])
    # two "ranks": rank 0 holds rows {0} and {1} as two micro-batches, rank 1 holds row {2}. The engine weighs
    # micro-batch m by count_m / N_global and multiplies by the world size; DDP then averages over ranks.
    shards = {0: [[0], [1]], 1: [[2]]}
    parts = {r: [rl.aggregate(LOSS[rows], MASK[rows], mode, max_tokens=4) for rows in micro]
             for r, micro in shards.items()}
    n_global = sum(float(c) for micro in parts.values() for _, c in micro)
    world = len(shards)
    per_rank = [sum(float(tot / c) * float(c) / n_global * world for tot, c in micro) for micro in parts.values()]
    assert sum(per_rank) / world == pytest.approx(FULL[mode])
    naive = sum(float(tot / c) for micro in parts.values() for tot, c in micro) / 3
    if mode == "token_mean":  # a mean of micro-batch means is NOT the full-batch token mean
        assert naive != pytest.approx(FULL[mode])


def test_whiten_is_masked():
    x, m = t([[1, 3, 100], [5, 7, 100]]), t([[1, 1, 0], [1, 1, 0]])
    w = rl.whiten(x, m)
    assert torch.allclose(w, t([[-3, -1, 0], [1, 3, 0]]) / math.sqrt(5), atol=1e-6)


def test_token_logprobs_use_the_sampling_temperature():
    logits = t([[[0.0, math.log(3)]]])
    assert rl.token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    s = math.sqrt(3)
    assert rl.token_logprobs(logits, torch.tensor([[1]]), temperature=2.0).item() == pytest.approx(math.log(s / (1 + s)))
