"""The one document schema of the data engine, and stable ids.

A ``Document`` is what every curation step consumes and produces. Its id is stable and
traceable: ``<sha1(source_uri)[:8]>-<position>-<sha256(text)[:12]>`` where ``position`` is
the record's place in its source (line number in a JSONL file, row in a Parquet file,
0 for a whole file). The id is computed once, on the raw text as read, and never changes
when later steps rewrite the text (normalisation, PII redaction), so every report can
point back to the original record: ``metadata["source_uri"]`` and ``metadata["position"]``
hold the location in full.

``QuarantineRecord`` is an input that never became a Document (malformed JSON, binary
file, unreadable file, over-long record): it keeps the location and the reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


def make_doc_id(source_uri: str, position: int, text: str) -> str:
    """Stable id from where a record came from and what it says."""
    src = hashlib.sha1(source_uri.encode("utf-8")).hexdigest()[:8]
    content = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{src}-{position}-{content}"


@dataclass
class Document:
    id: str
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8", "surrogatepass"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Document":
        metadata = data.get("metadata") or {}
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        return cls(id=data["id"], text=data["text"], source=data.get("source", ""), metadata=dict(metadata))


@dataclass
class QuarantineRecord:
    """An input record that could not become a Document."""

    location: str  # "<uri>" or "<uri>:<line>" / "<uri>#row=<n>"
    reason: str  # short machine-readable reason, e.g. "malformed_json"
    detail: str = ""  # human-readable explanation
    source: str = ""
    num_bytes: int | None = None
    # input records this entry stands for: 1 (a record, a one-document file), None when unknown
    # (the rest of a truncated file), 0 for a listing entry without records (a directory loop)
    num_records: int | None = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Excluded:
    """A document a curation step removed, and why."""

    doc: Document
    step: str
    rule: str
    detail: str = ""
    duplicate_of: str | None = None


@dataclass
class BatchResult:
    """What a curation step returns for one batch: kept docs, excluded docs, extra counters."""

    kept: list[Document]
    excluded: list[Excluded] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
