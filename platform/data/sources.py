"""Readers: local files, globs and directories, JSONL (plain/.gz/.zst), Parquet, the same
through ``file://``/``s3://`` store URIs, and the built-in ``python-stdlib`` corpus.

Reading is split in two so that work can be distributed deterministically:

1. ``plan_shards(sources, ...)`` resolves every source to a sorted list of files (a
   missing source given explicitly is a ``SourceError`` naming it) and cuts them into
   shards: groups of ``files_per_shard`` whole text/code files, or ranges of
   ``records_per_shard`` records of one JSONL/Parquet file. The plan depends only on the
   config and the inputs, never on the number of workers.
2. ``iter_shard(shard, max_doc_bytes)`` streams one shard and yields ``Document``s and
   ``QuarantineRecord``s. Nothing is silently dropped: a malformed JSON line, a record
   without the text field, a binary file (NUL bytes), a file that cannot be opened, a
   record larger than ``max_doc_bytes`` — each becomes a quarantine record with its
   location. Reads are bounded: a 100 MB line or file is skipped in chunks, never held.

``python-stdlib`` is the running interpreter's standard library (``sysconfig`` stdlib
path, ``site-packages`` always excluded, ``test`` packages optional); its logical URIs
are ``python-stdlib://<major.minor>/<relative path>``, so document ids do not depend on
where Python is installed.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import gzip
import hashlib
import io
import json
import os
import sys
import sysconfig
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Literal

from pydantic import BaseModel, Field

from .normalize import decode_bytes
from .schema import Document, QuarantineRecord, make_doc_id

STDLIB = "python-stdlib"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.zst", ".ndjson.zst", ".json.gz", ".json.zst")
_GLOB_CHARS = "*?["
_BINARY_SNIFF = 8192
_CHUNK = 1 << 20


class SourceError(Exception):
    """A source that cannot be used at all (missing path, empty glob, bad column)."""


class SourceConfig(BaseModel):
    uri: str = Field(..., description="path, glob, directory, file:// or s3:// URI, or 'python-stdlib'")
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    extensions: list[str] | None = Field(None, description="directory/glob filter, e.g. ['.py', '.md']")
    max_files: int | None = Field(None, description="take only the first max_files files (sorted)")
    include_tests: bool = Field(True, description="python-stdlib: include the test packages")
    name: str | None = Field(None, description="label stored as Document.source (default: the uri)")

    @property
    def label(self) -> str:
        return self.name or self.uri


@dataclass(frozen=True)
class InputUnit:
    """One file, or a record range [start, stop) of one JSONL/Parquet file."""

    read_uri: str  # local path, or a file:// / s3:// URI read through the object store
    logical_uri: str  # what ids and metadata point at
    format: str  # "text" | "jsonl" | "parquet"
    source: str
    rel_path: str
    start: int = 0
    stop: int | None = None
    text_field: str = "text"


@dataclass(frozen=True)
class ShardSpec:
    shard_id: str
    index: int
    units: tuple[InputUnit, ...]

    def to_dict(self) -> dict:
        return {"shard_id": self.shard_id, "index": self.index, "units": [asdict(u) for u in self.units]}


# ---------------------------------------------------------------- resolving sources to files
def _is_store_uri(uri: str) -> bool:
    return uri.startswith(("s3://", "file:"))


def _detect_format(name: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    low = name.lower()
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if low.endswith(".parquet"):
        return "parquet"
    return "text"


def _keep_rel(rel: str, cfg: SourceConfig) -> bool:
    parts = rel.split("/")
    if any(p.startswith(".") or p == "__pycache__" for p in parts):
        return False
    if cfg.extensions is not None and not rel.lower().endswith(tuple(e.lower() for e in cfg.extensions)):
        return False
    return True


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _stdlib_files(cfg: SourceConfig) -> list[tuple[str, str, str]]:
    root = stdlib_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    exts = tuple(cfg.extensions or [".py"])
    out = []
    for dirpath, dirs, files in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        skip = {"site-packages", "__pycache__"} | (set() if cfg.include_tests else {"test", "tests", "idle_test"})
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        for name in files:
            if name.endswith(exts):
                rel = (rel_dir / name).as_posix()
                out.append((str(Path(dirpath) / name), f"{STDLIB}://{version}/{rel}", rel))
    return sorted(out, key=lambda t: t[2])


def _local_files(cfg: SourceConfig) -> list[tuple[str, str, str]]:
    uri = os.path.expanduser(cfg.uri)
    if any(c in uri for c in _GLOB_CHARS):
        matches = sorted(p for p in globlib.glob(uri, recursive=True) if os.path.isfile(p) or os.path.islink(p))
        base = Path(uri.split("*")[0].split("?")[0].split("[")[0]).parent
        found = [(p, Path(os.path.abspath(p)).as_uri(), Path(os.path.abspath(p)).relative_to(base.resolve()).as_posix()) for p in matches]
        found = [f for f in found if _keep_rel(f[2], cfg)]
        if not found:
            raise SourceError(f"source {cfg.uri!r}: the glob matches no files")
        return found
    path = Path(uri)
    if path.is_file():
        return [(str(path), path.resolve().as_uri(), path.name)]
    if path.is_dir():
        root = path.resolve()
        out = []
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
            for name in files:
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                if _keep_rel(rel, cfg):
                    out.append((str(full), full.as_uri(), rel))
        return sorted(out, key=lambda t: t[2])
    raise SourceError(f"source {cfg.uri!r} not found: no such file or directory")


def _store_files(cfg: SourceConfig) -> list[tuple[str, str, str]]:
    from moeflow.platform.store import NotFoundError, StoreError, store_for_uri

    uri = cfg.uri
    glob_at = min((uri.find(c) for c in _GLOB_CHARS if c in uri), default=-1)
    target = uri[:glob_at].rsplit("/", 1)[0] if glob_at >= 0 else uri
    try:
        store, key = store_for_uri(target)
        if glob_at >= 0:
            pattern = store.to_key(uri) if uri.startswith("s3://") else key + uri[len(target):]
            keys = [k for k in store.list(key) if fnmatch.fnmatchcase(k, pattern)]
            base = key
        elif store.exists(key):
            return [(store.uri(key), store.uri(key), key.rsplit("/", 1)[-1])]
        else:
            keys, base = store.list(key), key
    except NotFoundError as exc:
        raise SourceError(f"source {uri!r} not found: {exc}") from exc
    except StoreError as exc:
        raise SourceError(f"source {uri!r} cannot be listed: {exc}") from exc
    found = []
    for k in keys:
        rel = k[len(base) + 1 :] if base and k.startswith(base + "/") else k
        if _keep_rel(rel, cfg) and not rel.endswith("MANIFEST.json"):
            found.append((store.uri(k), store.uri(k), rel))
    if not found:
        raise SourceError(f"source {uri!r} not found: no objects under it")
    return found


def resolve_files(cfg: SourceConfig) -> list[tuple[str, str, str]]:
    """(read_uri, logical_uri, rel_path) of every file of a source, sorted, capped at max_files."""
    if cfg.uri == STDLIB:
        files = _stdlib_files(cfg)
    elif _is_store_uri(cfg.uri):
        files = _store_files(cfg)
    else:
        files = _local_files(cfg)
    return files[: cfg.max_files] if cfg.max_files is not None else files


# ---------------------------------------------------------------- opening
@contextmanager
def open_binary(read_uri: str) -> Iterator[BinaryIO]:
    if _is_store_uri(read_uri):
        from moeflow.platform.store import store_for_uri

        store, key = store_for_uri(read_uri)
        with store.open(key) as fh:
            yield fh
    else:
        with open(read_uri, "rb") as fh:
            yield fh


class _ZstdFrames(io.RawIOBase):
    """Streaming zstd decompression that fails on a truncated stream.

    ``ZstdDecompressor().stream_reader`` returns a clean EOF when its input stops in the
    middle of a frame, which would silently drop the rest of a cut-off download; here a
    frame that has not reached its end marker when the input ends raises ``EOFError``.
    Concatenated frames (what ``zstd`` appends) are read one after the other.
    """

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._raw, self._zstd = raw, zstandard
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._pending:
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ended inside a frame (truncated file)")
                return 0
            while chunk:
                self._in_frame = True
                self._pending += self._dobj.decompress(chunk)
                chunk = b""
                if self._dobj.eof:
                    chunk = self._dobj.unused_data
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


@contextmanager
def open_records_stream(read_uri: str) -> Iterator[BinaryIO]:
    """A buffered binary stream, transparently decompressed for .gz / .zst."""
    with open_binary(read_uri) as raw:
        low = read_uri.lower()
        if low.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as fh:
                yield fh
        elif low.endswith(".zst"):
            yield io.BufferedReader(_ZstdFrames(raw), buffer_size=_CHUNK)
        else:
            yield raw if isinstance(raw, io.BufferedIOBase) else io.BufferedReader(raw, buffer_size=_CHUNK)


@contextmanager
def local_copy(read_uri: str) -> Iterator[str]:
    """A local path for formats that need random access (Parquet)."""
    if not _is_store_uri(read_uri):
        yield read_uri
        return
    from moeflow.platform.store import store_for_uri

    store, key = store_for_uri(read_uri)
    with tempfile.TemporaryDirectory(prefix="moeflow-src-") as tmp:
        path = Path(tmp) / "data.parquet"
        store.get_file(key, path)
        yield str(path)


def iter_bounded_lines(stream: BinaryIO, max_bytes: int) -> Iterator[tuple[bytes | None, int]]:
    """Lines (without the newline) as (bytes, size); (None, size) for a line over max_bytes,
    which is skipped in chunks so that memory stays bounded by max_bytes."""
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if line.endswith(b"\n") or len(line) <= max_bytes:
            yield line.rstrip(b"\r\n"), len(line)
            continue
        size = len(line)
        while True:  # too long: drain the rest of this line without keeping it
            part = stream.readline(_CHUNK)
            size += len(part)
            if not part or part.endswith(b"\n"):
                break
        yield None, size


def count_records(unit_read_uri: str, fmt: str, text_field: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with local_copy(unit_read_uri) as path:
            pf = pq.ParquetFile(path)
            if text_field not in pf.schema_arrow.names:
                raise SourceError(f"{unit_read_uri}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
            return pf.metadata.num_rows
    count, last = 0, b"\n"
    try:
        with open_records_stream(unit_read_uri) as fh:
            while chunk := fh.read(_CHUNK):
                count += chunk.count(b"\n")
                last = chunk[-1:]
    except _corrupt_stream_errors():
        # A truncated/corrupt file is still planned; its last range is open-ended (see
        # plan_shards), so the reader reaches the break and quarantines the unreadable rest.
        return count
    return count + (last != b"\n")


# ---------------------------------------------------------------- planning
def plan_shards(
    sources: list[SourceConfig], files_per_shard: int = 64, records_per_shard: int = 10_000
) -> list[ShardSpec]:
    """Deterministic shards over all sources (see the module docstring)."""
    if not sources:
        raise SourceError("no sources configured")
    groups: list[list[InputUnit]] = []
    seen: set[str] = set()
    for cfg in sources:
        text_units: list[InputUnit] = []
        for read_uri, logical_uri, rel in resolve_files(cfg):
            if logical_uri in seen:  # the same file named twice would duplicate ids
                continue
            seen.add(logical_uri)
            fmt = _detect_format(rel, cfg.format)
            if fmt == "text":
                text_units.append(InputUnit(read_uri, logical_uri, fmt, cfg.label, rel, text_field=cfg.text_field))
                continue
            try:
                num = count_records(read_uri, fmt, cfg.text_field)
            except OSError as exc:
                raise SourceError(f"source {cfg.uri!r}: cannot read {logical_uri}: {exc}") from exc
            for start in range(0, max(num, 1), records_per_shard):
                # the last range is open-ended: reading, not counting, decides where a file ends
                stop = None if start + records_per_shard >= num else start + records_per_shard
                unit = InputUnit(read_uri, logical_uri, fmt, cfg.label, rel, start, stop, cfg.text_field)
                groups.append([unit])
        for i in range(0, len(text_units), files_per_shard):
            groups.append(text_units[i : i + files_per_shard])
    shards = []
    for index, units in enumerate(groups):
        digest = hashlib.sha1(json.dumps([[u.logical_uri, u.start, u.stop] for u in units]).encode()).hexdigest()
        shards.append(ShardSpec(f"{index:05d}-{digest[:10]}", index, tuple(units)))
    return shards


# ---------------------------------------------------------------- reading one shard
def _base_metadata(unit: InputUnit, position: int) -> dict:
    meta = {"source_uri": unit.logical_uri, "position": position, "path": unit.rel_path}
    if unit.format == "text":
        meta["ext"] = Path(unit.rel_path).suffix.lower()
    return meta


def _read_text_file(unit: InputUnit, max_doc_bytes: int) -> Iterator[Document | QuarantineRecord]:
    try:
        with open_binary(unit.read_uri) as fh:
            raw = fh.read(max_doc_bytes + 1)
            if len(raw) > max_doc_bytes:
                size = len(raw)
                del raw
                while chunk := fh.read(_CHUNK):  # measure the rest without keeping it
                    size += len(chunk)
                yield QuarantineRecord(unit.logical_uri, "too_large", f"{size} bytes > max_doc_bytes={max_doc_bytes}", unit.source, size)
                return
    except OSError as exc:
        yield QuarantineRecord(unit.logical_uri, "unreadable", f"{type(exc).__name__}: {exc}", unit.source)
        return
    if b"\x00" in raw[:_BINARY_SNIFF]:
        yield QuarantineRecord(unit.logical_uri, "binary", "NUL bytes in the first 8 KiB: not a text file", unit.source, len(raw))
        return
    text, num_errors = decode_bytes(raw)
    if num_errors > 0.3 * max(1, len(text)):
        yield QuarantineRecord(unit.logical_uri, "binary", f"{num_errors} invalid UTF-8 sequences: not a text file", unit.source, len(raw))
        return
    meta = _base_metadata(unit, 0)
    meta["encoding_errors"] = num_errors
    yield Document(make_doc_id(unit.logical_uri, 0, text), text, unit.source, meta)


def _record_to_doc(unit: InputUnit, position: int, line: bytes) -> Document | QuarantineRecord:
    location = f"{unit.logical_uri}:{position + 1}"
    text_line, num_errors = decode_bytes(line)
    if not text_line.strip():
        return QuarantineRecord(location, "blank_line", "empty line in a JSONL file", unit.source, len(line))
    try:
        record = json.loads(text_line)
    except json.JSONDecodeError as exc:
        return QuarantineRecord(location, "malformed_json", str(exc), unit.source, len(line))
    if not isinstance(record, dict):
        return QuarantineRecord(location, "not_an_object", f"JSON {type(record).__name__}, expected an object", unit.source, len(line))
    text = record.get(unit.text_field)
    if not isinstance(text, str):
        detail = f"field {unit.text_field!r} is {'missing' if text is None else type(text).__name__}"
        return QuarantineRecord(location, "missing_text_field", detail, unit.source, len(line))
    meta = _base_metadata(unit, position)
    meta["encoding_errors"] = num_errors
    if "id" in record and isinstance(record["id"], (str, int)):
        meta["record_id"] = record["id"]
    return Document(make_doc_id(unit.logical_uri, position, text), text, unit.source, meta)


def _corrupt_stream_errors() -> tuple[type[BaseException], ...]:
    import zlib

    import zstandard

    return (OSError, EOFError, ValueError, zlib.error, zstandard.ZstdError)


def _read_jsonl(unit: InputUnit, max_doc_bytes: int) -> Iterator[Document | QuarantineRecord]:
    position = -1
    try:
        with open_records_stream(unit.read_uri) as fh:
            for position, (line, size) in enumerate(iter_bounded_lines(fh, max_doc_bytes)):
                if position < unit.start:
                    continue
                if unit.stop is not None and position >= unit.stop:
                    return
                if line is None:
                    location = f"{unit.logical_uri}:{position + 1}"
                    yield QuarantineRecord(location, "too_large", f"{size} bytes > max_doc_bytes={max_doc_bytes}", unit.source, size)
                    continue
                yield _record_to_doc(unit, position, line)
    except _corrupt_stream_errors() as exc:  # corrupt compression, truncated or vanished file
        location = f"{unit.logical_uri}:{position + 2}"
        yield QuarantineRecord(location, "unreadable", f"{type(exc).__name__}: {exc} (rest of the file skipped)", unit.source)


def _read_parquet(unit: InputUnit, max_doc_bytes: int) -> Iterator[Document | QuarantineRecord]:
    import pyarrow.parquet as pq

    try:
        with local_copy(unit.read_uri) as path:
            pf = pq.ParquetFile(path)
            position = 0
            for batch in pf.iter_batches(batch_size=1024, columns=[unit.text_field]):
                values = batch.column(0).to_pylist()
                for value in values:
                    if position >= (unit.stop if unit.stop is not None else 1 << 62):
                        return
                    if position >= unit.start:
                        yield _parquet_value(unit, position, value, max_doc_bytes)
                    position += 1
    except OSError as exc:
        yield QuarantineRecord(unit.logical_uri, "unreadable", f"{type(exc).__name__}: {exc}", unit.source)


def _parquet_value(unit: InputUnit, position: int, value, max_doc_bytes: int) -> Document | QuarantineRecord:
    location = f"{unit.logical_uri}#row={position}"
    if isinstance(value, bytes):
        value, _ = decode_bytes(value)
    if not isinstance(value, str):
        return QuarantineRecord(location, "missing_text_field", f"column {unit.text_field!r} is {type(value).__name__}", unit.source)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_doc_bytes:
        return QuarantineRecord(location, "too_large", f"{size} bytes > max_doc_bytes={max_doc_bytes}", unit.source, size)
    return Document(make_doc_id(unit.logical_uri, position, value), value, unit.source, _base_metadata(unit, position))


def iter_unit(unit: InputUnit, max_doc_bytes: int) -> Iterator[Document | QuarantineRecord]:
    reader = {"text": _read_text_file, "jsonl": _read_jsonl, "parquet": _read_parquet}[unit.format]
    yield from reader(unit, max_doc_bytes)


def iter_shard(shard: ShardSpec, max_doc_bytes: int) -> Iterator[Document | QuarantineRecord]:
    for unit in shard.units:
        yield from iter_unit(unit, max_doc_bytes)
