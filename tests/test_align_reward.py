"""Reward maths: Bradley–Terry against a hand table; the scalar head reads the last real token."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.models import MoETransformer
from moeflow.models.align.reward import RewardModel, bradley_terry_loss, last_token_index
from moeflow.models.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

R_C = torch.tensor([1.0, 0.0, 2.0])
R_R = torch.tensor([0.0, 0.5, 2.0])   # differences 1, −0.5, 0 (a tie)


def test_bradley_terry_table():
    out = bradley_terry_loss(R_C, R_R)
    # mean(log(1+e^-1), log(1+e^0.5), log 2)
    assert out.loss.item() == pytest.approx(0.6601619507527583, rel=1e-6)
    assert out.accuracy.item() == pytest.approx(1 / 3)   # the tie loses
    assert out.margin.item() == pytest.approx(0.5 / 3)


def test_margin_and_centring():
    # margin 1: mean(log 2, log(1+e^1.5), log(1+e^1))
    assert bradley_terry_loss(R_C, R_R, margin=1.0).loss.item() == pytest.approx(1.2359407153536404, rel=1e-6)
    per_pair = bradley_terry_loss(R_C, R_R, margin=torch.tensor([1.0, 1.0, 1.0])).loss.item()
    assert per_pair == pytest.approx(1.2359407153536404, rel=1e-6)
    # centring adds c · mean((r_c + r_r)²) = c · mean(1, 0.25, 16) = c · 5.75
    centred = bradley_terry_loss(R_C, R_R, centering=0.01).loss.item()
    assert centred == pytest.approx(0.6601619507527583 + 0.0575, rel=1e-6)
    with pytest.raises(ValueError, match="centering"):
        bradley_terry_loss(R_C, R_R, centering=-1)


def test_gradient_separates_the_pair():
    r_c, r_r = torch.tensor([0.3], requires_grad=True), torch.tensor([0.1], requires_grad=True)
    bradley_terry_loss(r_c, r_r).loss.backward()
    sig = 1 / (1 + math.exp(0.2))   # dL/dr_c = −σ(−(r_c − r_r))
    assert r_c.grad.item() == pytest.approx(-sig, rel=1e-6)
    assert r_r.grad.item() == pytest.approx(sig, rel=1e-6)


def test_last_token_index_checks_lengths():
    assert last_token_index(torch.tensor([1, 4]), 4).tolist() == [0, 3]
    with pytest.raises(ValueError, match="lengths"):
        last_token_index(torch.tensor([0, 2]), 4)
    with pytest.raises(ValueError, match="lengths"):
        last_token_index(torch.tensor([5]), 4)


def _reward_model(seed=0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=50)))


def test_reward_reads_the_last_real_token_and_ignores_padding():
    model = _reward_model().eval()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    lengths = torch.tensor([4, 6])
    with torch.no_grad():
        base = model(ids, lengths).rewards_B
        other_pad = ids.clone()
        other_pad[0, 4:] = torch.tensor([33, 44])
        assert torch.allclose(model(other_pad, lengths).rewards_B, base, atol=1e-6)
        alone = model(ids[:1, :4], torch.tensor([4])).rewards_B   # the unpadded row by itself
        assert alone.item() == pytest.approx(base[0].item(), abs=1e-5)
        changed = ids.clone()
        changed[0, 3] = 40   # the last real token
        assert abs(model(changed, lengths).rewards_B[0].item() - base[0].item()) > 1e-6


def test_head_state_round_trip():
    a, b = _reward_model(0), _reward_model(1)
    b.lm.load_state_dict(a.lm.state_dict())
    b.load_head_state(a.head_state())
    ids, lengths = torch.tensor([[3, 4, 5]]), torch.tensor([3])
    with torch.no_grad():
        assert torch.allclose(a(ids, lengths).rewards_B, b(ids, lengths).rewards_B)
    state = a.head_state()
    state["hidden_size"] = 7
    with pytest.raises(ValueError, match="hidden size"):
        b.load_head_state(state)


def _pairs(n, seed):
    """Random 6-token sequences; at position 3 the chosen side has an even token, the rejected an odd one."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(10, 50, (n, 6), generator=g)
    chosen, rejected = body.clone(), body.clone()
    chosen[:, 3] = 2 * torch.randint(5, 25, (n,), generator=g)
    rejected[:, 3] = 2 * torch.randint(5, 25, (n,), generator=g) + 1
    return chosen, rejected


def test_reward_model_learns_a_preference_and_not_shuffled_labels():
    """A few dozen Adam steps separate chosen from rejected on held-out pairs; with the labels shuffled
    per pair (the same sequences, preference a coin flip) held-out accuracy stays near chance."""
    def train(shuffle: bool) -> float:
        model = _reward_model(0)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        chosen, rejected = _pairs(64, seed=1)
        if shuffle:
            flip = torch.randperm(64, generator=torch.Generator().manual_seed(2)) < 32  # exactly half
            chosen, rejected = torch.where(flip[:, None], rejected, chosen), torch.where(flip[:, None], chosen, rejected)
        lengths = torch.full((64,), 6)
        for _ in range(30):
            opt.zero_grad()
            out = bradley_terry_loss(model(chosen, lengths).rewards_B, model(rejected, lengths).rewards_B)
            out.loss.backward()
            opt.step()
        held_c, held_r = _pairs(128, seed=3)
        with torch.no_grad():
            lengths = torch.full((128,), 6)
            return bradley_terry_loss(model(held_c, lengths).rewards_B, model(held_r, lengths).rewards_B).accuracy.item()

    assert train(shuffle=False) >= 0.95
    assert 0.3 <= train(shuffle=True) <= 0.7


def test_balancing_losses_reach_the_router_through_the_reward_forward():
    model = _reward_model()
    out = model(torch.tensor([[5, 6, 7, 8]]), torch.tensor([4]), with_losses=True)
    assert out.balance_loss is not None and out.balance_loss.requires_grad and out.balance_loss.item() > 0
    out.balance_loss.backward()
    router = model.routers()[0]
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert out.aux["tokens_per_expert"].shape == (len(model.routers()), model.cfg.num_routed_experts)
    assert model(torch.tensor([[5, 6]]), torch.tensor([2])).balance_loss is None


def test_reply_mean_logprob_equals_a_naive_loop_over_the_reply_tokens():
    """Reply = the tokens after the row's LAST marker (id 7 here), up to its length; padding and an earlier
    marker change nothing; each token is scored by the LM's prediction at the position before it."""
    from moeflow.models.align.reward import reply_mean_logprob

    model = _reward_model().lm.eval()
    ids = torch.tensor([[5, 7, 9, 7, 11, 12, 13, 0, 0], [5, 6, 7, 20, 21, 22, 23, 24, 25]])
    lengths = torch.tensor([7, 9])
    with torch.no_grad():
        out = model(ids, return_hidden=True)
        got = reply_mean_logprob(model, ids, out.hidden, lengths, reply_start_id=7)
        logp = torch.log_softmax(out.logits.float(), -1)
        want = [sum(logp[0, p - 1, ids[0, p]] for p in (4, 5, 6)) / 3,
                sum(logp[1, p - 1, ids[1, p]] for p in range(3, 9)) / 6]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)


def test_likelihood_input_starts_at_one_and_carries_the_lms_preference():
    """With ``reply_start_id`` the reward is head + a · mean log π(reply); a = 1 at the start (the plain head's
    reward plus exactly the reply's mean log-prob), a = 0 is the plain head; the state round-trips and a
    mismatch is refused."""
    from moeflow.models.align.reward import reply_mean_logprob

    plain, with_lik = _reward_model(0), _reward_model(0)
    with_lik = RewardModel(plain.lm, reply_start_id=7)
    assert float(with_lik.likelihood_weight) == 1.0
    with_lik.load_head_state({**plain.head_state(), "likelihood_weight": torch.tensor(1.0), "reply_start_id": 7})
    ids, lengths = torch.tensor([[5, 7, 9, 10, 11]]), torch.tensor([5])
    with torch.no_grad():
        base = plain.eval()(ids, lengths).rewards_B
        lp = reply_mean_logprob(plain.lm, ids, plain.lm(ids, return_hidden=True).hidden, lengths, 7)
        torch.testing.assert_close(with_lik.eval()(ids, lengths).rewards_B, base + lp)
        with_lik.likelihood_weight.fill_(0.0)
        torch.testing.assert_close(with_lik(ids, lengths).rewards_B, base)
        with_lik.likelihood_weight.fill_(1.0)
    other = RewardModel(_reward_model(1).lm, reply_start_id=7)
    other.lm.load_state_dict(plain.lm.state_dict())
    other.load_head_state(with_lik.head_state())
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(ids, lengths).rewards_B, with_lik(ids, lengths).rewards_B)
    with pytest.raises(ValueError, match="likelihood"):
        plain.load_head_state(with_lik.head_state())
