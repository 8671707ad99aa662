"""The batched sampler of the serving engine equals ``sample_next`` row by row, token for token."""

import pytest
import torch

from moeflow.models.generation import sample_next, top_k_filter, top_p_filter
from moeflow.models.serving.sampling import filter_rows, sample_rows

V = 64
ROWS = [  # (temperature, top_k, top_p, seed)
    (0.0, None, 1.0, None),
    (0.7, None, 0.9, 11),
    (1.0, 1, 1.0, 12),          # top-1: argmax of the scaled logits
    (1.3, 5, 1.0, 13),
    (0.5, V, 0.3, 14),          # k = V: no top-k filter
    (1.0, V + 7, 1e-6, 15),     # k > V; a tiny p keeps the top token only
    (0.9, 3, 0.5, 16),
    (0.0, 4, 0.2, 17),          # greedy ignores the filters and the seed
    (2.0, None, 0.999, 18),
    (0.25, 10, 0.75, 19),
]


def _reference(logits_BV, rows, gens):
    return [int(sample_next(logits_BV[b:b + 1], t, k, p, g)[0]) for b, ((t, k, p, _), g) in enumerate(zip(rows, gens))]


def _batched(logits_BV, rows, gens):
    return sample_rows(logits_BV, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], gens).tolist()


def _gens(rows):
    return [torch.Generator().manual_seed(s) if s is not None else None for *_, s in rows]


@pytest.mark.parametrize("ties", [False, True])
def test_sample_rows_equals_sample_next_per_row_over_many_steps(ties):
    g = torch.Generator().manual_seed(0)
    ref_gens, new_gens = _gens(ROWS), _gens(ROWS)
    for step in range(40):  # generators advance alike, step after step
        logits_BV = torch.randn(len(ROWS), V, generator=g) * 3
        if ties:  # many equal logits: the k-th value and the nucleus edge fall inside ties
            logits_BV = logits_BV.round()
        assert _batched(logits_BV, ROWS, new_gens) == _reference(logits_BV, ROWS, ref_gens), step


def test_filter_rows_equals_the_per_row_filters_bit_for_bit():
    rows = [r for r in ROWS if r[0] > 0] + [(0.7, None, None, None), (0.3, 2, None, None), (1.3, None, 1.0, None)]
    logits_BV = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(3)) * 3
    logits_BV[-1, 5] = 80.0  # p = 1 and a tail without probability mass: nothing may be dropped
    got_BV = filter_rows(logits_BV, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    for b, (t, k, p, _) in enumerate(rows):
        ref_V = top_p_filter(top_k_filter(logits_BV[b:b + 1].float() / t, k), p)[0]
        assert torch.equal(got_BV[b], ref_V), b


@pytest.mark.parametrize("pick", [[0, 7], [1, 3, 6], [2], list(range(len(ROWS)))])
def test_sample_rows_subsets_all_greedy_all_sampled_and_bf16(pick):
    rows = [ROWS[i] for i in pick]
    logits_BV = (torch.randn(len(rows), V, generator=torch.Generator().manual_seed(5)) * 2).to(torch.bfloat16)
    assert _batched(logits_BV, rows, _gens(rows)) == _reference(logits_BV, rows, _gens(rows))


def test_unseeded_rows_draw_inside_their_filters_with_the_right_law():
    torch.manual_seed(0)
    logits_1V = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    rows = [(1.0, None, 1.0, None), (1.0, 2, 1.0, None), (1.0, None, 0.6, None), (1.0, None, 1.0, 3)]
    logits_BV = logits_1V.expand(len(rows), 4).contiguous()
    counts_BV = torch.zeros(len(rows), 4)
    gens = _gens(rows)
    for _ in range(4000):
        tok_B = sample_rows(logits_BV, *[[r[i] for r in rows] for i in range(3)], gens)
        counts_BV[torch.arange(len(rows)), tok_B] += 1
    freq_BV = counts_BV / 4000
    assert torch.allclose(freq_BV[0], torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    assert freq_BV[1, 2:].sum() == 0 and abs(freq_BV[1, 0] - 0.625) < 0.03   # top-2
    assert freq_BV[2, 2:].sum() == 0 and abs(freq_BV[2, 0] - 0.625) < 0.03   # nucleus 0.6: tokens 0 and 1
    assert torch.allclose(freq_BV[3], torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def test_sample_rows_refuses_bad_filters_like_sample_next():
    logits_BV = torch.zeros(2, V)
    with pytest.raises(ValueError, match="top_k"):
        sample_rows(logits_BV, [1.0, 1.0], [0, None], [1.0, 1.0], [None, None])
    with pytest.raises(ValueError, match="top_p"):
        sample_rows(logits_BV, [1.0, 1.0], [None, None], [0.0, 1.0], [None, None])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_rows_equals_sample_next_per_row_on_the_gpu():
    """CUDA divides by a scalar temperature as a product with its reciprocal and draws with Philox: still equal."""
    g = torch.Generator(device="cuda").manual_seed(0)
    ref_gens, new_gens = ([torch.Generator(device="cuda").manual_seed(s) if s is not None else None for *_, s in ROWS]
                          for _ in range(2))
    for step in range(40):
        logits_BV = torch.randn(len(ROWS), 32768, generator=g, device="cuda") * 3
        assert _batched(logits_BV, ROWS, new_gens) == _reference(logits_BV, ROWS, ref_gens), step
        x_BV = filter_rows(logits_BV[1:3], [0.7, 1.3], [None, 5], [0.9, None])
        ref_BV = torch.cat([top_p_filter(top_k_filter(logits_BV[b:b + 1].float() / t, k), p)
                            for b, t, k, p in ((1, 0.7, None, 0.9), (2, 1.3, 5, None))])
        assert torch.equal(x_BV, ref_BV), step
