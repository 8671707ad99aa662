"""Near-dedup banding chosen from the threshold (issue 9): bands x rows derived from
``threshold``, ``num_perm`` and the verification threshold; the detection probability (banding
and verification together) checked against a simulation; recall >= 0.95 at J >= 0.8 at the
default, measured on synthetic near-duplicate pairs at measured Jaccard; the S-curve published
in the curated artefact's stats and funnel."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from pydantic import ValidationError

from moeflow.platform.data.banding import choose_banding, detection_probability, s_curve_rows
from moeflow.platform.data.curate import CurateConfig, NearDedupConfig, run_curation
from moeflow.platform.data.lsh import clusters_from_signatures
from moeflow.platform.data.minhash import compute_signatures, shingle_hashes
from moeflow.platform.data.sources import SourceConfig
from moeflow.platform.store import LocalStore


def test_detection_probability_matches_a_simulation():
    """Each MinHash entry agrees with probability J, independently: simulate bands + verification."""
    rng = np.random.default_rng(0)
    bands, rows, verify = 9, 7, 0.7
    n = bands * rows
    for j in (0.6, 0.75, 0.85):
        agree_TN = rng.random((40_000, n)) < j
        banded = agree_TN.reshape(-1, bands, rows).all(axis=2).any(axis=1)
        verified = agree_TN.mean(axis=1) >= verify
        simulated = float((banded & verified).mean())
        assert detection_probability(j, bands, rows, verify) == pytest.approx(simulated, abs=0.01)
    assert detection_probability(0.8, 9, 7, None) == pytest.approx(1 - (1 - 0.8**7) ** 9)


def test_banding_follows_the_threshold():
    chosen = {t: choose_banding(t, num_perm=128, verify_threshold=t - 0.08, min_recall=0.95) for t in (0.6, 0.7, 0.8, 0.9)}
    for t, (b, r) in chosen.items():
        assert b * r <= 128
        assert detection_probability(t, b, r, t - 0.08) >= 0.95
    rows = [chosen[t][1] for t in sorted(chosen)]
    assert rows == sorted(rows) and rows[0] < rows[-1]  # a higher threshold affords more rows per band
    # among every feasible split, the chosen one admits the fewest candidates below the threshold
    b, r = chosen[0.8]
    area = lambda b, r: float(np.mean([detection_probability(x, b, r, None) for x in np.linspace(0, 0.72, 145)]))
    for rr in range(1, 129):
        bb = 128 // rr
        if detection_probability(0.8, bb, rr, 0.72) >= 0.95:
            assert area(b, r) <= area(bb, rr) + 1e-12
    with pytest.raises(ValueError, match="cannot reach"):
        choose_banding(0.8, num_perm=16, verify_threshold=0.8, min_recall=0.99)


def test_config_derives_banding_and_rejects_what_cannot_reach_the_recall():
    nd = NearDedupConfig()
    bands, rows = nd.banding()
    assert (bands, rows) == choose_banding(nd.threshold, nd.num_perm, nd.verify_threshold, nd.min_recall)
    assert NearDedupConfig(threshold=0.9).banding() != (bands, rows)
    assert NearDedupConfig(num_bands=14, rows_per_band=8).banding() == (14, 8)  # explicit override
    with pytest.raises(ValidationError, match="rows_per_band"):
        NearDedupConfig(num_bands=14)
    with pytest.raises(ValidationError, match="cannot reach"):
        NearDedupConfig(verify_margin=0.0)  # verifying at the threshold itself misses half the pairs at it


# (shingles, edits) giving J = (S - 5k) / (S + 5k) exactly: k word edits more than 5 words apart
# change 5 shingles each
EXACT = {0.7: (170, 6), 0.8: (180, 4), 0.9: (190, 2)}


def near_duplicate_pairs(jaccard: float, num_pairs: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    """Docs of random words and an edited copy each, at a Jaccard (5-gram shingles) that is
    measured, not assumed."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9))) for _ in range(50_000)]
    num_shingles, num_edits = EXACT[jaccard]
    texts, pairs = [], []
    for _ in range(num_pairs):
        words = [rng.choice(vocab) for _ in range(num_shingles + 4)]
        copy = list(words)
        gap = (len(words) - 8) // num_edits  # edits inside [4, len - 5], at least 5 words apart
        for e in range(num_edits):
            copy[4 + e * gap + rng.randrange(gap - 5)] = "x" + rng.choice(vocab)  # "x...": never the old word
        a, b = set(shingle_hashes(" ".join(words)).tolist()), set(shingle_hashes(" ".join(copy)).tolist())
        assert len(a & b) / len(a | b) == pytest.approx(jaccard)
        pairs.append((len(texts), len(texts) + 1))
        texts += [" ".join(words), " ".join(copy)]
    return texts, pairs


def recall(texts, pairs, bands: int, rows: int, verify: float | None, seed: int = 0) -> float:
    sigs = compute_signatures(texts, num_perm=bands * rows, ngram=5, seed=seed)
    ids = [f"d{i:05d}" for i in range(len(texts))]
    cluster_of = {d: k for k, c in enumerate(clusters_from_signatures(ids, sigs, bands, rows, threshold=verify)) for d in c}
    found = sum(ids[a] in cluster_of and cluster_of.get(ids[a]) == cluster_of.get(ids[b]) for a, b in pairs)
    return found / len(pairs)


def test_recall_at_jaccard_08_is_at_least_095_at_the_default():
    nd = NearDedupConfig()
    bands, rows = nd.banding()
    texts, pairs = near_duplicate_pairs(0.8, 500)
    assert recall(texts, pairs, bands, rows, nd.verify_threshold) >= 0.95
    assert recall(texts, pairs, 14, 8, 0.75) < 0.9  # the old fixed 14 x 8, verified at 0.75 (0.87 expected)


def test_published_s_curve_matches_measured_detection():
    nd = NearDedupConfig()
    bands, rows = nd.banding()
    for point in s_curve_rows(nd):
        texts, pairs = near_duplicate_pairs(point["jaccard"], 400, seed=int(point["jaccard"] * 10))
        measured = recall(texts, pairs, bands, rows, nd.verify_threshold)
        spread = (point["p_detect"] * (1 - point["p_detect"]) / 400) ** 0.5
        assert abs(measured - point["p_detect"]) <= 3 * spread + 0.01, (point, measured)


def test_the_s_curve_is_published_in_the_funnel(tmp_path):
    rows = s_curve_rows(NearDedupConfig())
    assert [r["jaccard"] for r in rows] == [0.7, 0.8, 0.9]
    assert rows[1]["p_detect"] >= 0.95 and rows[0]["p_detect"] < rows[1]["p_detect"] <= rows[2]["p_detect"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i} with some words"}) + "\n" for i in range(3)))
    config = CurateConfig(sources=[SourceConfig(uri=str(tmp_path / "a.jsonl"))], steps=["normalize", "near_dedup"])
    result = run_curation(config, LocalStore(tmp_path / "store"), output_prefix="x/y", num_workers=1, progress=False)
    published = result.stats["near_dedup"]
    bands, rows_per_band = config.near_dedup.banding()
    assert (published["bands"], published["rows_per_band"]) == (bands, rows_per_band)
    assert published["s_curve"] == rows
    note = {r["stage"]: r["note"] for r in result.stats["funnel"]}["near_dedup"]
    assert f"{bands}x{rows_per_band}" in note and "J=0.8" in note
