"""Bad and unusual inputs that once crashed a run or vanished silently (issue 9): lone
surrogates, corrupt Parquet, truncated .zst/.gz, symlinked directories and loops, FIFOs, a
UTF-8 BOM, UTF-16 text, .json arrays, a literal '[' in a path, an empty input set, null text.
Each ends in a document, a counted quarantine with its location and reason, or a clear error."""

from __future__ import annotations

import gzip
import json
import os
import threading
from pathlib import Path

import pytest
import zstandard

from moeflow.platform.data.curate import CurateConfig, CurationError, run_curation
from moeflow.platform.data.schema import QuarantineRecord
from moeflow.platform.data.sources import SourceConfig, SourceError, iter_shard, plan_shards
from moeflow.platform.store import LocalStore


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))


def read_all(sources, max_doc_bytes=1 << 20, **kw):
    docs, quarantine = [], []
    for shard in plan_shards(sources, **kw):
        for item in iter_shard(shard, max_doc_bytes):
            (quarantine if isinstance(item, QuarantineRecord) else docs).append(item)
    return docs, quarantine


def records(texts: list[str]) -> bytes:
    return b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts)


# ---------------------------------------------------------------- records that crashed the run
def test_lone_surrogate_is_quarantined_not_a_crash(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"text": "ok one"}\n{"text": "bad \\ud800 here"}\n{"text": "ok two", "id": "x\\udfff"}\n')
    docs, quarantine = read_all([SourceConfig(uri=str(path))])
    assert [d.text for d in docs] == ["ok one", "ok two"]
    assert "record_id" not in docs[1].metadata  # an unencodable id is not carried along
    assert [(q.reason, q.location.rsplit(":", 1)[1]) for q in quarantine] == [("lone_surrogate", "2")]
    assert "U+D800" in quarantine[0].detail


def test_corrupt_and_truncated_parquet_are_quarantined_with_their_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(10)]}), good, row_group_size=5)
    data = good.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])  # footer gone
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all")
    docs, quarantine = read_all([SourceConfig(uri=str(tmp_path))])
    assert [d.text for d in docs] == [f"row {i}" for i in range(10)]
    got = {Path(q.location).name: q.reason for q in quarantine}
    assert got == {"cut.parquet": "unreadable", "junk.parquet": "unreadable"}
    assert all("Parquet" in q.detail or "parquet" in q.detail for q in quarantine)


def test_null_text_is_reported_as_null_not_missing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "n.jsonl"
    path.write_bytes(b'{"text": null}\n{"body": "x"}\n{"text": 3}\n')
    _, quarantine = read_all([SourceConfig(uri=str(path))])
    assert [(q.reason, q.detail) for q in quarantine] == [
        ("null_text", "field 'text' is null"),
        ("missing_text_field", "field 'text' is missing"),
        ("text_not_a_string", "field 'text' is int, not a string"),
    ]
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "n.parquet")
    _, quarantine = read_all([SourceConfig(uri=str(tmp_path / "n.parquet"))])
    assert [(q.reason, q.detail) for q in quarantine] == [("null_text", "column 'text' is null")]


# ---------------------------------------------------------------- truncated compressed files
def _compressible(n: int) -> list[str]:
    return [f"record {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(n)]


def test_truncated_zst_reports_what_was_lost(tmp_path):
    texts = _compressible(400)
    raw = records(texts)
    path = tmp_path / "cut.jsonl.zst"
    data = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(data[: len(data) // 2])
    docs, quarantine = read_all([SourceConfig(uri=str(path))])
    assert [d.text for d in docs] == texts[: len(docs)]
    (lost,) = quarantine
    assert lost.reason == "truncated"
    # one zstd block cannot be decoded in part: what was decoded and what was lost is exact in bytes
    decoded = sum(len(json.dumps({"text": t})) + 1 for t in texts[: len(docs)])
    assert lost.num_bytes == len(raw) - decoded  # the frame header says how long the content was
    assert f"{len(raw) - decoded} bytes" in lost.detail and "records lost: unknown" in lost.detail


def test_truncated_zst_with_several_blocks_keeps_what_decodes(tmp_path):
    texts = _compressible(20_000)  # ~1.6 MB: many 128 KiB blocks
    path = tmp_path / "cut.jsonl.zst"
    data = zstandard.ZstdCompressor().compress(records(texts))
    path.write_bytes(data[: len(data) // 2])
    docs, quarantine = read_all([SourceConfig(uri=str(path))], records_per_shard=1 << 30)
    assert len(docs) > 5_000 and [d.text for d in docs] == texts[: len(docs)]
    assert [q.reason for q in quarantine] == ["truncated"]
    raw = records(texts)
    kept = sum(len(json.dumps({"text": t})) + 1 for t in texts[: len(docs)])
    assert quarantine[0].num_bytes == len(raw) - kept  # the cut-off partial line counts as lost


def test_truncated_gz_keeps_every_record_and_counts_the_rest_honestly(tmp_path):
    texts = _compressible(400)
    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(records(texts))
    path.write_bytes(data[: len(data) // 2])
    docs, quarantine = read_all([SourceConfig(uri=str(path))])
    assert 0 < len(docs) < 400 and [d.text for d in docs] == texts[: len(docs)]
    (lost,) = quarantine
    assert lost.reason == "truncated" and lost.location.endswith(f":{len(docs) + 1}")
    assert "records lost: unknown" in lost.detail and lost.num_bytes is None  # gzip keeps its size at the end


# ---------------------------------------------------------------- the file system
def test_symlinked_directories_are_followed_and_loops_stopped(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.txt").write_text("outside text\n")
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.txt").write_text("inside text\n")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # a cycle back to the root
    docs, quarantine = read_all([SourceConfig(uri=str(root))])
    assert sorted(d.metadata["path"] for d in docs) == ["a/x.txt", "link/o.txt"]
    assert [(q.reason, Path(q.location).name) for q in quarantine] == [("symlink_loop", "loop")]


def test_fifo_and_special_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.txt").write_text("a text\n")
    os.mkfifo(tmp_path / "pipe.txt")
    result: dict = {}
    reader = threading.Thread(target=lambda: result.update(out=read_all([SourceConfig(uri=str(tmp_path))])), daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert not reader.is_alive(), "reading a FIFO hung"
    docs, quarantine = result["out"]
    assert [d.text for d in docs] == ["a text\n"]
    assert [(q.reason, Path(q.location).name) for q in quarantine] == [("not_a_regular_file", "pipe.txt")]
    assert "FIFO" in quarantine[0].detail
    with pytest.raises(SourceError, match="not a regular file"):
        plan_shards([SourceConfig(uri=str(tmp_path / "pipe.txt"))])


def test_path_with_a_literal_bracket_is_readable(tmp_path):
    path = tmp_path / "data[1].jsonl"
    path.write_bytes(records(["bracketed"]))
    docs, quarantine = read_all([SourceConfig(uri=str(path))])
    assert [d.text for d in docs] == ["bracketed"] and not quarantine
    docs, _ = read_all([SourceConfig(uri=path.as_uri())])
    assert [d.text for d in docs] == ["bracketed"]


# ---------------------------------------------------------------- encodings and layouts
def test_utf8_bom_keeps_the_first_jsonl_record(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + records(["first", "second"]))
    docs, quarantine = read_all([SourceConfig(uri=str(path))])
    assert [d.text for d in docs] == ["first", "second"] and not quarantine


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_text_is_detected_and_decoded(tmp_path, encoding):
    text = "Grüße aus Köln.\nA second line of ordinary prose, long enough to sniff.\n"
    (tmp_path / "u.txt").write_bytes(text.encode(encoding))  # "utf-16" writes a BOM, -le/-be do not
    docs, quarantine = read_all([SourceConfig(uri=str(tmp_path / "u.txt"))])
    assert not quarantine and [d.text for d in docs] == [text]
    assert docs[0].metadata["encoding"].startswith("utf-16")


def test_utf16_jsonl_with_a_bom_is_decoded(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(records(["Köln", "second"]).decode().encode("utf-16"))
    docs, quarantine = read_all([SourceConfig(uri=str(path))])
    assert [d.text for d in docs] == ["Köln", "second"] and not quarantine


def test_json_array_of_records_is_read_as_records(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}, {"title": "none"}, "str"]))
    (tmp_path / "package.json").write_text(json.dumps({"name": "pkg", "version": "1.0"}))  # config, not records
    docs, quarantine = read_all([SourceConfig(uri=str(tmp_path))])
    assert [(d.text, d.metadata["position"]) for d in docs if d.metadata["path"] == "arr.json"] == [("one", 0), ("two", 1)]
    assert [d.metadata["path"] for d in docs if d.metadata["path"] != "arr.json"] == ["package.json"]
    assert [(q.reason, q.location.rsplit("#", 1)[1]) for q in quarantine] == [
        ("missing_text_field", "item=2"), ("not_an_object", "item=3")]


# ---------------------------------------------------------------- whole runs
def test_empty_input_set_says_no_input_documents(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.jsonl").write_bytes(b"")
    store = LocalStore(tmp_path / "store")
    for uri in (tmp_path / "empty", tmp_path / "empty.jsonl"):
        for steps in (None, ["normalize", "exact_dedup"]):  # with and without the perplexity reference
            config = CurateConfig(sources=[SourceConfig(uri=str(uri))], **({"steps": steps} if steps else {}))
            with pytest.raises(CurationError, match="no input documents"):
                run_curation(config, store, output_prefix=f"x/{uri.name}-{bool(steps)}", num_workers=1, progress=False)
            assert not store.artifact_exists(f"x/{uri.name}-{bool(steps)}")


def test_a_run_over_every_bad_input_goes_on_and_counts_them(tmp_path):
    """The cases that crashed or hung a whole run, together: the run completes and the funnel balances."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "in"
    root.mkdir()
    (root / "s.jsonl").write_bytes(b'{"text": "surrogate \\ud800"}\n' + records(["plain words in a line"]))
    pq.write_table(pa.table({"text": ["parquet words"]}), root / "ok.parquet")
    (root / "bad.parquet").write_bytes(b"PAR1 not really")
    data = zstandard.ZstdCompressor().compress(records(_compressible(50)))
    (root / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])
    os.mkfifo(root / "fifo")
    store = LocalStore(tmp_path / "store")
    config = CurateConfig(sources=[SourceConfig(uri=str(root))], steps=["normalize", "exact_dedup"])
    result = run_curation(config, store, output_prefix="x/bad", num_workers=1, progress=False)
    assert result.num_docs_out == 2
    assert result.stats["quarantined"]["by_reason"] == {
        "lone_surrogate": 1, "not_a_regular_file": 1, "truncated": 1, "unreadable": 1}
    # the .zst's rest and the unopenable Parquet file stand for records nobody can count
    assert result.stats["quarantined"]["lost"]["records_unknown"] == 2
    assert result.num_docs_out + result.num_excluded + result.num_quarantined == result.num_docs_in
