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
* **Inputs.** Every input file's fingerprint (``fingerprint.py``) is part of its shard ids and is
  recorded at ``<output_prefix>/_state/inputs`` when a run starts and in the final artefact
  (``inputs.json``, metadata ``inputs_fingerprint``); a run at a prefix begun or finished over
  other inputs is refused with the files that changed. ``default_output_prefix`` puts the
  fingerprint in the prefix, so an edited corpus gets a fresh output.
* **Near dedup at scale.** Its keys are streamed shard by shard through
  ``lsh_sharded.sharded_clusters`` (disk-backed): the driver never holds every signature.
* **Cross-dataset dedup.** Near dedup saves a ``minhash_index.npz`` of the documents it
  kept into the artefact; a later run with ``near_dedup.against_index`` set to that file's
  URI drops its documents that near-duplicate the earlier dataset (rule
  ``near_duplicate_earlier``, ``duplicate_of`` naming the earlier id).
* **Funnel.** Every document read is either kept, excluded by exactly one step/rule, or
  quarantined by the reader: ``input = kept + sum(excluded) + quarantined`` is checked
  before the artefact is committed. Timings are returned, not stored, so the artefact's
  content hash does not depend on the machine.

Layout: the config lives in ``curate_config.py``, the per-shard step execution and the
global-step decisions in ``curate_steps.py``; this module is the driver (``run_curation``,
resumability, the final assembly and its funnel). Fault injection for resumability tests
(``MOEFLOW_CURATE_FAIL_AFTER``) is described in ``curate_steps.py``. The names that moved
are re-exported here, so ``moeflow.platform.data.curate`` stays the one import path.
"""

from __future__ import annotations

import io
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

# What moved to curate_config / curate_steps is re-exported (see __all__): callers and tests
# keep importing from moeflow.platform.data.curate.
from .curate_config import (
    DEFAULT_STEPS,
    FORMAT_VERSION,
    GLOBAL_STEPS,
    LOCAL_STEPS,
    CurateConfig,
    CurationError,
    NearDedupConfig,
)
from .curate_steps import (
    FAULT_ENV,
    ShardTask,
    _jsonl,
    _keys_from_npz,
    _reference_texts,  # noqa: F401  (tests import it from here)
    apply_decision,
    compute_keys,
    load_minhash_index,
    prepare_state,
    resolve_global,
    run_local_step,
    run_shard_segment,
    shard_prefix,
    split_segments,
)
from .banding import s_curve_rows
from .fingerprint import changed_files, hash_versions, versions_of
from .sources import ShardSpec, inputs_fingerprint, plan_shards

__all__ = [
    "DEFAULT_STEPS", "FAULT_ENV", "FORMAT_VERSION", "GLOBAL_STEPS", "LOCAL_STEPS",
    "CurateConfig", "CurationError", "CurationResult", "NearDedupConfig", "ShardTask",
    "apply_decision", "build_minhash_index", "check_funnel", "compute_keys", "default_output_prefix",
    "funnel_rows", "inputs_cache_key",
    "load_minhash_index", "prepare_state", "resolve_global", "run_curation", "run_local_step",
    "run_shard_segment", "shard_prefix", "split_segments",
]

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
    inputs_fingerprint: str = ""  # fingerprint.hash_versions of every input file
    timings: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0


def _read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


# ---------------------------------------------------------------- inputs and prefixes
def default_output_prefix(config: CurateConfig) -> str:
    """``datasets/<name>/curated/<config hash>-<inputs fingerprint>``: a new prefix whenever the
    config or any input file changes, so a re-run over edited inputs never reuses old output."""
    return f"datasets/{config.name}/curated/{config.config_hash()[:12]}-{inputs_fingerprint(config.sources)[:8]}"


def inputs_cache_key(config: CurateConfig | dict) -> str:
    """The inputs' fingerprint for a cache key (the curate task adds it to its Prefect cache policy)."""
    return inputs_fingerprint(CurateConfig.model_validate(config).sources)


_INPUTS_KEY = "_state/inputs"


def _check_inputs(store, output_prefix: str, versions: dict[str, str]) -> None:
    """Refuse to continue an output begun (or finished) over other inputs; record them if new."""
    fingerprint = hash_versions(versions)
    for prefix, what in ((output_prefix, "was curated"), (f"{output_prefix}/{_INPUTS_KEY}", "was started")):
        if not store.artifact_exists(prefix):
            continue
        art = store.read_artifact(prefix)
        if art.metadata.get("inputs_fingerprint") == fingerprint:
            return
        old = art.get_json("inputs.json") if "inputs.json" in art.names() else {}
        changed = changed_files(old, versions)
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise CurationError(
            f"inputs changed since {store.uri(output_prefix)} {what} ({len(changed)} file(s): {shown}); "
            "its documents would mix old and new inputs: use a fresh output_prefix "
            "(default_output_prefix includes the inputs' fingerprint) or delete the old output")
    with store.write_artifact(f"{output_prefix}/{_INPUTS_KEY}", metadata={"inputs_fingerprint": fingerprint}) as w:
        w.put_json("inputs.json", versions)


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
    shards = plan_shards(config.sources, config.files_per_shard, config.records_per_shard)
    if not shards:
        raise CurationError(f"no input documents: the sources {[s.uri for s in config.sources]} hold no files")
    versions = versions_of(shards)
    if store.artifact_exists(output_prefix):
        _check_config(store, output_prefix, config_hash)
        _check_inputs(store, output_prefix, versions)
        art = store.read_artifact(output_prefix)
        return _result(art, config_hash, art.get_json("stats.json"), reused=True, wall=time.perf_counter() - wall0)
    _check_inputs(store, output_prefix, versions)
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
            keys_by_shard = _StoreKeys(store, output_prefix, shards, j)
            if barriers[j] != "near_dedup":  # small keys (16 or 8 bytes a document): read once
                keys_by_shard = {sid: keys_by_shard[sid] for sid in keys_by_shard}
            decisions = resolve_global(barriers[j], keys_by_shard, config)
            if barriers[j] == "near_dedup" and config.near_dedup.save_index:
                dropped = {d for dec in decisions.values() for d in dec["drop"]}
                index = build_minhash_index(config, store, output_prefix, shards, j, dropped)
            timings[f"{barriers[j]}.resolve"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    art, stats = _assemble(config, store, output_prefix, shards, len(segments), index, versions)
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
        inputs_fingerprint=art.metadata.get("inputs_fingerprint", ""),
        wall_seconds=round(wall, 3),
    )


class _StoreKeys(Mapping):
    """{shard id: keys} read from the store when indexed, so near dedup never holds them all."""

    def __init__(self, store, output_prefix: str, shards: list[ShardSpec], segment: int):
        self._store, self._prefix, self._segment = store, output_prefix, segment
        self._ids = [s.shard_id for s in shards]

    def __getitem__(self, shard_id: str) -> dict[str, np.ndarray]:
        art = self._store.read_artifact(shard_prefix(self._prefix, shard_id, self._segment))
        return _keys_from_npz(art.get_bytes("keys.npz"))

    def __iter__(self):
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def build_minhash_index(config: CurateConfig, store, output_prefix: str, shards: list[ShardSpec], segment: int, drop: set[str]):
    """Index of the documents near dedup kept (signatures from segment ``segment``'s keys)."""
    from .lsh import MinHashIndex

    nd = config.near_dedup
    index = MinHashIndex(*nd.banding(), ngram=nd.ngram, seed=nd.seed)
    ids, sigs = [], []
    for shard in shards:
        keys = _keys_from_npz(store.read_artifact(shard_prefix(output_prefix, shard.shard_id, segment)).get_bytes("keys.npz"))
        keep = np.array([d not in drop for d in keys["ids"].tolist()], dtype=bool)
        ids += keys["ids"][keep].tolist()
        sigs.append(keys["keys"][keep])
    if ids:  # one add: adding shard by shard re-concatenates (and re-checks) the whole index each time
        index.add(ids, np.concatenate(sigs))
    return index


# counters that are corpus-wide values repeated in every shard, not per-shard sums
_GLOBAL_COUNTERS = ("clusters", "cut_head", "cut_tail")


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


def _assemble(config: CurateConfig, store, output_prefix: str, shards: list[ShardSpec], num_segments: int,
              index=None, versions: dict[str, str] | None = None):
    """Merge shard outputs (plan order) into the final artefact; returns (artifact, stats)."""
    import pyarrow.parquet as pq

    steps: dict[str, dict] = {s: {} for s in config.steps}
    input_docs = input_bytes = 0
    quarantined: Counter = Counter()
    lost: Counter = Counter({"entries": 0, "records": 0, "records_unknown": 0, "bytes": 0})
    quarantine_records: list[dict] = []
    samples: dict[tuple[str, str], list[dict]] = defaultdict(list)
    out_docs = out_bytes = 0
    by_domain: Counter = Counter()
    by_bucket: Counter = Counter()
    versions = versions if versions is not None else versions_of(shards)
    meta = {"config_hash": config.config_hash(), "name": config.name, "steps": list(config.steps),
            "num_shards": len(shards), "inputs_fingerprint": hash_versions(versions)}
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
                    for key, n in shard_stats.get("lost", {}).items():
                        lost[key] += n
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
            "quarantined": {"total": sum(quarantined.values()), "by_reason": dict(sorted(quarantined.items())),
                            "lost": dict(sorted(lost.items()))},
            "steps": step_list,
            "output": {"docs": out_docs, "bytes": out_bytes, "parts": part_index,
                       "by_domain": dict(sorted(by_domain.items())), "by_ppl_bucket": dict(sorted(by_bucket.items()))},
        }
        if input_docs == 0:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(quarantined.items())) or "no records at all"
            raise CurationError(f"no input documents: the sources gave nothing to curate ({reasons}); "
                                "see the reader's quarantine for locations")
        if "near_dedup" in config.steps:
            nd = config.near_dedup
            bands, rows = nd.banding()
            stats["near_dedup"] = {"bands": bands, "rows_per_band": rows, "num_perm": bands * rows,
                                   "threshold": nd.threshold, "verify_threshold": nd.verify_threshold,
                                   "min_recall": nd.min_recall, "s_curve": s_curve_rows(nd)}
        stats["funnel"] = funnel_rows(stats)
        check_funnel(stats)
        w.put_json("stats.json", stats)
        w.put_json("config.json", config.model_dump(mode="json"))
        w.put_json("inputs.json", versions)
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
    rows = [{"stage": "input", "docs": stats["input"]["records"], "bytes": stats["input"]["bytes"], "removed": 0, "note": ""}]
    docs = stats["input"]["records"] - stats["quarantined"]["total"]
    lost = stats["quarantined"].get("lost", {})
    note = (f"{lost['records_unknown']} truncated/unreadable file(s) with an unknown number of records"
            if lost.get("records_unknown") else "")
    rows.append({"stage": "quarantine", "docs": docs, "bytes": stats["input"]["bytes"],
                 "removed": stats["quarantined"]["total"], "note": note})
    for s in stats["steps"]:
        note = ""
        if s["step"] == "near_dedup" and "near_dedup" in stats:
            nd = stats["near_dedup"]
            curve = " ".join(f"J={r['jaccard']}:{r['p_detect']:.2f}" for r in nd["s_curve"])
            note = f"{nd['bands']}x{nd['rows_per_band']} bands, verify at {nd['verify_threshold']}; P(detect) {curve}"
        rows.append({"stage": s["step"], "docs": s["docs_out"], "bytes": s["bytes_out"], "removed": s["excluded_docs"], "note": note})
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
