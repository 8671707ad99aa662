"""The curation pipeline: sources -> shards -> steps -> one atomic curated artefact.

``run_curation(config, store, output_prefix=..., num_workers=...)`` is the library entry
point the ``curate`` task calls. How it stays deterministic and resumable:

* **Shards.** ``sources.plan_shards`` cuts the inputs into shards that depend only on the
  config. Every shard's work is a pure function of (shard, config, prepared state,
  decision), so the result is the same for any worker count and any processing order.
* **Steps.** The config's ``steps`` list is split at the *global* steps (exact dedup,
  near dedup, perplexity) into segments. A segment task reads the shard (or the previous
  segment's output), applies the previous global step's decision, runs the *local* steps
  (normalise, domain, quality, PII), and computes the keys of the next global step
  (content hashes, MinHash signatures, perplexities). Then the driver resolves the keys
  of all shards at once (smallest id kept per duplicate group, corpus-wide percentile
  cuts), and the next segment applies that decision. Default order: cheapest first.
* **Commits.** Every (shard, segment) output is an atomic store artefact under
  ``<output_prefix>/_shards/<shard_id>/seg<j>``; the driver's trained models (domain
  classifier, perplexity LM) under ``<output_prefix>/_state/<step>``. A re-run with the
  same config skips committed work and recomputes decisions from committed keys (cheap
  and deterministic). The final artefact at ``output_prefix`` is committed last.
* **Cross-dataset dedup.** Near dedup saves a ``minhash_index.npz`` of the documents it
  kept into the artefact; a later run with ``near_dedup.against_index`` set to that file's
  URI drops its documents that near-duplicate the earlier dataset (rule
  ``near_duplicate_earlier``, ``duplicate_of`` naming the earlier id).
* **Funnel.** Every document read is either kept, excluded by exactly one step/rule, or
  quarantined by the reader: ``input = kept + sum(excluded) + quarantined`` is checked
  before the artefact is committed. Timings are returned, not stored, so the artefact's
  content hash does not depend on the machine.

Fault injection for resumability tests: with ``MOEFLOW_CURATE_FAIL_AFTER=N`` a shard task
raises once N shard artefacts of this output are committed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, field_validator

from .domain import DomainClassifier, DomainConfig, domain_batch, load_seed_examples, train_domain_classifier
from .filters import QualityConfig, quality_batch
from .normalize import NormalizeConfig, normalize_batch, normalize_text
from .perplexity import CharNgramLM, PerplexityConfig, bucket_of, bucket_thresholds
from .pii import PIIConfig, pii_batch
from .schema import BatchResult, Document, Excluded, QuarantineRecord
from .sources import STDLIB, ShardSpec, SourceConfig, iter_shard, plan_shards

LOCAL_STEPS = ("normalize", "domain", "quality", "pii")
GLOBAL_STEPS = ("exact_dedup", "near_dedup", "perplexity")
DEFAULT_STEPS = ["normalize", "exact_dedup", "domain", "quality", "near_dedup", "perplexity", "pii"]
FAULT_ENV = "MOEFLOW_CURATE_FAIL_AFTER"
FORMAT_VERSION = 1


class CurationError(RuntimeError):
    pass


class NearDedupConfig(BaseModel):
    threshold: float = 0.8
    num_bands: int = 14
    rows_per_band: int = 8
    ngram: int = 5
    seed: int = 0
    verify_margin: float | None = Field(0.05, description="verify candidates at threshold - margin; None: banding only")
    against_index: str | None = Field(
        None, description="MinHashIndex .npz of an earlier dataset (path or file:// / s3:// URI, e.g. "
        "<earlier curated artefact URI>/minhash_index.npz): documents near-duplicating it are dropped")
    save_index: bool = Field(True, description="write minhash_index.npz (docs kept by near dedup) into the artefact")


class CurateConfig(BaseModel):
    """Recipe of the curate stage; ``CurateConfig.preset("tiny")`` runs in seconds on CPU."""

    name: str = "tiny"
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(uri=STDLIB, max_files=120, include_tests=False)]
    )
    steps: list[str] = Field(default_factory=lambda: list(DEFAULT_STEPS))
    files_per_shard: int = Field(32, ge=1)
    records_per_shard: int = Field(5000, ge=1)
    max_doc_bytes: int = Field(8 << 20, ge=1, description="larger records are quarantined unread")
    excluded_samples_per_rule: int = Field(20, ge=0)
    sample_chars: int = Field(2000, ge=0, description="text kept per excluded sample")
    cleanup_shards: bool = Field(False, description="delete _shards/ and _state/ after the final commit")
    normalize: NormalizeConfig = NormalizeConfig()
    quality: QualityConfig = QualityConfig()
    near_dedup: NearDedupConfig = NearDedupConfig()
    perplexity: PerplexityConfig = PerplexityConfig()
    domain: DomainConfig = DomainConfig()
    pii: PIIConfig = PIIConfig()

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: list[str]) -> list[str]:
        known = LOCAL_STEPS + GLOBAL_STEPS
        unknown = [s for s in steps if s not in known]
        if unknown:
            raise ValueError(f"unknown curation step(s) {unknown}; known: {list(known)}")
        if len(set(steps)) != len(steps):
            raise ValueError(f"curation steps must not repeat: {steps}")
        return steps

    def config_hash(self) -> str:
        """Hash of everything that changes the output (cleanup_shards does not)."""
        data = self.model_dump(mode="json", exclude={"cleanup_shards"})
        blob = json.dumps({"config": data, "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "CurateConfig":
        presets: dict[str, dict] = {
            "tiny": {},
            # the whole standard library, test packages included (the benchmark corpus)
            "stdlib": {"name": "stdlib", "sources": [SourceConfig(uri=STDLIB, include_tests=True)]},
        }
        if name not in presets:
            raise ValueError(f"unknown curate preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


@dataclass
class CurationResult:
    uri: str
    content_hash: str
    config_hash: str
    stats: dict
    num_docs_in: int
    num_docs_out: int
    num_excluded: int
    num_quarantined: int
    num_shards: int
    num_tasks_run: int = 0
    num_tasks_skipped: int = 0
    reused: bool = False  # the final artefact already existed
    timings: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0


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
        num_perm = nd.num_bands * nd.rows_per_band
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
        from .minhash import clusters_from_signatures

        nd = config.near_dedup
        ids = [d for sid in shard_ids for d in keys_by_shard[sid]["ids"].tolist()]
        sigs = [keys_by_shard[sid]["keys"] for sid in shard_ids if len(keys_by_shard[sid]["ids"])]
        all_sigs = np.concatenate(sigs) if sigs else np.zeros((0, nd.num_bands * nd.rows_per_band), np.uint64)
        verify = None if nd.verify_margin is None else nd.threshold - nd.verify_margin
        clusters = clusters_from_signatures(ids, all_sigs, nd.num_bands, nd.rows_per_band, threshold=verify) if ids else []
        drop_all = {d: min(c) for c in clusters for d in c if d != min(c)}
        earlier: set[str] = set()
        if nd.against_index and ids:
            # a document that near-duplicates an earlier dataset goes, whatever its cluster
            for doc_id, matches in zip(ids, load_minhash_index(nd.against_index, config).query(all_sigs, threshold=verify)):
                if matches:
                    drop_all[doc_id] = matches[0]
                    earlier.add(doc_id)
        out = {}
        for sid in shard_ids:
            mine = [d for d in keys_by_shard[sid]["ids"].tolist() if d in drop_all]
            out[sid] = {"drop": {d: drop_all[d] for d in mine}, "earlier": sorted(earlier.intersection(mine)),
                        "num_clusters": len(clusters)}
        return out
    if step == "perplexity":
        scores = np.concatenate([keys_by_shard[sid]["keys"] for sid in shard_ids]) if shard_ids else np.zeros(0)
        thresholds = bucket_thresholds(scores, tuple(config.perplexity.percentiles))
        return {sid: {"thresholds": list(thresholds)} for sid in shard_ids}
    raise CurationError(f"{step!r} is not a global step")


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

    shard_stats = {
        "shard_id": task.shard.shard_id, "segment": j, "input": input_counts, "steps": stats.steps,
        "quarantined": dict(Counter(q.reason for q in quarantine)),
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


def _read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


# ---------------------------------------------------------------- the driver
def _check_config(store, prefix: str, config_hash: str) -> None:
    found = store.read_artifact(prefix).metadata.get("config_hash")
    if found != config_hash:
        raise CurationError(
            f"{store.uri(prefix)} was written by config {found}, not {config_hash}: "
            "use a fresh output_prefix (normally the config hash is part of it)"
        )


def run_curation(
    config: CurateConfig,
    store,
    *,
    output_prefix: str,
    num_workers: int | None = None,
    progress: bool = True,
    shuffle_seed: int | None = None,
) -> CurationResult:
    """Curate ``config.sources`` into the artefact at ``output_prefix`` (see the module docstring).

    ``shuffle_seed`` processes the shards of each segment in a shuffled order (tests use it to
    show the output does not depend on the order).
    """
    from moeflow.platform.compute import parallel_map

    wall0 = time.perf_counter()
    config_hash = config.config_hash()
    output_prefix = output_prefix.strip("/")
    if store.artifact_exists(output_prefix):
        _check_config(store, output_prefix, config_hash)
        art = store.read_artifact(output_prefix)
        return _result(art, config_hash, art.get_json("stats.json"), reused=True, wall=time.perf_counter() - wall0)

    shards = plan_shards(config.sources, config.files_per_shard, config.records_per_shard)
    timings: Counter = Counter()
    t0 = time.perf_counter()
    state_refs = prepare_state(config, store, output_prefix, shards)
    timings["prepare"] += time.perf_counter() - t0
    segments, barriers = split_segments(config.steps)
    config_json = config.model_dump_json()
    decisions: dict[str, dict] = {}
    index = None  # MinHashIndex of the docs near dedup kept, saved with the artefact
    num_run = num_skipped = 0
    for j in range(len(segments)):
        todo = []
        for shard in shards:
            prefix = shard_prefix(output_prefix, shard.shard_id, j)
            if store.artifact_exists(prefix):
                _check_config(store, prefix, config_hash)
                num_skipped += 1
                continue
            todo.append(ShardTask(shard, j, config_json, store, output_prefix, state_refs, decisions.get(shard.shard_id)))
        if shuffle_seed is not None:
            random.Random(shuffle_seed * 1000 + j).shuffle(todo)
        for res in parallel_map(run_shard_segment, todo, num_workers, desc=f"curate segment {j}", progress=progress):
            timings.update(res["timings"])
        num_run += len(todo)
        if j < len(barriers):
            t0 = time.perf_counter()
            keys_by_shard = {
                s.shard_id: _keys_from_npz(store.read_artifact(shard_prefix(output_prefix, s.shard_id, j)).get_bytes("keys.npz"))
                for s in shards
            }
            decisions = resolve_global(barriers[j], keys_by_shard, config)
            if barriers[j] == "near_dedup" and config.near_dedup.save_index:
                dropped = {d for dec in decisions.values() for d in dec["drop"]}
                index = build_minhash_index(config, store, output_prefix, shards, j, dropped)
            timings[f"{barriers[j]}.resolve"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    art, stats = _assemble(config, store, output_prefix, shards, len(segments), index)
    timings["assemble"] += time.perf_counter() - t0
    if config.cleanup_shards:
        store.delete_prefix(f"{output_prefix}/_shards")
        store.delete_prefix(f"{output_prefix}/_state")
    result = _result(art, config_hash, stats, reused=False, wall=time.perf_counter() - wall0)
    result.num_tasks_run, result.num_tasks_skipped = num_run, num_skipped
    result.timings = {k: round(v, 4) for k, v in sorted(timings.items())}
    return result


def _result(art, config_hash: str, stats: dict, reused: bool, wall: float) -> CurationResult:
    return CurationResult(
        uri=art.uri,
        content_hash=art.content_hash,
        config_hash=config_hash,
        stats=stats,
        num_docs_in=stats["input"]["records"],
        num_docs_out=stats["output"]["docs"],
        num_excluded=sum(s["excluded_docs"] for s in stats["steps"]),
        num_quarantined=stats["quarantined"]["total"],
        num_shards=stats["num_shards"],
        reused=reused,
        wall_seconds=round(wall, 3),
    )


# counters that are corpus-wide values repeated in every shard, not per-shard sums
_GLOBAL_COUNTERS = ("clusters", "cut_head", "cut_tail")


def load_minhash_index(path_or_uri: str, config: CurateConfig):
    """A MinHashIndex from a local path or a store URI; its parameters must match the config."""
    import tempfile
    from pathlib import Path

    from .minhash import MinHashIndex

    nd = config.near_dedup
    params = {"num_bands": nd.num_bands, "rows_per_band": nd.rows_per_band, "ngram": nd.ngram, "seed": nd.seed}
    if "://" not in path_or_uri:
        return MinHashIndex.load(path_or_uri, **params)
    from moeflow.platform.store import store_for_uri

    store, key = store_for_uri(path_or_uri)
    with tempfile.TemporaryDirectory(prefix="moeflow-index-") as tmp:
        local = store.get_file(key, Path(tmp) / "index.npz")
        return MinHashIndex.load(local, **params)


def build_minhash_index(config: CurateConfig, store, output_prefix: str, shards: list[ShardSpec], segment: int, drop: set[str]):
    """Index of the documents near dedup kept (signatures from segment ``segment``'s keys)."""
    from .minhash import MinHashIndex

    nd = config.near_dedup
    index = MinHashIndex(nd.num_bands, nd.rows_per_band, ngram=nd.ngram, seed=nd.seed)
    for shard in shards:
        keys = _keys_from_npz(store.read_artifact(shard_prefix(output_prefix, shard.shard_id, segment)).get_bytes("keys.npz"))
        keep = np.array([d not in drop for d in keys["ids"].tolist()], dtype=bool)
        if keep.any():
            index.add(keys["ids"][keep].tolist(), keys["keys"][keep])
    return index


def _merge_step(into: dict, part: dict) -> None:
    for key in ("docs_in", "bytes_in", "docs_out", "bytes_out"):
        into[key] = into.get(key, 0) + part[key]
    for key in ("excluded", "excluded_bytes"):
        bucket = into.setdefault(key, {})
        for rule, n in part[key].items():
            bucket[rule] = bucket.get(rule, 0) + n
    counters = into.setdefault("counters", {})
    for name, value in part["counters"].items():
        counters[name] = value if name in _GLOBAL_COUNTERS else counters.get(name, 0) + value


def _assemble(config: CurateConfig, store, output_prefix: str, shards: list[ShardSpec], num_segments: int, index=None):
    """Merge shard outputs (plan order) into the final artefact; returns (artifact, stats)."""
    import pyarrow.parquet as pq

    steps: dict[str, dict] = {s: {} for s in config.steps}
    input_docs = input_bytes = 0
    quarantined: Counter = Counter()
    quarantine_records: list[dict] = []
    samples: dict[tuple[str, str], list[dict]] = defaultdict(list)
    out_docs = out_bytes = 0
    by_domain: Counter = Counter()
    by_bucket: Counter = Counter()
    meta = {"config_hash": config.config_hash(), "name": config.name, "steps": list(config.steps), "num_shards": len(shards)}
    with store.write_artifact(output_prefix, metadata=meta) as w:
        part_index = 0
        for shard in shards:
            for j in range(num_segments):
                art = store.read_artifact(shard_prefix(output_prefix, shard.shard_id, j))
                shard_stats = art.get_json("stats.json")
                for step, part in shard_stats["steps"].items():
                    _merge_step(steps[step], part)
                for rec in _read_jsonl(art.get_bytes("samples.jsonl")):
                    samples[(rec["step"], rec["rule"])].append(rec)
                if j == 0:
                    input_docs += shard_stats["input"]["docs"]
                    input_bytes += shard_stats["input"]["bytes"]
                    quarantined.update(shard_stats["quarantined"])
                    quarantine_records += _read_jsonl(art.get_bytes("quarantine.jsonl"))
                if j == num_segments - 1:
                    data = art.get_bytes("docs.parquet")
                    table = pq.read_table(io.BytesIO(data), columns=["text", "domain", "ppl_bucket"])
                    if table.num_rows == 0:
                        continue
                    cols = table.to_pydict()
                    out_docs += table.num_rows
                    out_bytes += sum(len(t.encode("utf-8", "surrogatepass")) for t in cols["text"])
                    by_domain.update(d for d in cols["domain"] if d)
                    by_bucket.update(b for b in cols["ppl_bucket"] if b)
                    # the shard's parquet already has the curated columns: reuse its bytes
                    w.put_bytes(f"part-{part_index:05d}.parquet", data)
                    part_index += 1
        step_list = []
        for step in config.steps:
            s = steps[step] or {"docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0, "excluded": {}, "excluded_bytes": {}, "counters": {}}
            s = {"step": step, **s, "excluded_docs": sum(s["excluded"].values())}
            s["excluded"] = dict(sorted(s["excluded"].items()))
            s["excluded_bytes"] = dict(sorted(s["excluded_bytes"].items()))
            s["counters"] = dict(sorted(s["counters"].items()))
            step_list.append(s)
        stats = {
            "name": config.name,
            "config_hash": config.config_hash(),
            "num_shards": len(shards),
            "input": {"records": input_docs + sum(quarantined.values()), "docs": input_docs, "bytes": input_bytes},
            "quarantined": {"total": sum(quarantined.values()), "by_reason": dict(sorted(quarantined.items()))},
            "steps": step_list,
            "output": {"docs": out_docs, "bytes": out_bytes, "parts": part_index,
                       "by_domain": dict(sorted(by_domain.items())), "by_ppl_bucket": dict(sorted(by_bucket.items()))},
        }
        stats["funnel"] = funnel_rows(stats)
        check_funnel(stats)
        w.put_json("stats.json", stats)
        w.put_json("config.json", config.model_dump(mode="json"))
        w.put_bytes("quarantine.jsonl", _jsonl(quarantine_records))
        by_step: dict[str, list[dict]] = defaultdict(list)
        for (step, _rule), recs in sorted(samples.items()):
            by_step[step] += sorted(recs, key=lambda r: r["id"])[: config.excluded_samples_per_rule]
        for step in config.steps:
            w.put_bytes(f"excluded/{step}.jsonl", _jsonl(by_step.get(step, [])))
        if index is not None:
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory(prefix="moeflow-index-") as tmp:
                w.put_file("minhash_index.npz", index.save(Path(tmp) / "minhash_index.npz"))
        w.metadata.update({"num_docs": out_docs, "num_bytes": out_bytes, "num_parts": part_index})
    return store.read_artifact(output_prefix), stats


def funnel_rows(stats: dict) -> list[dict]:
    """The funnel as table rows (stage, docs, bytes, removed) for MLflow / Prefect tables."""
    rows = [{"stage": "input", "docs": stats["input"]["records"], "bytes": stats["input"]["bytes"], "removed": 0}]
    docs = stats["input"]["records"] - stats["quarantined"]["total"]
    rows.append({"stage": "quarantine", "docs": docs, "bytes": stats["input"]["bytes"], "removed": stats["quarantined"]["total"]})
    for s in stats["steps"]:
        rows.append({"stage": s["step"], "docs": s["docs_out"], "bytes": s["bytes_out"], "removed": s["excluded_docs"]})
    return rows


def check_funnel(stats: dict) -> None:
    """input = kept + sum(excluded) + quarantined, and each step's in - out = its exclusions."""
    excluded = 0
    docs = stats["input"]["docs"]
    for s in stats["steps"]:
        if s["docs_in"] - s["docs_out"] != s["excluded_docs"] or s["docs_in"] != docs:
            raise CurationError(f"funnel broken at step {s['step']}: {s}")
        docs = s["docs_out"]
        excluded += s["excluded_docs"]
    total = stats["output"]["docs"] + excluded + stats["quarantined"]["total"]
    if total != stats["input"]["records"] or docs != stats["output"]["docs"]:
        raise CurationError(f"funnel broken: input {stats['input']['records']} != kept+excluded+quarantined {total}")
