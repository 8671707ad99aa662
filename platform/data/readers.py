"""Reading one input unit: opening (local, file://, s3://), decompression, text encodings, and
the JSONL / JSON / Parquet / text readers that turn bytes into ``Document``s and
``QuarantineRecord``s.

Nothing a file can contain may crash a run or vanish without a count:

* A local file is opened non-blocking and checked to be a regular file first, so a FIFO or a
  device that slipped past the listing is quarantined (``not_a_regular_file``), never waited on.
* Text files: UTF-8 (a BOM kept, as before), UTF-16/32 with a BOM, and BOM-less UTF-16 (every
  other byte NUL) are decoded; only what is left with NUL bytes is ``binary``.
* JSONL: a UTF-8 BOM is dropped and a UTF-16/32 BOM re-encodes the stream to UTF-8 before lines
  are split; a record whose text holds a lone surrogate (valid JSON, ``"\\ud800"``, but not
  encodable as UTF-8) is quarantined as ``lone_surrogate``; ``null`` text is ``null_text``.
* Truncated ``.gz`` / ``.zst``: every complete record before the cut is kept; the rest becomes one
  ``truncated`` quarantine record that says how many bytes were lost (known for zstd from the
  frame header, unknown for gzip, whose size is stored at the end) and that the number of lost
  records is unknown (``num_records=None``).
* Parquet: a file that cannot be opened (no footer, not Parquet) or fails mid-file is quarantined
  with its location and, where the footer is readable, the number of rows lost.
* ``.json``: an array of objects is read as records (location ``#item=<i>``); any other JSON file
  (a ``package.json``) stays one text document, as before.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from .normalize import decode_bytes
from .schema import Document, QuarantineRecord, make_doc_id
from .units import InputUnit, ShardSpec, SourceError

_BINARY_SNIFF = 8192
_CHUNK = 1 << 20
_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


class NotRegularFileError(OSError):
    """A path that is a FIFO, socket or device: opening it for reading could block forever."""


class TruncatedStreamError(EOFError):
    """A compressed stream that ends before its end marker; ``content_size`` is the decompressed
    size its headers announced (None where the format does not say, as gzip)."""

    def __init__(self, message: str, content_size: int | None = None):
        super().__init__(message)
        self.content_size = content_size


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def _is_store_uri(uri: str) -> bool:
    return uri.startswith(("s3://", "file:"))


# ---------------------------------------------------------------- opening
def _open_local(path: str) -> BinaryIO:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFileError(f"{path} is a {file_kind(mode)}, not a regular file")
    return os.fdopen(fd, "rb")


@contextmanager
def open_binary(read_uri: str) -> Iterator[BinaryIO]:
    if _is_store_uri(read_uri):
        from moeflow.platform.store import store_for_uri

        store, key = store_for_uri(read_uri)
        with store.open(key) as fh:
            yield fh
    else:
        with _open_local(read_uri) as fh:
            yield fh


class _ZstdFrames(io.RawIOBase):
    """Streaming zstd decompression that fails on a truncated stream.

    ``ZstdDecompressor().stream_reader`` returns a clean EOF when its input stops in the
    middle of a frame, which would silently drop the rest of a cut-off download; here a
    frame that has not reached its end marker when the input ends raises
    ``TruncatedStreamError`` with the content size the frame headers announced. Concatenated
    frames (what ``zstd`` appends) are read one after the other.
    """

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._raw, self._zstd = raw, zstandard
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False
        self._content_size: int | None = 0  # sum over the frames started; None once one is unknown

    def readable(self) -> bool:
        return True

    def _start_frame(self, data: bytes) -> None:
        try:
            size = self._zstd.frame_content_size(data)
        except self._zstd.ZstdError:
            size = -1
        self._content_size = None if size < 0 or self._content_size is None else self._content_size + size
        self._in_frame = True

    def readinto(self, buf) -> int:
        while not self._pending:
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                if self._in_frame:
                    raise TruncatedStreamError("zstd stream ended inside a frame", self._content_size)
                return 0
            while chunk:
                if not self._in_frame:
                    self._start_frame(chunk)
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


class _Chained(io.RawIOBase):
    """``head`` bytes, then the rest of ``raw`` (what was peeked at is put back)."""

    def __init__(self, head: bytes, raw: BinaryIO):
        self._head = head
        # read1: whatever one underlying read gives. A buffered read(n) of a truncated gzip
        # stream would wait for all n bytes and drop what it had when the stream breaks.
        self._read = getattr(raw, "read1", raw.read)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self._head[: len(buf)] if self._head else self._read(len(buf))
        self._head = self._head[len(data):] if self._head else b""
        buf[: len(data)] = data
        return len(data)


class _ToUtf8(io.RawIOBase):
    """UTF-16/32 bytes in, UTF-8 bytes out, one chunk at a time (memory stays bounded)."""

    def __init__(self, raw: BinaryIO, encoding: str):
        self._read = getattr(raw, "read1", raw.read)
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        self._pending = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._pending and not self._done:
            chunk = self._read(_CHUNK)
            self._done = not chunk
            self._pending = self._decoder.decode(chunk, final=self._done).encode("utf-8")
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _decoded_stream(fh: BinaryIO) -> BinaryIO:
    """The stream as UTF-8 bytes: a UTF-8 BOM dropped, a UTF-16/32 BOM transcoded."""
    head = fh.read(4)
    if head.startswith(codecs.BOM_UTF8):
        return io.BufferedReader(_Chained(head[3:], fh), buffer_size=_CHUNK)
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return io.BufferedReader(_ToUtf8(io.BufferedReader(_Chained(head, fh)), encoding), buffer_size=_CHUNK)
    return io.BufferedReader(_Chained(head, fh), buffer_size=_CHUNK)


@contextmanager
def open_records_stream(read_uri: str) -> Iterator[BinaryIO]:
    """A buffered UTF-8 byte stream of a JSONL file, decompressed for .gz / .zst."""
    with open_binary(read_uri) as raw:
        low = read_uri.lower()
        if low.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as fh:
                yield _decoded_stream(fh)
        elif low.endswith(".zst"):
            yield _decoded_stream(io.BufferedReader(_ZstdFrames(raw), buffer_size=_CHUNK))
        else:
            yield _decoded_stream(raw)


@contextmanager
def local_copy(read_uri: str) -> Iterator[str]:
    """A local path for formats that need random access (Parquet)."""
    if not _is_store_uri(read_uri):
        with _open_local(read_uri):  # refuse a FIFO before pyarrow blocks on it
            pass
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


def _corrupt_stream_errors() -> tuple[type[BaseException], ...]:
    import zlib

    import zstandard

    return (OSError, EOFError, ValueError, zlib.error, zstandard.ZstdError)


def _parquet_errors() -> tuple[type[BaseException], ...]:
    import pyarrow

    return (OSError, pyarrow.ArrowException)


def count_records(unit_read_uri: str, fmt: str, text_field: str) -> int | None:
    """Records of a JSONL/Parquet file for planning; None for a Parquet file that cannot be
    opened (planned as one unit, quarantined when read)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            with local_copy(unit_read_uri) as path:
                pf = pq.ParquetFile(path)
                names = pf.schema_arrow.names
                num_rows = pf.metadata.num_rows
        except _parquet_errors():
            return None
        if text_field not in names:
            raise SourceError(f"{unit_read_uri}: no column {text_field!r} (columns: {names})")
        return num_rows
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


# ---------------------------------------------------------------- text encodings
def _utf16_without_bom(sample: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' when the NULs sit on one parity only (ASCII-heavy UTF-16)."""
    if len(sample) < 8:
        return None
    even, odd = sample[0::2], sample[1::2]
    nul_even, nul_odd = even.count(0) / len(even), odd.count(0) / len(odd)
    if nul_odd >= 0.3 and nul_even <= 0.02:
        return "utf-16-le"
    if nul_even >= 0.3 and nul_odd <= 0.02:
        return "utf-16-be"
    return None


def decode_text(raw: bytes) -> tuple[str, int, str] | None:
    """(text, number of invalid sequences, encoding) of a text file; None when it is binary."""
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            text = raw.decode(encoding, errors="replace")
            return text, text.count("\ufffd"), encoding
    if b"\x00" in raw[:_BINARY_SNIFF]:
        encoding = _utf16_without_bom(raw[:_BINARY_SNIFF])
        if encoding is None:
            return None
        text = raw.decode(encoding, errors="replace")
        num_errors = text.count("\ufffd")
        if num_errors > 0.01 * max(1, len(text)) or "\x00" in text:
            return None
        return text, num_errors, encoding
    text, num_errors = decode_bytes(raw)
    return text, num_errors, "utf-8"


# ---------------------------------------------------------------- reading one unit
def _base_metadata(unit: InputUnit, position: int) -> dict:
    meta = {"source_uri": unit.logical_uri, "position": position, "path": unit.rel_path}
    if unit.format in ("text", "json"):
        meta["ext"] = Path(unit.rel_path).suffix.lower()
    return meta


def _unreadable(unit: InputUnit, exc: BaseException, what: str = "") -> QuarantineRecord:
    if isinstance(exc, NotRegularFileError):
        return QuarantineRecord(unit.logical_uri, "not_a_regular_file", f"{exc} (skipped unread)", unit.source)
    return QuarantineRecord(unit.logical_uri, "unreadable", f"{what}{type(exc).__name__}: {exc}", unit.source,
                            num_records=None if unit.format in ("jsonl", "parquet") else 1)


def _read_whole(unit: InputUnit, max_doc_bytes: int) -> bytes | QuarantineRecord:
    try:
        with open_binary(unit.read_uri) as fh:
            raw = fh.read(max_doc_bytes + 1)
            if len(raw) > max_doc_bytes:
                size = len(raw)
                del raw
                while chunk := fh.read(_CHUNK):  # measure the rest without keeping it
                    size += len(chunk)
                detail = f"{size} bytes > max_doc_bytes={max_doc_bytes}"
                return QuarantineRecord(unit.logical_uri, "too_large", detail, unit.source, size)
    except OSError as exc:
        return _unreadable(unit, exc)
    return raw


def _text_document(unit: InputUnit, raw: bytes) -> Document | QuarantineRecord:
    decoded = decode_text(raw)
    if decoded is None:
        return QuarantineRecord(unit.logical_uri, "binary", "NUL bytes in the first 8 KiB: not a text file", unit.source, len(raw))
    text, num_errors, encoding = decoded
    if num_errors > 0.3 * max(1, len(text)):
        return QuarantineRecord(unit.logical_uri, "binary", f"{num_errors} invalid UTF-8 sequences: not a text file", unit.source, len(raw))
    meta = _base_metadata(unit, 0)
    meta["encoding_errors"] = num_errors
    if encoding != "utf-8":
        meta["encoding"] = encoding
    return Document(make_doc_id(unit.logical_uri, 0, text), text, unit.source, meta)


def _read_text_file(unit: InputUnit, max_doc_bytes: int) -> Iterator[Document | QuarantineRecord]:
    raw = _read_whole(unit, max_doc_bytes)
    yield raw if isinstance(raw, QuarantineRecord) else _text_document(unit, raw)


def _lone_surrogate(value: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _object_to_doc(unit: InputUnit, position: int, location: str, record, size: int, num_errors: int = 0):
    """A parsed JSON record (JSONL line or .json array item) -> Document or QuarantineRecord."""
    if not isinstance(record, dict):
        return QuarantineRecord(location, "not_an_object", f"JSON {type(record).__name__}, expected an object", unit.source, size)
    field = unit.text_field
    text = record.get(field)
    if text is None:
        reason, what = ("null_text", "null") if field in record else ("missing_text_field", "missing")
        return QuarantineRecord(location, reason, f"field {field!r} is {what}", unit.source, size)
    if not isinstance(text, str):
        return QuarantineRecord(location, "text_not_a_string", f"field {field!r} is {type(text).__name__}, not a string", unit.source, size)
    bad = _lone_surrogate(text)
    if bad is not None:
        detail = f"field {field!r} holds a lone surrogate U+{ord(text[bad]):04X} at character {bad}: not encodable as UTF-8"
        return QuarantineRecord(location, "lone_surrogate", detail, unit.source, size)
    meta = _base_metadata(unit, position)
    meta["encoding_errors"] = num_errors
    record_id = record.get("id")
    if isinstance(record_id, int) or (isinstance(record_id, str) and _lone_surrogate(record_id) is None):
        meta["record_id"] = record_id
    return Document(make_doc_id(unit.logical_uri, position, text), text, unit.source, meta)


def _record_to_doc(unit: InputUnit, position: int, line: bytes) -> Document | QuarantineRecord:
    location = f"{unit.logical_uri}:{position + 1}"
    text_line, num_errors = decode_bytes(line)
    if not text_line.strip():
        return QuarantineRecord(location, "blank_line", "empty line in a JSONL file", unit.source, len(line))
    try:
        record = json.loads(text_line)
    except json.JSONDecodeError as exc:
        return QuarantineRecord(location, "malformed_json", str(exc), unit.source, len(line))
    return _object_to_doc(unit, position, location, record, len(line), num_errors)


def _stream_break(unit: InputUnit, exc: BaseException, position: int, consumed: int) -> QuarantineRecord:
    """The quarantine record for the rest of a JSONL file after its stream broke."""
    location = f"{unit.logical_uri}:{position + 2}"
    if isinstance(exc, NotRegularFileError):
        return _unreadable(unit, exc)
    if not isinstance(exc, EOFError):  # corrupt data, a vanished file: nothing says how much is left
        detail = f"{type(exc).__name__}: {exc} (rest of the file skipped; records lost: unknown)"
        return QuarantineRecord(location, "unreadable", detail, unit.source, num_records=None)
    content_size = getattr(exc, "content_size", None)
    lost = None if content_size is None else max(0, content_size - consumed)
    lost_text = "bytes lost: unknown (gzip stores the size at the end)" if lost is None else f"{lost} bytes lost"
    detail = (f"compressed stream cut off after {consumed} decompressed bytes ({position + 1} lines read); "
              f"{lost_text}; records lost: unknown (rest of the file skipped)")
    return QuarantineRecord(location, "truncated", detail, unit.source, lost, num_records=None)


def _read_jsonl(unit: InputUnit, max_doc_bytes: int) -> Iterator[Document | QuarantineRecord]:
    position, consumed = -1, 0
    try:
        with open_records_stream(unit.read_uri) as fh:
            for position, (line, size) in enumerate(iter_bounded_lines(fh, max_doc_bytes)):
                consumed += size
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
        yield _stream_break(unit, exc, position, consumed)


def _read_json(unit: InputUnit, max_doc_bytes: int) -> Iterator[Document | QuarantineRecord]:
    """A .json file: an array of objects is records; anything else is one text document."""
    raw = _read_whole(unit, max_doc_bytes)
    if isinstance(raw, QuarantineRecord):
        yield raw
        return
    decoded = decode_text(raw)
    try:
        value = json.loads(decoded[0]) if decoded else None
    except json.JSONDecodeError:
        value = None
    field = unit.text_field
    if not (isinstance(value, list) and any(isinstance(v, dict) and field in v for v in value)):
        yield _text_document(unit, raw)
        return
    for i, item in enumerate(value):
        yield _object_to_doc(unit, i, f"{unit.logical_uri}#item={i}", item, 0)


def _read_parquet(unit: InputUnit, max_doc_bytes: int) -> Iterator[Document | QuarantineRecord]:
    import pyarrow.parquet as pq

    position, num_rows = unit.start, None
    try:
        with local_copy(unit.read_uri) as path:
            pf = pq.ParquetFile(path)
            num_rows = pf.metadata.num_rows
            position = 0
            for batch in pf.iter_batches(batch_size=1024, columns=[unit.text_field]):
                values = batch.column(0).to_pylist()
                for value in values:
                    if position >= (unit.stop if unit.stop is not None else 1 << 62):
                        return
                    if position >= unit.start:
                        yield _parquet_value(unit, position, value, max_doc_bytes)
                    position += 1
    except _parquet_errors() as exc:
        if isinstance(exc, NotRegularFileError):
            yield _unreadable(unit, exc)
            return
        start = max(position, unit.start)
        end = num_rows if unit.stop is None else min(unit.stop, num_rows or unit.stop)
        lost = None if end is None else max(0, end - start)
        where = f"{unit.logical_uri}#row={start}" if num_rows is not None else unit.logical_uri
        detail = (f"cannot read Parquet file: {type(exc).__name__}: {exc} "
                  f"(records lost: {'unknown' if lost is None else lost})")
        yield QuarantineRecord(where, "unreadable", detail, unit.source, num_records=lost)


def _parquet_value(unit: InputUnit, position: int, value, max_doc_bytes: int) -> Document | QuarantineRecord:
    location = f"{unit.logical_uri}#row={position}"
    if isinstance(value, bytes):
        value, _ = decode_bytes(value)
    if value is None:
        return QuarantineRecord(location, "null_text", f"column {unit.text_field!r} is null", unit.source)
    if not isinstance(value, str):
        return QuarantineRecord(location, "text_not_a_string", f"column {unit.text_field!r} is {type(value).__name__}", unit.source)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_doc_bytes:
        return QuarantineRecord(location, "too_large", f"{size} bytes > max_doc_bytes={max_doc_bytes}", unit.source, size)
    return Document(make_doc_id(unit.logical_uri, position, value), value, unit.source, _base_metadata(unit, position))


def _read_skipped(unit: InputUnit, max_doc_bytes: int) -> Iterator[QuarantineRecord]:
    reason, detail = unit.skip or ("skipped", "")
    yield QuarantineRecord(unit.logical_uri, reason, detail, unit.source, num_records=0 if reason == "symlink_loop" else 1)


_READERS = {"text": _read_text_file, "jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet,
            "skip": _read_skipped}


def iter_unit(unit: InputUnit, max_doc_bytes: int) -> Iterator[Document | QuarantineRecord]:
    yield from _READERS[unit.format](unit, max_doc_bytes)


def iter_shard(shard: ShardSpec, max_doc_bytes: int) -> Iterator[Document | QuarantineRecord]:
    for unit in shard.units:
        yield from iter_unit(unit, max_doc_bytes)
