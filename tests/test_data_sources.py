"""Readers and bad input: JSONL (plain/gz/zst), Parquet, directories, globs, store URIs,
python-stdlib, malformed lines, invalid UTF-8, empty docs, a 100 MB record, binary and
unreadable files, missing sources. Nothing may be dropped silently."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from moeflow.platform.data.normalize import NormalizeConfig, normalize_batch
from moeflow.platform.data.schema import Document, QuarantineRecord, make_doc_id
from moeflow.platform.data.sources import (
    SourceConfig,
    SourceError,
    iter_shard,
    plan_shards,
    resolve_files,
    stdlib_root,
)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))


def read_all(sources, max_doc_bytes=1 << 20, **kw):
    docs, quarantine = [], []
    for shard in plan_shards(sources, **kw):
        for item in iter_shard(shard, max_doc_bytes):
            (quarantine if isinstance(item, QuarantineRecord) else docs).append(item)
    return docs, quarantine


def write_jsonl(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


LINES = [
    json.dumps({"text": "first document", "id": 7}).encode(),
    b'{"text": "broken', 
    json.dumps({"body": "no text field"}).encode(),
    json.dumps(["not", "an", "object"]).encode(),
    b"",
    json.dumps({"text": "caf\u00e9 ok"}).encode()[:-2] + b'\xff\xfe"}',  # invalid UTF-8 inside the string
    json.dumps({"text": "last"}).encode(),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_bad_lines_are_quarantined_with_location(tmp_path, suffix):
    path = write_jsonl(tmp_path / f"data{suffix}", LINES)
    docs, quarantine = read_all([SourceConfig(uri=str(path))])
    assert [d.text for d in docs][0] == "first document" and docs[-1].text == "last"
    assert len(docs) + len(quarantine) == len(LINES)
    reasons = {q.location.rsplit(":", 1)[1]: q.reason for q in quarantine}
    assert reasons == {"2": "malformed_json", "3": "missing_text_field", "4": "not_an_object", "5": "blank_line"}
    assert all(q.location.startswith(path.resolve().as_uri()) for q in quarantine)
    bad_utf8 = docs[1]
    assert bad_utf8.metadata["encoding_errors"] == 2 and "\ufffd" in bad_utf8.text
    assert docs[0].metadata["record_id"] == 7
    # stable ids: content hash + source position
    assert docs[0].id == make_doc_id(path.resolve().as_uri(), 0, "first document")
    assert docs[-1].metadata["position"] == 6


def test_record_ranges_make_shards(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [json.dumps({"text": f"doc {i}"}).encode() for i in range(25)])
    shards = plan_shards([SourceConfig(uri=str(path))], records_per_shard=10)
    assert [(u.start, u.stop) for s in shards for u in s.units] == [(0, 10), (10, 20), (20, None)]
    docs, _ = read_all([SourceConfig(uri=str(path))], records_per_shard=10)
    assert [d.text for d in docs] == [f"doc {i}" for i in range(25)]
    assert shards == plan_shards([SourceConfig(uri=str(path))], records_per_shard=10)  # deterministic


def test_parquet_source_with_ranges_and_nulls(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"content": ["a", None, "c", "d", "e"]}), path, row_group_size=2)
    src = SourceConfig(uri=str(path), text_field="content")
    docs, quarantine = read_all([src], records_per_shard=2)
    assert [d.text for d in docs] == ["a", "c", "d", "e"]
    assert [(q.reason, q.location.rsplit("#", 1)[1]) for q in quarantine] == [("null_text", "row=1")]
    with pytest.raises(SourceError, match="no column 'text'"):
        plan_shards([SourceConfig(uri=str(path))])


def test_code_directory_with_binary_and_unreadable_files(tmp_path):
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("print('a')\n")
    (root / "pkg" / "b.py").write_text("print('b')\n")
    (root / "pkg" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "pkg" / "gone.py").symlink_to(root / "missing-target.py")  # listed, but cannot be opened
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: x\n")  # hidden folders are skipped
    docs, quarantine = read_all([SourceConfig(uri=str(root))])
    assert [d.metadata["path"] for d in docs] == ["pkg/a.py", "pkg/b.py"]
    assert docs[0].metadata["ext"] == ".py"
    got = {Path(q.location).name: q.reason for q in quarantine}
    assert got == {"gone.py": "unreadable", "logo.png": "binary"}
    # an extension filter keeps only code
    docs, quarantine = read_all([SourceConfig(uri=str(root), extensions=[".py"])])
    assert len(docs) == 2 and [q.reason for q in quarantine] == ["unreadable"]


def test_missing_sources_are_errors_naming_them(tmp_path):
    with pytest.raises(SourceError, match="nowhere.jsonl"):
        plan_shards([SourceConfig(uri=str(tmp_path / "nowhere.jsonl"))])
    with pytest.raises(SourceError, match=r"\*\.txt"):
        plan_shards([SourceConfig(uri=str(tmp_path / "*.txt"))])
    with pytest.raises(SourceError, match="not found"):
        plan_shards([SourceConfig(uri=(tmp_path / "absent").as_uri())])
    with pytest.raises(SourceError, match="no sources"):
        plan_shards([])


def test_glob_and_store_uri_sources(tmp_path):
    for i in range(3):
        (tmp_path / f"t{i}.txt").write_text(f"text number {i}\n")
    (tmp_path / "skip.md").write_text("other")
    docs, _ = read_all([SourceConfig(uri=str(tmp_path / "t*.txt"))])
    assert [d.text for d in docs] == [f"text number {i}\n" for i in range(3)]
    # the same files through file:// URIs (the object-store code path; s3:// shares it)
    docs_uri, _ = read_all([SourceConfig(uri=tmp_path.as_uri() + "/t*.txt")])
    assert [d.text for d in docs_uri] == [d.text for d in docs]
    jsonl = write_jsonl(tmp_path / "d.jsonl.gz", [b'{"text": "x"}', b"{bad"])
    docs, quarantine = read_all([SourceConfig(uri=jsonl.as_uri())])
    assert [d.text for d in docs] == ["x"] and [q.reason for q in quarantine] == ["malformed_json"]


def test_python_stdlib_source_is_sorted_and_limited():
    files = resolve_files(SourceConfig(uri="python-stdlib", max_files=15, include_tests=False))
    rels = [f[2] for f in files]
    assert len(rels) == 15 and rels == sorted(rels)
    assert all(f[1].startswith("python-stdlib://") for f in files)
    everything = resolve_files(SourceConfig(uri="python-stdlib"))
    assert not any("site-packages" in f[2] for f in everything)
    assert any(f[2].startswith("test/") for f in everything)
    assert not any(f[2].startswith("test/") for f in resolve_files(SourceConfig(uri="python-stdlib", include_tests=False)))
    assert Path(files[0][0]).is_relative_to(stdlib_root())


def test_empty_and_invalid_utf8_docs_are_excluded_by_normalize(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "spaces.txt").write_bytes(b"  \r\n\t \n")
    (tmp_path / "latin1.txt").write_bytes("na\u00efve caf\u00e9 ".encode("latin-1") * 3)
    (tmp_path / "ok.txt").write_bytes(b"line one\r\nline\x07 two\r\n")
    docs, quarantine = read_all([SourceConfig(uri=str(tmp_path))])
    assert not quarantine and len(docs) == 4
    out = normalize_batch(docs, NormalizeConfig())
    assert {Path(e.doc.metadata["path"]).name: e.rule for e in out.excluded} == {
        "empty.txt": "empty", "spaces.txt": "empty", "latin1.txt": "encoding_errors"}
    assert [d.text for d in out.kept] == ["line one\nline two\n"]
    assert out.counters["encoding_errors"] == 6 and out.counters["control_chars_removed"] == 1


def test_a_100mb_record_is_rejected_without_holding_it(tmp_path):
    """A 100 MB JSONL line and a 100 MB text file: quarantined as too_large, memory bounded."""
    big_line = tmp_path / "big.jsonl"
    chunk = b"x" * (1 << 20)
    with open(big_line, "wb") as fh:
        fh.write(b'{"text": "small"}\n{"text": "')
        for _ in range(100):
            fh.write(chunk)
        fh.write(b'"}\n{"text": "after"}\n')
    big_file = tmp_path / "big.txt"
    with open(big_file, "wb") as fh:
        fh.truncate(100 << 20)  # sparse: cheap to create, 100 MB to read
    tracemalloc.start()
    try:
        docs, quarantine = read_all([SourceConfig(uri=str(big_line)), SourceConfig(uri=str(big_file))], max_doc_bytes=4 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [d.text for d in docs] == ["small", "after"]
    assert [(q.reason, q.num_bytes >= 100 << 20) for q in quarantine] == [("too_large", True), ("too_large", True)]
    assert quarantine[0].location.endswith("big.jsonl:2")
    assert "max_doc_bytes" in quarantine[0].detail
    assert peak < 24 << 20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_file_quarantines_the_rest(tmp_path, suffix):
    rng = __import__("random").Random(0)
    texts = [" ".join(f"w{rng.randrange(10**6)}" for _ in range(50)) for _ in range(1500)]  # incompressible, several zstd blocks
    path = write_jsonl(tmp_path / f"cut{suffix}", [json.dumps({"text": t}).encode() for t in texts])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a download cut in half
    docs, quarantine = read_all([SourceConfig(uri=str(path), format="jsonl")], records_per_shard=10_000)
    assert 0 < len(docs) < 1500
    assert [q.reason for q in quarantine][-1] == "truncated"
    assert "rest of the file skipped" in quarantine[-1].detail
