"""What a source resolves to: ``InputUnit`` (one file, or a record range of one), ``ShardSpec``
(the units one worker reads) and ``SourceError``.

They sit in their own module so that ``sources.py`` (resolving and planning) and ``readers.py``
(reading one unit) both import them without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


class SourceError(Exception):
    """A source that cannot be used at all (missing path, empty glob, bad column)."""


@dataclass(frozen=True)
class InputUnit:
    """One file, or a record range [start, stop) of one JSONL/Parquet file.

    ``format`` is "text" | "jsonl" | "json" | "parquet", or "skip" for an entry that is listed but
    never opened (a FIFO, a socket, a directory loop): ``skip`` then holds (reason, detail) and the
    reader turns it into a quarantine record, so it is counted like any other unreadable input.
    ``version`` is the file's fingerprint (``fingerprint.file_version``); it is part of the shard
    id, so an edited file never reuses the shard artefacts of its old content.
    """

    read_uri: str  # local path, or a file:// / s3:// URI read through the object store
    logical_uri: str  # what ids and metadata point at
    format: str
    source: str
    rel_path: str
    start: int = 0
    stop: int | None = None
    text_field: str = "text"
    version: str = ""
    skip: tuple[str, str] | None = None


@dataclass(frozen=True)
class ShardSpec:
    shard_id: str
    index: int
    units: tuple[InputUnit, ...]

    def to_dict(self) -> dict:
        return {"shard_id": self.shard_id, "index": self.index, "units": [asdict(u) for u in self.units]}
