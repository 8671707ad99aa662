"""Pure pieces of the curation pipeline: segment splitting, global resolution, decisions."""

from __future__ import annotations

import numpy as np

from moeflow.platform.data.curate import (
    CurateConfig,
    _reference_texts,
    apply_decision,
    check_funnel,
    resolve_global,
    split_segments,
)
from moeflow.platform.data.schema import Document


def test_split_segments_table():
    assert split_segments(["normalize", "exact_dedup", "domain", "quality", "near_dedup", "perplexity", "pii"]) == (
        [["normalize"], ["domain", "quality"], [], ["pii"]], ["exact_dedup", "near_dedup", "perplexity"])
    assert split_segments(["exact_dedup"]) == ([[], []], ["exact_dedup"])
    assert split_segments(["pii", "normalize"]) == ([["pii", "normalize"]], [])


def _keys(ids, keys):
    return {"ids": np.array(ids, dtype=str), "keys": np.array(keys, dtype="S16")}


def test_exact_dedup_keeps_smallest_id_whatever_the_shard_order():
    keys = {"s1": _keys(["c", "a"], [b"h1", b"h2"]), "s0": _keys(["b", "d", "e"], [b"h1", b"h2", b"h3"])}
    decision = resolve_global("exact_dedup", keys, CurateConfig())
    assert decision["s0"]["drop"] == {"d": "a"} and decision["s1"]["drop"] == {"c": "b"}
    reordered = resolve_global("exact_dedup", dict(reversed(list(keys.items()))), CurateConfig())
    assert reordered == decision


def test_perplexity_decision_and_drop_policy():
    scores = {"s0": {"ids": np.array(["a", "b"]), "keys": np.array([1.0, 9.0])},
              "s1": {"ids": np.array(["c", "d", "e"]), "keys": np.array([5.0, 3.0, 7.0])}}
    config = CurateConfig(perplexity={"drop_buckets": ["tail"], "percentiles": (40, 80)})
    decision = resolve_global("perplexity", scores, config)
    assert decision["s0"]["thresholds"] == [3.0, 7.0]
    docs = [Document("a", "x", "s", {}), Document("b", "y", "s", {})]
    out = apply_decision("perplexity", docs, scores["s0"], decision["s0"], config)
    assert [d.metadata["ppl_bucket"] for d in out.kept] == ["head"]
    assert [(e.doc.id, e.rule) for e in out.excluded] == [("b", "bucket_tail")]


def test_reference_from_seed_and_from_a_file(tmp_path):
    assert len(_reference_texts(CurateConfig(perplexity={"reference": "seed"}), [])) > 100
    ref = tmp_path / "ref.txt"
    ref.write_text("reference text for the language model\n")
    assert _reference_texts(CurateConfig(perplexity={"reference": str(ref)}), []) == [ref.read_text()]


def test_check_funnel_catches_lost_documents():
    stats = {"input": {"records": 10, "docs": 9}, "quarantined": {"total": 1},
             "steps": [{"step": "normalize", "docs_in": 9, "docs_out": 7, "excluded_docs": 2}],
             "output": {"docs": 7}}
    check_funnel(stats)
    stats["output"]["docs"] = 6
    try:
        check_funnel(stats)
    except RuntimeError as exc:
        assert "funnel broken" in str(exc)
    else:
        raise AssertionError("a lost document must break the funnel check")
