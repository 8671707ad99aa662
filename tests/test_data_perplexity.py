"""Character n-gram Kneser-Ney LM and CCNet buckets."""

from __future__ import annotations

import random

import numpy as np
import pytest

from moeflow.platform.data.domain import load_seed_examples
from moeflow.platform.data.perplexity import CharNgramLM, bucket_of, bucket_thresholds


@pytest.fixture(scope="module")
def prose_lm() -> CharNgramLM:
    texts = [t for t, label in load_seed_examples() if label in ("prose", "dialogue")]
    return CharNgramLM(order=4).fit(texts[:-5])


def test_probabilities_sum_to_one(prose_lm):
    """For a fixed history, P(c | history) over the training characters plus one unseen
    character (the single slot reserved for all unseen ones) is exactly 1."""
    texts = [t for t, label in load_seed_examples() if label in ("prose", "dialogue")][:-5]
    chars = sorted({c for t in texts for c in t})
    assert "\u4e2d" not in chars
    for history in ("the ", "xq", "", "\u4e2d"):
        total = sum(np.exp(prose_lm.log_probs(history + c)[-1]) for c in chars + ["\u4e2d"])
        assert total == pytest.approx(1.0, abs=1e-9)


def test_natural_text_beats_gibberish(prose_lm):
    held_out = [t for t, label in load_seed_examples() if label == "prose"][-5:]
    rng = random.Random(0)
    gibberish = ["".join(rng.choice("qxzjkvbwy ") for _ in range(len(t))) for t in held_out]
    scrambled = ["".join(rng.sample(t, len(t))) for t in held_out]
    natural = [prose_lm.perplexity(t) for t in held_out]
    assert max(natural) < min(prose_lm.perplexity(t) for t in scrambled)
    assert max(prose_lm.perplexity(t) for t in scrambled) < min(prose_lm.perplexity(t) for t in gibberish)
    assert prose_lm.perplexity("") == float("inf")


def test_buckets_order_natural_before_gibberish(prose_lm):
    held_out = [t for t, label in load_seed_examples() if label == "prose"][-5:]
    rng = random.Random(1)
    natural = held_out + held_out[:1]
    noisy = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(120)) for _ in range(4)]
    scores = np.array([prose_lm.perplexity(t) for t in natural + noisy])
    cuts = bucket_thresholds(scores, (30, 60))
    buckets = [bucket_of(s, cuts) for s in scores]
    assert buckets[len(natural):] == ["tail"] * 4  # gibberish is the tail
    assert buckets.count("head") == 3  # 30% of 10 docs
    assert all(b in ("head", "middle") for b in buckets[: len(natural)])


def test_bucket_thresholds_table():
    scores = np.arange(1, 11, dtype=float)  # 1..10
    assert bucket_thresholds(scores) == (3.0, 6.0)
    assert [bucket_of(s, (3.0, 6.0)) for s in (1, 3, 4, 6, 7, 10)] == ["head", "head", "middle", "middle", "tail", "tail"]
    assert bucket_thresholds(np.array([np.inf])) == (np.inf, np.inf)


def test_fit_is_deterministic_and_needs_fitting():
    texts = ["hello world, hello there.", "the cat sat on the mat."]
    a = CharNgramLM(3).fit(texts).perplexity("hello cat")
    b = CharNgramLM(3).fit(list(texts)).perplexity("hello cat")
    assert a == b
    with pytest.raises(RuntimeError, match="not fitted"):
        CharNgramLM(3).perplexity("x")
