"""Pure evaluation maths: pass@k (hand table), answer extraction, MC predictions, specialisation, 13-gram overlap."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from moeflow.models.eval.decontam import NgramIndex, ngram_hashes, words
from moeflow.models.eval.extract import exact_match, extract_answer, normalize, truncate_at_stop
from moeflow.models.eval.passk import mean_pass_at_k, pass_at_k
from moeflow.models.eval.prompts import MCItem, mc_predictions
from moeflow.models.eval.specialisation import maxvio, mutual_information, specialisation_report

# (n, c, k, pass@k) worked out by hand: 1 - C(n-c, k) / C(n, k)
PASS_AT_K_TABLE = [
    (10, 0, 1, 0.0),
    (10, 10, 1, 1.0),
    (10, 3, 1, 0.3),                 # c / n
    (10, 3, 2, 24 / 45),             # 1 - 21/45
    (10, 3, 5, 1 - 21 / 252),        # C(7,5) = 21, C(10,5) = 252
    (10, 3, 8, 1.0),                 # n - c = 7 < 8: every draw holds a correct one
    (5, 1, 5, 1.0),
    (200, 1, 100, 0.5),              # C(199,100)/C(200,100) = 100/200
    (200, 2, 100, 1 - 9900 / 39800),  # (100·99)/(200·199)
]


@pytest.mark.parametrize("n,c,k,expected", PASS_AT_K_TABLE)
def test_pass_at_k_hand_table(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_exact_rational_on_a_grid_and_large_n():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    # n where C(n, k) overflows float64: the product form stays finite and exact enough
    assert math.comb(2000, 1000) > 1e300
    exact = 1 - Fraction(math.comb(2000 - 7, 1000), math.comb(2000, 1000))
    assert pass_at_k(2000, 7, 1000) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_is_not_the_biased_estimator_and_refuses_bad_input():
    assert pass_at_k(10, 3, 2) != pytest.approx(1 - (1 - 0.3) ** 2)
    assert mean_pass_at_k([10, 10], [3, 0], 2) == pytest.approx(12 / 45)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError, match="fewer than k"):
        mean_pass_at_k([10, 1], [1, 1], 2)


def test_extract_and_exact_match():
    assert extract_answer("3 + 4 = 7, so the answer is 1,024.") == "1,024"
    assert exact_match(extract_answer("so the answer is 1,024."), "1024")
    assert exact_match("12.50", "12.5") and exact_match("-0", "0")
    assert extract_answer("no digits here") is None and not exact_match(None, "1")
    assert extract_answer("#### 42 then #### 43", r"#### (\-?\d+)") == "42"
    assert extract_answer("#### 42 then #### 43", r"#### (\-?\d+)", pick="last") == "43"
    assert extract_answer("Answer: B.", r"[BCD]") == "B"  # no group: the whole match
    assert extract_answer("Answer: B.", r"Answer: ([ABCD])") == "B"
    assert normalize("  The  Cat. ") == "the cat"
    assert not exact_match("12", "21")
    assert truncate_at_stop("x = 1\ndef g():\n", ["\ndef ", "\nclass "]) == "x = 1"


def test_mc_predictions_acc_vs_acc_norm():
    # the long right answer loses on the sum but wins per character
    conts = [" no", " the quick brown fox"]
    lps = [-3.0, -6.0]
    assert mc_predictions(lps, conts) == (0, 1)
    assert mc_predictions([-1.0, -1.0], [" a", " b"]) == (0, 0)  # ties go to the first choice
    with pytest.raises(ValueError):
        MCItem("q", ("only",), 0)
    with pytest.raises(ValueError):
        MCItem("q", ("a", "b"), 2)


def test_mutual_information_against_sklearn_and_extremes():
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(3, 4, 8)).astype(float)
    mi = mutual_information(counts)
    for layer in range(3):  # sklearn on the expanded (domain, expert) samples, in nats
        d, e = np.nonzero(counts[layer] > -1)
        reps = counts[layer][d, e].astype(int)
        ref = mutual_info_score(np.repeat(d, reps), np.repeat(e, reps)) / math.log(2)
        assert mi[layer] == pytest.approx(ref, abs=1e-9)
    # domain decides the expert: MI = H(domain) = log2(4); independent: 0
    determined = np.zeros((1, 4, 8))
    for d in range(4):
        determined[0, d, 2 * d] = 10
    assert mutual_information(determined)[0] == pytest.approx(2.0)
    independent = np.ones((1, 4, 8)) * 5
    assert mutual_information(independent)[0] == pytest.approx(0.0, abs=1e-12)
    rep = specialisation_report(determined, ["code", "prose", "maths", "chat"])
    assert rep["layers"][0]["normalized_mi"] == pytest.approx(1.0)
    assert rep["layers"][0]["top_expert"]["maths"] == {"expert": 4, "share": 1.0}


def test_maxvio_matches_definition_on_a_table():
    counts = np.array([[[4, 0, 2, 2], [0, 0, 0, 0]]], dtype=float)  # load (4, 0, 2, 2), mean 2
    assert maxvio(counts)[0] == pytest.approx(1.0)


def test_ngram_overlap_finds_a_planted_copy_through_formatting_changes():
    train = ("The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat "
             "beside the old fireplace in the house")
    index = NgramIndex(n=13).add_all([train, "unrelated words " * 20])
    planted = "QUESTION: the QUICK brown fox, jumps over the lazy dog -- while the cat sleeps on the rug?"
    assert index.status(planted) == "contaminated"
    assert index.status("a completely different question about prime numbers and their many curious properties in number theory") == "clean"
    assert index.status("too short to check") == "too_short"
    assert len(ngram_hashes(train, 13)) == len(words(train)) - 12
    # twelve shared words are not a 13-gram
    twelve = " ".join(words(train)[:12]) + " zebra"
    assert index.status(twelve) == "clean"


def test_short_items_are_checked_whole_when_the_index_keeps_shorter_grams():
    index = NgramIndex(n=13, min_words=5).add_all(["so the quiz asked which keyword starts a loop in python and we said for"])
    assert index.status("Which keyword starts a loop in Python?") == "contaminated"   # 7 words, all in a row
    assert index.status("Which keyword starts a loop in Rust?") == "clean"
    assert index.status("starts a loop") == "too_short"
    assert NgramIndex(n=13).add_all(["which keyword starts a loop in python"]).status("which keyword starts a loop in python") == "too_short"
