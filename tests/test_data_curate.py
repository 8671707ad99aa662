"""End-to-end curation: funnel, planted duplicates and bad lines, determinism (1 worker vs
2 Ray workers, shuffled shard order), resumability after an injected fault, traceable ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeflow.platform.data.curate import FAULT_ENV, CurateConfig, CurationError, run_curation, shard_prefix
from moeflow.platform.data.documents import iter_artifact_documents
from moeflow.platform.data.domain import load_seed_examples
from moeflow.platform.data.schema import make_doc_id
from moeflow.platform.data.sources import SourceConfig, plan_shards, resolve_files
from moeflow.platform.store import LocalStore


def prose_docs() -> list[str]:
    sentences = [t for t, label in load_seed_examples() if label == "prose"]
    return [" ".join(sentences[i : i + 3]) + "\n" + " ".join(sentences[i + 3 : i + 6]) for i in range(0, 42, 6)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    docs = prose_docs()  # 7 distinct prose documents
    words = docs[2].split(" ")
    words[10] = "zebra"  # one word changed: 5-gram Jaccard ~0.9
    near = " ".join(words)
    docs[6] += "\nContact the author at someone.real@example.org for details."
    lines = [json.dumps({"text": t}) for t in docs]
    lines += [
        json.dumps({"text": docs[0]}),  # exact duplicate of line 1
        json.dumps({"text": near}),  # near duplicate of line 3
        '{"text": "unterminated',  # malformed
        json.dumps({"title": "no text"}),  # missing field
        json.dumps({"text": "   "}),  # empty after normalisation
    ]
    (root / "web.jsonl").write_text("\n".join(lines) + "\n")
    code = root / "code"
    code.mkdir()
    (code / "util.py").write_text("def double(x):\n    return 2 * x\n")
    (code / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    return {"root": root, "docs": docs, "near": near, "num_jsonl_lines": len(lines)}


def make_config(corpus) -> CurateConfig:
    return CurateConfig(
        name="test",
        sources=[
            SourceConfig(uri="python-stdlib", max_files=16, include_tests=False),
            SourceConfig(uri=str(corpus["root"] / "web.jsonl"), name="web"),
            SourceConfig(uri=str(corpus["root"] / "code"), name="code"),
        ],
        files_per_shard=6,
        records_per_shard=5,
        perplexity={"reference_docs": 10, "reference_max_chars": 60_000},
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> LocalStore:
    return LocalStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def baseline(corpus, store):
    return run_curation(make_config(corpus), store, output_prefix="datasets/test/curated/base", num_workers=1, progress=False)


def test_funnel_and_planted_problems(baseline, corpus, store):
    stats = baseline.stats
    num_in = 16 + corpus["num_jsonl_lines"] + 2
    assert baseline.num_docs_in == stats["input"]["records"] == num_in
    excluded = sum(s["excluded_docs"] for s in stats["steps"])
    assert baseline.num_docs_out + excluded + baseline.num_quarantined == num_in
    by_step = {s["step"]: s for s in stats["steps"]}
    assert [s["step"] for s in stats["steps"]] == CurateConfig().steps
    assert by_step["normalize"]["excluded"] == {"empty": 1}
    stdlib_texts = [Path(f[0]).read_text() for f in resolve_files(SourceConfig(uri="python-stdlib", max_files=16, include_tests=False))]
    stdlib_dups = len(stdlib_texts) - len(set(stdlib_texts))  # e.g. __phello__/__init__.py == spam.py
    assert by_step["exact_dedup"]["excluded"] == {"exact_duplicate": 1 + stdlib_dups}
    assert by_step["near_dedup"]["excluded"] == {"near_duplicate": 1}
    assert stats["quarantined"]["by_reason"] == {"binary": 1, "malformed_json": 1, "missing_text_field": 1}
    assert by_step["pii"]["counters"]["redacted.email"] >= 1
    assert sum(stats["output"]["by_ppl_bucket"].values()) == baseline.num_docs_out
    assert {"code", "prose"} <= set(stats["output"]["by_domain"])
    for s in stats["steps"]:
        assert s["docs_in"] - s["docs_out"] == s["excluded_docs"]

    art = store.read_artifact(baseline.uri)
    assert {"stats.json", "config.json", "quarantine.jsonl", "part-00000.parquet"} <= set(art.names())
    quarantine = [json.loads(l) for l in art.get_bytes("quarantine.jsonl").decode().splitlines()]
    assert sorted(q["reason"] for q in quarantine) == ["binary", "malformed_json", "missing_text_field"]
    assert any(q["location"].endswith("web.jsonl:10") for q in quarantine)
    dup = [json.loads(l) for l in art.get_bytes("excluded/exact_dedup.jsonl").decode().splitlines()]
    web_uri = (corpus["root"] / "web.jsonl").resolve().as_uri()
    dup = [d for d in dup if d["source_uri"] == web_uri]
    assert len(dup) == 1 and dup[0]["duplicate_of"] == min(make_doc_id(web_uri, 0, corpus["docs"][0]), make_doc_id(web_uri, 7, corpus["docs"][0]))
    near = [json.loads(l) for l in art.get_bytes("excluded/near_dedup.jsonl").decode().splitlines()]
    assert len(near) == 1 and near[0]["text"] in (corpus["near"], corpus["docs"][2])


def test_output_ids_trace_back_to_sources(baseline, corpus):
    docs = list(iter_artifact_documents(baseline.uri))
    assert len(docs) == baseline.num_docs_out and len({d.id for d in docs}) == len(docs)
    stdlib = {f[1]: f[0] for f in resolve_files(SourceConfig(uri="python-stdlib", max_files=16, include_tests=False))}
    web_lines = (corpus["root"] / "web.jsonl").read_text().splitlines()
    for doc in docs:
        uri, pos = doc.metadata["source_uri"], doc.metadata["position"]
        if uri in stdlib:
            original = Path(stdlib[uri]).read_bytes().decode("utf-8", "replace")
        elif uri.endswith("web.jsonl"):
            original = json.loads(web_lines[pos])["text"]
        else:
            original = (corpus["root"] / "code" / doc.metadata["path"]).read_text()
        assert doc.id == make_doc_id(uri, pos, original)
        assert doc.metadata["ppl_bucket"] in ("head", "middle", "tail") and doc.metadata["domain"]
    redacted = [d for d in docs if "<EMAIL>" in d.text]
    assert len(redacted) == 1 and "someone.real@example.org" not in redacted[0].text


def test_shard_order_does_not_change_the_output(baseline, corpus, store):
    shuffled = run_curation(make_config(corpus), store, output_prefix="datasets/test/curated/shuffled",
                            num_workers=1, progress=False, shuffle_seed=7)
    assert shuffled.content_hash == baseline.content_hash


def test_two_ray_workers_match_inline(baseline, corpus, store):
    pytest.importorskip("ray")
    on_ray = run_curation(make_config(corpus), store, output_prefix="datasets/test/curated/ray",
                          num_workers=2, progress=False, shuffle_seed=3)
    assert on_ray.content_hash == baseline.content_hash
    assert on_ray.stats == baseline.stats


def test_resume_after_a_kill_skips_committed_shards(baseline, corpus, store, monkeypatch):
    config = make_config(corpus)
    prefix = "datasets/test/curated/resume"
    monkeypatch.setenv(FAULT_ENV, "5")
    with pytest.raises(CurationError, match="injected fault"):
        run_curation(config, store, output_prefix=prefix, num_workers=1, progress=False)
    committed = [k for k in store.list(f"{prefix}/_shards") if k.endswith("MANIFEST.json")]
    assert len(committed) == 5 and not store.artifact_exists(prefix)
    monkeypatch.delenv(FAULT_ENV)
    resumed = run_curation(config, store, output_prefix=prefix, num_workers=1, progress=False)
    assert resumed.num_tasks_skipped == 5
    num_shards = len(plan_shards(config.sources, config.files_per_shard, config.records_per_shard))
    assert resumed.num_tasks_run + resumed.num_tasks_skipped == num_shards * 4  # 4 segments
    assert resumed.content_hash == baseline.content_hash
    again = run_curation(config, store, output_prefix=prefix, num_workers=1, progress=False)
    assert again.reused and again.content_hash == baseline.content_hash


def test_other_config_on_same_prefix_is_refused(baseline, corpus, store):
    other = make_config(corpus).model_copy(update={"max_doc_bytes": 12345})
    with pytest.raises(CurationError, match="written by config"):
        run_curation(other, store, output_prefix="datasets/test/curated/base", num_workers=1, progress=False)


def test_steps_are_reorderable_and_checked(corpus, store):
    config = make_config(corpus).model_copy(update={"steps": ["pii", "normalize", "quality", "exact_dedup"]})
    result = run_curation(config, store, output_prefix="datasets/test/curated/reordered", num_workers=1, progress=False)
    assert [s["step"] for s in result.stats["steps"]] == ["pii", "normalize", "quality", "exact_dedup"]
    assert result.num_docs_out + result.num_excluded + result.num_quarantined == result.num_docs_in
    first = store.read_artifact(shard_prefix("datasets/test/curated/reordered", result.stats and
                                            plan_shards(config.sources, 6, 5)[0].shard_id, 0))
    assert "keys.npz" in first.names()
    with pytest.raises(ValueError, match="unknown curation step"):
        CurateConfig(steps=["normalize", "translate"])
    with pytest.raises(ValueError, match="must not repeat"):
        CurateConfig(steps=["normalize", "normalize"])


def test_dedup_against_an_earlier_datasets_index(corpus, tmp_path):
    """Dataset A saves its MinHash index; dataset B, deduplicated against it, drops its near copy."""
    store = LocalStore(tmp_path / "store")
    docs = prose_docs()
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:4]))
    words = docs[1].split(" ")
    words[7] = "zebra"
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [" ".join(words), docs[5]]))
    steps = ["normalize", "near_dedup"]
    first = run_curation(CurateConfig(sources=[SourceConfig(uri=str(tmp_path / "a.jsonl"))], steps=steps),
                         store, output_prefix="datasets/a/curated/x", num_workers=1, progress=False)
    assert "minhash_index.npz" in store.read_artifact(first.uri).names()
    config = CurateConfig(sources=[SourceConfig(uri=str(tmp_path / "b.jsonl"))], steps=steps,
                          near_dedup={"against_index": first.uri + "/minhash_index.npz"})
    second = run_curation(config, store, output_prefix="datasets/b/curated/x", num_workers=1, progress=False)
    near = {s["step"]: s for s in second.stats["steps"]}["near_dedup"]
    assert near["excluded"] == {"near_duplicate_earlier": 1}
    kept = list(iter_artifact_documents(second.uri))
    assert [d.text for d in kept] == [docs[5]]
    excluded = json.loads(store.read_artifact(second.uri).get_bytes("excluded/near_dedup.jsonl").decode().splitlines()[0])
    a_ids = {d.id for d in iter_artifact_documents(first.uri)}
    assert excluded["duplicate_of"] in a_ids
