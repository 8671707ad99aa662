"""Sources and the curated artefact through a real S3 HTTP server (moto on loopback)."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import moto_s3_server, settings_s3_store  # noqa: E402

from moeflow.platform.data.curate import CurateConfig, run_curation  # noqa: E402
from moeflow.platform.data.documents import iter_artifact_documents  # noqa: E402
from moeflow.platform.data.schema import QuarantineRecord  # noqa: E402
from moeflow.platform.data.sources import SourceConfig, SourceError, iter_shard, plan_shards  # noqa: E402

pytestmark = [pytest.mark.service, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def moto():
    with moto_s3_server() as server:
        yield server


@pytest.fixture
def s3_store(moto, tmp_path, monkeypatch):
    return settings_s3_store(moto, tmp_path / "home", monkeypatch, "curation-test")


def test_s3_sources_and_s3_output(s3_store):
    lines = [json.dumps({"text": f"record number {i} is here."}).encode() for i in range(5)] + [b"{oops"]
    s3_store.put_bytes("raw/web/a.jsonl.gz", gzip.compress(b"\n".join(lines) + b"\n"))
    s3_store.put_bytes("raw/code/x.py", b"print('x')\n")
    s3_store.put_bytes("raw/code/y.py", b"print('y')\n")
    s3_store.put_bytes("raw/code/z.bin", b"\x00\x00binary")

    sources = [SourceConfig(uri="s3://curation-test/raw/web/*.jsonl.gz"), SourceConfig(uri="s3://curation-test/raw/code")]
    shards = plan_shards(sources, records_per_shard=4)
    items = [it for s in shards for it in iter_shard(s, 1 << 20)]
    docs = [d for d in items if not isinstance(d, QuarantineRecord)]
    quarantine = [q for q in items if isinstance(q, QuarantineRecord)]
    assert [d.text for d in docs][:5] == [f"record number {i} is here." for i in range(5)]
    assert {q.reason for q in quarantine} == {"malformed_json", "binary"}
    assert docs[0].metadata["source_uri"] == "s3://curation-test/raw/web/a.jsonl.gz"
    with pytest.raises(SourceError, match="raw/nothing"):
        plan_shards([SourceConfig(uri="s3://curation-test/raw/nothing")])

    config = CurateConfig(sources=sources, steps=["normalize", "exact_dedup", "pii"], records_per_shard=4)
    result = run_curation(config, s3_store, output_prefix="datasets/s3/curated/x", num_workers=1, progress=False)
    assert result.uri == "s3://curation-test/datasets/s3/curated/x"
    assert result.num_docs_out + result.num_excluded + result.num_quarantined == result.num_docs_in == 9
    out = list(iter_artifact_documents(result.uri))
    assert len(out) == result.num_docs_out == 7


def test_s3_inputs_fingerprint_follows_etags(s3_store):
    from moeflow.platform.data.fingerprint import file_version
    from moeflow.platform.data.sources import inputs_fingerprint

    s3_store.put_bytes("fp/a.txt", b"first version\n")
    sources = [SourceConfig(uri="s3://curation-test/fp")]
    first = inputs_fingerprint(sources)
    version = file_version("s3://curation-test/fp/a.txt")
    assert version.startswith("size:14,etag:") and len(version) > len("size:14,etag:")
    assert inputs_fingerprint(sources) == first
    s3_store.put_bytes("fp/a.txt", b"other version\n")  # same size, new content: new ETag
    assert inputs_fingerprint(sources) != first
    s3_store.put_bytes("fp/b.txt", b"added\n")
    assert len({first, inputs_fingerprint(sources)}) == 2
