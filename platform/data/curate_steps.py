"""Per-shard work of the curation pipeline: segments, prepared state, steps and global decisions.

* ``split_segments`` cuts the step list at the global steps (exact dedup, near dedup,
  perplexity); ``run_shard_segment`` takes one shard through one segment: it applies the
  previous global step's decision, runs the local steps (normalise, domain, quality, PII),
  computes the next global step's keys and commits ``_shards/<shard_id>/seg<j>``.
* ``resolve_global`` turns every shard's keys into per-shard decisions (smallest id kept
  per duplicate group, corpus-wide percentile cuts); the driver in ``curate.py`` calls it
  between segments.
* ``prepare_state`` trains the driver-side models (domain classifier, perplexity LM) once
  and commits them under ``_state/<step>``; workers load them with ``_load_state``.

Fault injection for resumability tests: with ``MOEFLOW_CURATE_FAIL_AFTER=N`` a shard task
raises once N shard artefacts of this output are committed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .curate_config import GLOBAL_STEPS, CurateConfig, CurationError
from .domain import DomainClassifier, DomainConfig, domain_batch, load_seed_examples, train_domain_classifier
from .filters import quality_batch
from .normalize import normalize_batch, normalize_text
from .perplexity import CharNgramLM, bucket_of, bucket_thresholds
from .pii import pii_batch
from .schema import BatchResult, Document, Excluded, QuarantineRecord
from .sources import ShardSpec, SourceConfig, iter_shard, plan_shards

FAULT_ENV = "MOEFLOW_CURATE_FAIL_AFTER"


# ---------------------------------------------------------------- segments
def split_segments(steps: list[str]) -> tuple[list[list[str]], list[str]]:
    """Local steps of each segment, and the global step that ends each segment but the last."""
    segments: list[list[str]] = [[]]
    barriers: list[str] = []
    for step in steps:
        if step in GLOBAL_STEPS:
            barriers.append(step)
            segments.append([])
        else:
            segments[-1].append(step)
    return segments, barriers


def shard_prefix(output_prefix: str, shard_id: str, segment: int) -> str:
    return f"{output_prefix}/_shards/{shard_id}/seg{segment}"


# ---------------------------------------------------------------- prepared state (driver)
def _reference_texts(config: CurateConfig, shards: list[ShardSpec]) -> list[str]:
    """Perplexity reference: the first docs of the corpus in plan order, normalised (or a file)."""
    ppl = config.perplexity
    if ppl.reference == "seed":
        return [t for t, _ in load_seed_examples()]
    if ppl.reference != "corpus":
        texts: list[str] = []  # a file, directory, glob or store URI of reference text
        for unit_shard in plan_shards([SourceConfig(uri=ppl.reference)], 1 << 30, 1 << 30):
            texts += [d.text for d in iter_shard(unit_shard, config.max_doc_bytes) if isinstance(d, Document)]
        return texts
    texts, num_chars = [], 0
    for shard in shards:
        for item in iter_shard(shard, config.max_doc_bytes):
            if not isinstance(item, Document):
                continue
            text, _ = normalize_text(item.text, config.normalize.form)
            if not text.strip():
                continue
            texts.append(text[: ppl.reference_max_chars - num_chars])
            num_chars += len(texts[-1])
            if len(texts) >= ppl.reference_docs or num_chars >= ppl.reference_max_chars:
                return texts
    return texts


def _describe_sources(config: CurateConfig) -> str:
    return ", ".join(repr(src.uri) for src in config.sources)


def quarantine_counts(quarantine: list[QuarantineRecord]) -> tuple[dict[str, int], dict[str, int]]:
    """(entries by reason, what the entries that stand for more or less than one record lost).

    A truncated file's rest or an unreadable Parquet file is one entry that stands for an
    unknown (``records_unknown``) or known (``records``) number of records; ``bytes`` sums the
    known byte counts of those entries. The funnel counts entries; ``lost`` says what they hide.
    """
    lost = {"entries": 0, "records": 0, "records_unknown": 0, "bytes": 0}
    for q in quarantine:
        if q.num_records == 1:
            continue
        lost["entries"] += 1
        if q.num_records is None:
            lost["records_unknown"] += 1
        else:
            lost["records"] += q.num_records
        lost["bytes"] += q.num_bytes or 0
    return dict(Counter(q.reason for q in quarantine)), lost


def _lm_to_npz(lm: CharNgramLM) -> bytes:
    arrays: dict[str, np.ndarray] = {"order": np.array(lm.order), "vocab_size": np.array(lm.vocab_size)}
    for k, t in enumerate(lm.tables, start=1):
        for name in ("gram_keys_U", "gram_counts_U", "ctx_keys_U", "ctx_totals_U", "ctx_types_U"):
            arrays[f"{k}.{name}"] = getattr(t, name)
        arrays[f"{k}.discount"] = np.array(t.discount)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _lm_from_npz(data: bytes) -> CharNgramLM:
    from .perplexity import _OrderTable

    z = np.load(io.BytesIO(data), allow_pickle=False)
    lm = CharNgramLM(int(z["order"]))
    lm.vocab_size = int(z["vocab_size"])
    lm.tables = [
        _OrderTable(*(z[f"{k}.{n}"] for n in ("gram_keys_U", "gram_counts_U", "ctx_keys_U", "ctx_totals_U", "ctx_types_U")),
                    float(z[f"{k}.discount"]))
        for k in range(1, lm.order + 1)
    ]
    return lm


def _clf_to_npz(clf: DomainClassifier) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, weights_DC=clf.weights_DC, bias_C=clf.bias_C, labels=np.array(clf.labels))
    return buf.getvalue()


def _clf_from_npz(data: bytes, cfg: DomainConfig) -> DomainClassifier:
    z = np.load(io.BytesIO(data), allow_pickle=False)
    return DomainClassifier(z["weights_DC"], z["bias_C"], tuple(str(l) for l in z["labels"]), cfg)


def prepare_state(config: CurateConfig, store, output_prefix: str, shards: list[ShardSpec]) -> dict[str, str]:
    """Train the driver-side models once and commit them; returns {step: state artefact prefix}."""
    refs: dict[str, str] = {}
    meta = {"config_hash": config.config_hash()}
    if "domain" in config.steps:
        prefix = f"{output_prefix}/_state/domain"
        if not store.artifact_exists(prefix):
            clf = train_domain_classifier(load_seed_examples(), config.domain)
            with store.write_artifact(prefix, metadata=meta, overwrite=True) as w:
                w.put_bytes("model.npz", _clf_to_npz(clf))
        refs["domain"] = prefix
    if "perplexity" in config.steps:
        prefix = f"{output_prefix}/_state/perplexity"
        if not store.artifact_exists(prefix):
            texts = _reference_texts(config, shards)
            if not texts and config.perplexity.reference == "corpus":
                raise CurationError(f"no input documents: the sources gave no readable, non-empty text "
                                    f"({_describe_sources(config)}); nothing to curate")
            if not texts:
                raise CurationError(f"perplexity reference {config.perplexity.reference!r} has no text to train on")
            lm = CharNgramLM(config.perplexity.order).fit(texts)
            with store.write_artifact(prefix, metadata={**meta, "reference_docs": len(texts)}, overwrite=True) as w:
                w.put_bytes("lm.npz", _lm_to_npz(lm))
        refs["perplexity"] = prefix
    return refs


def _load_state(store, refs: dict[str, str], steps: list[str], config: CurateConfig) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if "domain" in steps and "domain" in refs:
        state["domain"] = _clf_from_npz(store.read_artifact(refs["domain"]).get_bytes("model.npz"), config.domain)
    if "perplexity" in steps and "perplexity" in refs:
        state["perplexity"] = _lm_from_npz(store.read_artifact(refs["perplexity"]).get_bytes("lm.npz"))
    return state


# ---------------------------------------------------------------- step functions (workers)
def run_local_step(step: str, docs: list[Document], config: CurateConfig, state: dict[str, Any]) -> BatchResult:
    if step == "normalize":
        return normalize_batch(docs, config.normalize)
    if step == "domain":
        return domain_batch(docs, state["domain"], config.domain)
    if step == "quality":
        return quality_batch(docs, config.quality)
    if step == "pii":
        return pii_batch(docs, config.pii)
    raise CurationError(f"{step!r} is not a local step")


def compute_keys(step: str, docs: list[Document], config: CurateConfig, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-document keys a global step resolves across all shards (aligned with ``docs``)."""
    ids = np.array([d.id for d in docs], dtype=str)
    if step == "exact_dedup":
        digests = [hashlib.sha256(d.text.encode("utf-8", "surrogatepass")).digest()[:16] for d in docs]
        return {"ids": ids, "keys": np.array(digests, dtype="S16")}
    if step == "near_dedup":
        from .minhash import compute_signatures

        nd = config.near_dedup
        bands, rows = nd.banding()
        num_perm = bands * rows
        sigs = compute_signatures([d.text for d in docs], num_perm=num_perm, ngram=nd.ngram, seed=nd.seed)
        return {"ids": ids, "keys": sigs.reshape(len(docs), num_perm)}
    if step == "perplexity":
        lm: CharNgramLM = state["perplexity"]
        scores = [lm.perplexity(d.text, config.perplexity.max_score_chars) for d in docs]
        return {"ids": ids, "keys": np.array(scores, dtype=np.float64)}
    raise CurationError(f"{step!r} is not a global step")


def apply_decision(step: str, docs: list[Document], keys: dict[str, np.ndarray], decision: dict, config: CurateConfig) -> BatchResult:
    out = BatchResult(kept=[])
    if step in ("exact_dedup", "near_dedup"):
        drop: dict[str, str] = decision["drop"]
        earlier = set(decision.get("earlier", ()))  # matched a document of an earlier dataset's index
        rule = "exact_duplicate" if step == "exact_dedup" else "near_duplicate"
        for doc in docs:
            keeper = drop.get(doc.id)
            if keeper is None:
                out.kept.append(doc)
            elif doc.id in earlier:
                detail = f"near duplicate of {keeper} in {config.near_dedup.against_index}"
                out.excluded.append(Excluded(doc, step, "near_duplicate_earlier", detail, duplicate_of=keeper))
            else:
                out.excluded.append(Excluded(doc, step, rule, f"duplicate of {keeper}", duplicate_of=keeper))
        out.counters = {"clusters": decision.get("num_clusters", 0)}
        return out
    if step == "perplexity":
        thresholds = tuple(decision["thresholds"])
        score_of = dict(zip(keys["ids"].tolist(), keys["keys"].tolist()))
        counts: Counter = Counter()
        for doc in docs:
            score = score_of[doc.id]
            bucket = bucket_of(score, thresholds)
            counts[f"bucket.{bucket}"] += 1
            doc = Document(doc.id, doc.text, doc.source, {**doc.metadata, "perplexity": round(score, 3), "ppl_bucket": bucket})
            if bucket in config.perplexity.drop_buckets:
                out.excluded.append(Excluded(doc, step, f"bucket_{bucket}", f"perplexity {score:.1f} in the {bucket}"))
            else:
                out.kept.append(doc)
        out.counters = {**counts, "cut_head": thresholds[0], "cut_tail": thresholds[1]}
        return out
    raise CurationError(f"{step!r} is not a global step")


# ---------------------------------------------------------------- global resolution (driver)
def resolve_global(step: str, keys_by_shard: dict[str, dict[str, np.ndarray]], config: CurateConfig) -> dict[str, dict]:
    """Per-shard decisions of a global step from every shard's keys; independent of shard order."""
    shard_ids = sorted(keys_by_shard)
    if step == "exact_dedup":
        keeper: dict[bytes, str] = {}
        for sid in shard_ids:
            for doc_id, key in zip(keys_by_shard[sid]["ids"].tolist(), keys_by_shard[sid]["keys"].tolist()):
                if key not in keeper or doc_id < keeper[key]:
                    keeper[key] = doc_id
        groups = Counter(keeper[k] for sid in shard_ids for k in keys_by_shard[sid]["keys"].tolist())
        num_clusters = sum(1 for n in groups.values() if n > 1)
        out = {}
        for sid in shard_ids:
            ks = keys_by_shard[sid]
            drop = {d: keeper[k] for d, k in zip(ks["ids"].tolist(), ks["keys"].tolist()) if keeper[k] != d}
            out[sid] = {"drop": drop, "num_clusters": num_clusters}
        return out
    if step == "near_dedup":
        return _resolve_near_dedup(shard_ids, keys_by_shard, config)
    if step == "perplexity":
        scores = np.concatenate([keys_by_shard[sid]["keys"] for sid in shard_ids]) if shard_ids else np.zeros(0)
        thresholds = bucket_thresholds(scores, tuple(config.perplexity.percentiles))
        return {sid: {"thresholds": list(thresholds)} for sid in shard_ids}
    raise CurationError(f"{step!r} is not a global step")


def _resolve_near_dedup(shard_ids: list[str], keys_by_shard, config: CurateConfig) -> dict[str, dict]:
    """Near-dedup decisions, one shard's signatures in memory at a time (``lsh_sharded``):
    ``keys_by_shard`` may load each shard's keys when it is indexed (``curate._StoreKeys``)."""
    from . import lsh_sharded

    nd = config.near_dedup
    bands, rows = nd.banding()
    verify = nd.verify_threshold
    index = load_minhash_index(nd.against_index, config) if nd.against_index else None
    earlier: dict[str, str] = {}

    def load(i: int):
        keys = keys_by_shard[shard_ids[i]]
        ids = keys["ids"].tolist()
        if index is not None and ids:
            # a document that near-duplicates an earlier dataset goes, whatever its cluster
            for doc_id, matches in zip(ids, index.query(keys["keys"], threshold=verify)):
                if matches:
                    earlier[doc_id] = matches[0]
        return ids, keys["keys"]

    clusters = lsh_sharded.sharded_clusters(load, len(shard_ids), bands, rows, verify)
    drop_all = {d: min(c) for c in clusters for d in c if d != min(c)}
    drop_all.update(earlier)
    out = {}
    for sid in shard_ids:
        mine = [d for d in keys_by_shard[sid]["ids"].tolist() if d in drop_all]
        out[sid] = {"drop": {d: drop_all[d] for d in mine}, "earlier": sorted(set(earlier).intersection(mine)),
                    "num_clusters": len(clusters)}
    return out


def load_minhash_index(path_or_uri: str, config: CurateConfig):
    """A MinHashIndex from a local path or a store URI; its parameters must match the config."""
    import tempfile
    from pathlib import Path

    from .lsh import MinHashIndex

    nd = config.near_dedup
    bands, rows = nd.banding()
    params = {"num_bands": bands, "rows_per_band": rows, "ngram": nd.ngram, "seed": nd.seed}
    if "://" not in path_or_uri:
        return MinHashIndex.load(path_or_uri, **params)
    from moeflow.platform.store import store_for_uri

    store, key = store_for_uri(path_or_uri)
    with tempfile.TemporaryDirectory(prefix="moeflow-index-") as tmp:
        local = store.get_file(key, Path(tmp) / "index.npz")
        return MinHashIndex.load(local, **params)


# ---------------------------------------------------------------- per-shard stats
def _doc_bytes(doc: Document) -> int:
    return len(doc.text.encode("utf-8", "surrogatepass"))


class _ShardStats:
    """Counts of one shard-segment; merged across shards by the driver."""

    def __init__(self, samples_per_rule: int, sample_chars: int):
        self.steps: dict[str, dict] = {}
        self.samples: dict[str, list[dict]] = defaultdict(list)  # "step/rule" -> records
        self.samples_per_rule = samples_per_rule
        self.sample_chars = sample_chars
        self.timings: dict[str, float] = {}

    def record(self, step: str, docs_in: list[Document], result: BatchResult, seconds: float) -> None:
        excluded = Counter(e.rule for e in result.excluded)
        excluded_bytes: Counter = Counter()
        for e in result.excluded:
            excluded_bytes[e.rule] += _doc_bytes(e.doc)
            self._sample(e)
        self.steps[step] = {
            "docs_in": len(docs_in),
            "bytes_in": sum(map(_doc_bytes, docs_in)),
            "docs_out": len(result.kept),
            "bytes_out": sum(map(_doc_bytes, result.kept)),
            "excluded": dict(excluded),
            "excluded_bytes": dict(excluded_bytes),
            "counters": dict(result.counters),
        }
        self.timings[step] = self.timings.get(step, 0.0) + seconds

    def _sample(self, e: Excluded) -> None:
        bucket = self.samples[f"{e.step}/{e.rule}"]
        rec = {
            "id": e.doc.id, "step": e.step, "rule": e.rule, "detail": e.detail, "duplicate_of": e.duplicate_of,
            "source": e.doc.source, "source_uri": e.doc.metadata.get("source_uri"),
            "position": e.doc.metadata.get("position"), "text": e.doc.text[: self.sample_chars],
        }
        bucket.append(rec)
        if len(bucket) > 2 * self.samples_per_rule:  # keep the smallest ids: order-independent
            bucket.sort(key=lambda r: r["id"])
            del bucket[self.samples_per_rule :]

    def sample_records(self) -> list[dict]:
        out = []
        for key in sorted(self.samples):
            out += sorted(self.samples[key], key=lambda r: r["id"])[: self.samples_per_rule]
        return out


# ---------------------------------------------------------------- the shard task
@dataclass
class ShardTask:
    shard: ShardSpec
    segment: int
    config_json: str
    store: Any
    output_prefix: str
    state_refs: dict[str, str]
    decision: dict | None  # of the global step before this segment


def _docs_to_parquet(docs: list[Document]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": pa.array([d.id for d in docs], pa.string()),
        "text": pa.array([d.text for d in docs], pa.string()),
        "source": pa.array([d.source for d in docs], pa.string()),
        "metadata": pa.array([json.dumps(d.metadata, sort_keys=True, ensure_ascii=False) for d in docs], pa.string()),
        "domain": pa.array([str(d.metadata.get("domain", "")) for d in docs], pa.string()),
        "ppl_bucket": pa.array([str(d.metadata.get("ppl_bucket", "")) for d in docs], pa.string()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _docs_from_parquet(data: bytes) -> list[Document]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data), columns=["id", "text", "source", "metadata"])
    cols = table.to_pydict()
    return [Document(i, t, s, json.loads(m)) for i, t, s, m in zip(cols["id"], cols["text"], cols["source"], cols["metadata"])]


def _keys_to_npz(keys: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **keys)
    return buf.getvalue()


def _keys_from_npz(data: bytes) -> dict[str, np.ndarray]:
    z = np.load(io.BytesIO(data), allow_pickle=False)
    return {k: z[k] for k in z.files}


def _maybe_inject_fault(store, output_prefix: str) -> None:
    limit = os.environ.get(FAULT_ENV)
    if not limit:
        return
    done = [k for k in store.list(f"{output_prefix}/_shards") if k.endswith("/MANIFEST.json")]
    if len(done) >= int(limit):
        raise CurationError(f"injected fault ({FAULT_ENV}={limit}): {len(done)} shard artefacts committed")


def run_shard_segment(task: ShardTask) -> dict:
    """One shard through one segment; commits ``_shards/<id>/seg<j>``. Returns small stats."""
    config = CurateConfig.model_validate_json(task.config_json)
    store = task.store
    _maybe_inject_fault(store, task.output_prefix)
    segments, barriers = split_segments(config.steps)
    j = task.segment
    stats = _ShardStats(config.excluded_samples_per_rule, config.sample_chars)
    quarantine: list[QuarantineRecord] = []
    input_counts = {"docs": 0, "bytes": 0}

    t0 = time.perf_counter()
    if j == 0:
        docs = []
        for item in iter_shard(task.shard, config.max_doc_bytes):
            if isinstance(item, QuarantineRecord):
                quarantine.append(item)
            else:
                docs.append(item)
        input_counts = {"docs": len(docs), "bytes": sum(map(_doc_bytes, docs))}
        stats.timings["read"] = time.perf_counter() - t0
    else:
        prev = store.read_artifact(shard_prefix(task.output_prefix, task.shard.shard_id, j - 1))
        docs = _docs_from_parquet(prev.get_bytes("docs.parquet"))
        prev_keys = _keys_from_npz(prev.get_bytes("keys.npz"))
        step = barriers[j - 1]
        t0 = time.perf_counter()
        result = apply_decision(step, docs, prev_keys, task.decision or {}, config)
        stats.record(step, docs, result, time.perf_counter() - t0)
        docs = result.kept

    state = _load_state(store, task.state_refs, segments[j] + barriers[j : j + 1], config)
    for step in segments[j]:
        t0 = time.perf_counter()
        result = run_local_step(step, docs, config, state)
        stats.record(step, docs, result, time.perf_counter() - t0)
        docs = result.kept

    keys = None
    if j < len(barriers):
        t0 = time.perf_counter()
        keys = compute_keys(barriers[j], docs, config, state)
        stats.timings[f"{barriers[j]}.keys"] = time.perf_counter() - t0

    by_reason, lost = quarantine_counts(quarantine)
    shard_stats = {
        "shard_id": task.shard.shard_id, "segment": j, "input": input_counts, "steps": stats.steps,
        "quarantined": by_reason, "lost": lost,
    }
    meta = {"config_hash": config.config_hash(), "shard_id": task.shard.shard_id, "segment": j}
    with store.write_artifact(shard_prefix(task.output_prefix, task.shard.shard_id, j), metadata=meta, overwrite=True) as w:
        w.put_bytes("docs.parquet", _docs_to_parquet(docs))
        if keys is not None:
            w.put_bytes("keys.npz", _keys_to_npz(keys))
        w.put_json("stats.json", shard_stats)
        w.put_bytes("samples.jsonl", _jsonl(stats.sample_records()))
        if j == 0:
            w.put_bytes("quarantine.jsonl", _jsonl([q.to_dict() for q in quarantine]))
    return {"timings": stats.timings}


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode()
