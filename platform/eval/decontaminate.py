"""Decontamination of evaluation tasks against the training data (13-gram overlap, ``models/eval/decontam``).

``training_texts(uri)`` reads the texts of one training artefact: a curated dataset (parquet parts,
``platform/data/documents``) or JSONL records of post-training data, whose text fields are joined
(``text``, ``prompt``, ``answer``, ``chosen``, ``rejected``, ``completion``, and the contents of
``messages``), so an evaluation item copied into an SFT conversation or a preference pair is found
as well as one in the pretraining corpus. ``index_training_data(uris)`` builds one n-gram index over
all of them; ``decontaminate(data, index)`` flags each task item and, by default, drops the
contaminated ones from scoring while keeping their ids in the report.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from moeflow.models.eval.decontam import NgramIndex

from .tasks import TaskData, item_text

_TEXT_FIELDS = ("text", "prompt", "answer", "chosen", "rejected", "completion", "response")


def record_text(rec: dict) -> str:
    parts = [rec[k] for k in _TEXT_FIELDS if isinstance(rec.get(k), str)]
    for m in rec.get("messages") or []:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            parts.append(m["content"])
    for k in ("chosen", "rejected"):  # preference pairs may hold message lists
        if isinstance(rec.get(k), list):
            parts += [m["content"] for m in rec[k] if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return "\n".join(parts)


def _jsonl_texts(data: bytes) -> Iterator[str]:
    for line in io.StringIO(data.decode("utf-8", errors="replace")):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            yield record_text(rec)


def training_texts(uri: str) -> Iterator[str]:
    """Texts of a curated artefact, a JSONL artefact (every ``*.jsonl`` in it) or a single JSONL object/file."""
    from moeflow.platform.store import NotFoundError, store_for_uri

    store, key = store_for_uri(uri) if uri.startswith(("file:", "s3://")) else (None, uri)
    if store is None:
        with open(uri, "rb") as f:
            yield from _jsonl_texts(f.read())
        return
    try:
        art = store.read_artifact(key)
    except NotFoundError:
        yield from _jsonl_texts(store.get_bytes(key))
        return
    names = art.names()
    if any(n.startswith("part-") and n.endswith(".parquet") for n in names):
        from moeflow.platform.data.documents import iter_artifact_documents

        for doc in iter_artifact_documents(art):
            yield doc.text
        return
    for name in sorted(n for n in names if n.endswith(".jsonl")):
        yield from _jsonl_texts(store.get_bytes(art.key(name)))


def index_training_data(uris: Iterable[str], n: int = 13, min_words: int | None = 8) -> NgramIndex:
    """One index over every training artefact (short items of >= min_words words are checked whole)."""
    index = NgramIndex(n=n, min_words=min_words)
    for uri in uris:
        index.add_all(training_texts(uri))
    return index


@dataclass
class ContaminationReport:
    task: str
    num_items: int
    contaminated: list[str] = field(default_factory=list)   # item ids
    too_short: int = 0
    excluded: bool = True

    @property
    def fraction(self) -> float:
        return len(self.contaminated) / self.num_items if self.num_items else 0.0

    def to_dict(self) -> dict:
        return {"task": self.task, "num_items": self.num_items, "num_contaminated": len(self.contaminated),
                "fraction": self.fraction, "too_short": self.too_short, "excluded": self.excluded,
                "contaminated_ids": self.contaminated}


def decontaminate(data: TaskData, index: NgramIndex, *, exclude: bool = True) -> tuple[TaskData, ContaminationReport]:
    """Flag items with an n-gram in the index; with ``exclude`` they are removed from the returned data."""
    report = ContaminationReport(data.spec.name, len(data.items), excluded=exclude)
    keep_items, keep_ids = [], []
    for item_id, item in zip(data.ids, data.items):
        status = index.status(item_text(item))
        report.too_short += status == "too_short"
        if status == "contaminated":
            report.contaminated.append(item_id)
            if exclude:
                continue
        keep_items.append(item)
        keep_ids.append(item_id)
    return TaskData(data.spec, keep_items, keep_ids, data.fewshot, data.quarantined), report


def training_data_uris(catalog, uris: Iterable[str | None]) -> list[str]:
    """The training data upstream of the given artefacts in the lineage catalog (curated datasets and
    post-training sets: what a model version saw), newest lineage first, without repeats."""
    from moeflow.platform import artifacts as A

    kinds = {A.CURATED, A.CHAT_DATA, A.PREFERENCE_DATA, A.PROMPT_DATA}
    found: list[str] = []
    for uri in uris:
        if not uri or "://" not in uri or catalog.get_artifact(uri) is None:
            continue
        for node in catalog.upstream(uri):
            if node.get("type") == "artifact" and node.get("kind") in kinds and node["uri"] not in found:
                found.append(node["uri"])
    return found
