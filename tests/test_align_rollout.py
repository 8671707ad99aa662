"""Rollouts for RL: generation-time log-probs, packing, on-policy ratio 1, and routing replay (R3)."""

from __future__ import annotations

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.align import rl
from moeflow.models.align.rollout import (pack_rollout, policy_pass, routing_agreement, routing_counts,
                                          routing_maxvio)
from moeflow.models.generation import generate
from train_fakes import one_thread, tiny_model_overrides


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny").replace(**tiny_model_overrides(48))
    return MoETransformer(cfg).to(dtype).eval()


PROMPTS = [[1, 5, 7, 9], [1, 3], [1, 2, 4, 6, 8, 10, 12]]


def _rollout(model, temperature=1.0, **kw):
    return generate(model, PROMPTS, 6, temperature=temperature, top_k=None, seed=3, stop_token_ids=[2],
                    record_routing=True, return_logprobs=True, **kw)


def test_generation_logprobs_equal_the_update_recompute_so_the_on_policy_ratio_is_one():
    model = _model()
    for temperature in (1.0, 0.7):
        gen = _rollout(model, temperature)
        packed = pack_rollout(PROMPTS, gen.tokens, gen.logprobs, gen.routing, pad_id=0)
        for replay in (None, packed.routing_LBTK):
            out = policy_pass(model, packed.input_ids_BT, packed.targets_BT, temperature=temperature,
                              replay_LBTK=replay)
            m = packed.completion_mask_BT
            assert m.sum() == sum(len(t) for t in gen.tokens)
            ratio = torch.exp(out.logp_BT - packed.old_logp_BT)[m]
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-9), ratio
            surrogate = rl.ppo_policy_loss(out.logp_BT, packed.old_logp_BT, torch.ones_like(out.logp_BT))
            assert not surrogate.clipped_BT[m].any()


def test_fp32_on_policy_ratio_is_one_to_rounding():
    model = _model(torch.float32)
    gen = _rollout(model)
    packed = pack_rollout(PROMPTS, gen.tokens, gen.logprobs, gen.routing, pad_id=0)
    out = policy_pass(model, packed.input_ids_BT, packed.targets_BT, replay_LBTK=packed.routing_LBTK)
    ratio = torch.exp(out.logp_BT - packed.old_logp_BT)[packed.completion_mask_BT]
    assert (ratio - 1).abs().max() < 1e-4


def test_pack_rollout_layout():
    packed = pack_rollout([[1, 5, 7], [1]], [[8, 2], []], [[-0.5, -0.25], []], None, pad_id=0)
    assert packed.input_ids_BT.tolist() == [[1, 5, 7, 8], [1, 0, 0, 0]]
    assert packed.targets_BT.tolist() == [[5, 7, 8, 2], [0, 0, 0, 0]]
    assert packed.completion_mask_BT.tolist() == [[False, False, True, True], [False] * 4]
    assert packed.old_logp_BT[0].tolist() == [0, 0, -0.5, -0.25]
    assert packed.token_mask_BT.tolist() == [[True] * 4, [True, False, False, False]]


def test_routing_replay_reproduces_the_recorded_selection_and_the_router_still_gets_gradients():
    model = _model(torch.float32)
    gen = _rollout(model)
    packed = pack_rollout(PROMPTS, gen.tokens, gen.logprobs, gen.routing, pad_id=0)
    real = packed.token_mask_BT
    # move the routers far from where they were at rollout time: their own choices now differ
    with torch.no_grad():
        for router in model.routers():
            router.weight.add_(torch.randn_like(router.weight) * 0.5)
    model.train()
    free = policy_pass(model, packed.input_ids_BT, packed.targets_BT)
    agreement_off = routing_agreement(packed.routing_LBTK, free.routing_LBTK, real)
    assert (agreement_off < 1).any(), agreement_off
    replayed = policy_pass(model, packed.input_ids_BT, packed.targets_BT, replay_LBTK=packed.routing_LBTK)
    assert torch.equal(replayed.routing_LBTK[:, real], packed.routing_LBTK[:, real])
    assert routing_agreement(packed.routing_LBTK, replayed.routing_LBTK, real).tolist() == [1.0] * len(model.routers())
    model.zero_grad()
    loss = -(replayed.logp_BT * packed.completion_mask_BT).sum()
    loss.backward()
    for router in model.routers():
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_routing_agreement_counts_and_maxvio_on_hand_tables():
    a = torch.tensor([[[[0, 1], [2, 3]]]])  # (L=1, B=1, T=2, K=2)
    b = torch.tensor([[[[1, 0], [2, 0]]]])
    mask = torch.tensor([[True, True]])
    assert routing_agreement(a, b, mask).tolist() == [0.75]
    assert routing_agreement(a, b, torch.tensor([[True, False]])).tolist() == [1.0]
    counts = routing_counts(a, mask, 4)
    assert counts.tolist() == [[1, 1, 1, 1]]
    assert routing_maxvio(a, mask, 4).tolist() == [0.0]
    assert routing_maxvio(b, mask, 4).tolist() == [pytest.approx(1.0)]  # loads (2,1,1,0): (2 − 1)/1
