"""generate(): cached decode == full forward, sampling filters, stop tokens, routing capture (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.generation import CudaGraphPool, generate, left_pad, sample_next, top_k_filter, top_p_filter

PROMPT_LENGTHS = (3, 9, 5, 1)
NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def model() -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=128, init_std=0.08)  # peakier logits: no near-ties
    m = MoETransformer(cfg).eval()
    with torch.no_grad():
        for router in m.routers():
            router.e_score_correction_bias.normal_(0.0, 0.05)
    return m


@pytest.fixture(scope="module")
def prompts(model) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, model.cfg.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@torch.no_grad()
def _greedy_alone(model, prompt: list[int], n: int) -> list[int]:
    """Reference: one unpadded row, a full forward pass (no cache) per new token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_cached_greedy_equals_full_forward_per_row(model, prompts):
    n = 10
    cached = generate(model, prompts, n)
    uncached = generate(model, prompts, n, use_cache=False)
    for b, prompt in enumerate(prompts):
        ref = _greedy_alone(model, prompt, n)
        assert cached.tokens[b] == ref, f"row {b} (prompt length {len(prompt)})"
        assert uncached.tokens[b] == ref
    assert cached.finish_reasons == ["length"] * len(prompts)
    assert cached.num_prompt_tokens == list(PROMPT_LENGTHS)


def test_left_pad_right_aligns_prompts():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_top_k_filter_on_hand_made_logits():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.5, 0.25, 1.5, 0.75]])
    out = top_k_filter(logits, 2)
    assert out.tolist() == [[NEG_INF, 4.0, 3.0, NEG_INF], [NEG_INF, NEG_INF, 1.5, 0.75]]
    assert torch.equal(top_k_filter(logits, 4), logits) and torch.equal(top_k_filter(logits, None), logits)
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(logits, 0)


def test_top_p_filter_on_hand_made_logits():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.9, 0.04, 0.03, 0.03]])
    logits = probs.log()
    # row 0 sorted: 0.5, 0.3, 0.15, 0.05 -> mass before: 0, 0.5, 0.8, 0.95
    kept = torch.isfinite(top_p_filter(logits, 0.75))
    assert kept.tolist() == [[True, False, True, False], [True, False, False, False]]
    kept = torch.isfinite(top_p_filter(logits, 0.85))
    assert kept.tolist() == [[True, False, True, True], [True, False, False, False]]
    kept = torch.isfinite(top_p_filter(logits, 0.01))  # the most likely token always survives
    assert kept.tolist() == [[True, False, False, False], [True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sampling_respects_filters_and_seed():
    logits = torch.tensor([[0.0, 2.0, 1.0, 3.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_k=3, generator=g)
    assert set(draws.tolist()) == {1, 2, 3}
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    expect = torch.softmax(torch.tensor([2.0, 1.0, 3.0]), 0)
    assert torch.allclose(freq[[1, 2, 3]], expect, atol=0.03)
    # probabilities: p(3)=0.64, p(1)=0.23, p(2)=0.09 -> nucleus 0.8 keeps {3, 1}, nucleus 0.6 keeps {3}
    assert set(sample_next(logits, temperature=1.0, top_p=0.8, generator=g).tolist()) == {1, 3}
    assert set(sample_next(logits, temperature=1.0, top_p=0.6, generator=g).tolist()) == {3}
    assert sample_next(logits[:1], temperature=0.0).item() == 3
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1.0)


def test_seeded_sampling_is_reproducible(model, prompts):
    a = generate(model, prompts, 8, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    b = generate(model, prompts, 8, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    assert a.tokens == b.tokens
    assert generate(model, prompts, 5, temperature=1.0, top_k=1, seed=1).tokens == generate(model, prompts, 5).tokens


def test_stop_tokens_stop_each_row_independently(model, prompts):
    n = 12
    free = generate(model, prompts, n).tokens
    stop = free[1][2]  # row 1 produces this at step 2; other rows stop at their own first occurrence (or not)
    result = generate(model, prompts, n, stop_token_ids=[stop], sync_every=1)
    for b, row in enumerate(free):
        if stop in row:
            cut = row.index(stop) + 1
            assert result.tokens[b] == row[:cut] and result.finish_reasons[b] == "stop"
        else:
            assert result.tokens[b] == row and result.finish_reasons[b] == "length"
    assert len(result.tokens[1]) <= 3


def test_recorded_routing_shape_and_replay_match(model, prompts):
    n = 6
    result = generate(model, prompts, n, record_routing=True, stop_token_ids=[])
    cfg = model.cfg
    assert len(result.routing) == len(prompts)
    for b, prompt in enumerate(prompts):
        r = result.routing[b]
        assert r.shape == (len(prompt) + len(result.tokens[b]), cfg.num_moe_layers, cfg.num_experts_per_tok)
        assert r.dtype == torch.int64 and 0 <= r.min() and r.max() < cfg.num_routed_experts
        # the routing a full forward over prompt + completion chooses, token by token
        full = torch.tensor([prompt + result.tokens[b]])
        with torch.no_grad():
            choices_L1SK = model(full, return_router_choices=True).aux["router_choices"]
        assert torch.equal(torch.sort(r, -1).values, torch.sort(choices_L1SK[:, 0].permute(1, 0, 2), -1).values)


def test_generate_validates_inputs(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 10_000]], 4)
    assert generate(model, [[1, 2]], 0).tokens == [[]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager_cached(model, prompts):
    gpu = MoETransformer(model.cfg).to("cuda", torch.bfloat16).eval()
    gpu.load_state_dict(model.state_dict())
    eager = generate(gpu, prompts, 8)
    graphed = generate(gpu, prompts, 8, cuda_graph=True, record_routing=True)
    agree = sum(x == y for a, b in zip(eager.tokens, graphed.tokens) for x, y in zip(a, b))
    assert agree >= 0.9 * sum(len(a) for a in eager.tokens)  # bf16: slot-count differences may flip a near-tie
    assert [r.shape[0] for r in graphed.routing] == [p + len(t) for p, t in zip(PROMPT_LENGTHS, graphed.tokens)]
    pool = CudaGraphPool()
    first = generate(gpu, prompts, 8, cuda_graph=pool)
    again = generate(gpu, prompts, 8, cuda_graph=pool)  # replays the graph captured by the first call
    assert first.tokens == again.tokens and len(pool._entries) == 1


@torch.no_grad()
def test_router_stats_off_gives_the_same_logits_and_choices_without_the_statistics(model, prompts):
    """Decode steps pass router_stats=False: same logits and router choices, no counts / MaxVio / entropy."""
    ids = torch.tensor([prompts[1]])
    full = model(ids, return_router_choices=True)
    lean = model(ids, return_router_choices=True, router_stats=False)
    assert torch.equal(full.logits, lean.logits)
    assert torch.equal(full.aux["router_choices"], lean.aux["router_choices"])
    assert {"tokens_per_expert", "maxvio", "router_entropy"} <= set(full.aux)
    assert not {"tokens_per_expert", "maxvio", "router_entropy"} & set(lean.aux)
