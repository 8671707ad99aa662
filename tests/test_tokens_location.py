"""A token artefact's content identity does not depend on where its inputs live: the same curated data
tokenized from a local store (``file://``) and from a real S3 server (moto on loopback, ``s3://``) gives
the same content hash, the URIs being lineage in the manifest metadata (merged back into
``TokenDataset.meta``). Artefacts written before, with the URIs in meta.json, still load and resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import moto_s3_server, settings_s3_store  # noqa: E402
from test_data_tokens import CFG, make_docs, write_curated  # noqa: E402

from moeflow.platform.data.shards import META_NAME, TokenDataset  # noqa: E402
from moeflow.platform.data.tokenize import run_tokenize  # noqa: E402
from moeflow.platform.store import LocalStore  # noqa: E402

pytestmark = [pytest.mark.service, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def moto():
    with moto_s3_server() as server:
        yield server


@pytest.fixture
def s3_store(moto, tmp_path, monkeypatch):
    return settings_s3_store(moto, tmp_path / "home", monkeypatch, "tokens-location")


def test_same_curated_data_gives_the_same_token_hash_in_s3_and_locally(s3_store, tmp_path):
    local = LocalStore(tmp_path / "local")
    docs = make_docs(60)
    results = {}
    for name, store in (("s3", s3_store), ("local", local)):
        curated_uri = write_curated(store, docs)
        results[name] = (store, curated_uri, run_tokenize(CFG, store, curated_uri=curated_uri,
                                                          output_prefix="datasets/t/tokens", num_workers=1,
                                                          progress=False))
    (s3, s3_curated, on_s3), (_, local_curated, on_local) = results["s3"], results["local"]
    assert on_s3.uri.startswith("s3://") and on_local.uri.startswith("file://")
    assert on_s3.content_hash == on_local.content_hash
    # meta.json names its inputs by content; the locations are lineage in the manifest metadata
    meta = s3.read_artifact(on_s3.uri).get_json(META_NAME)
    assert not {k for k in meta if k.endswith("_uri")}, meta
    assert meta["tokenizer_key"] == s3.key_for_uri(on_s3.tokenizer_uri)
    for store, curated_uri, result in results.values():
        ds = TokenDataset.open(result.uri, "train", cache_dir=tmp_path / "cache")
        assert ds.meta["curated_uri"] == curated_uri and ds.meta["tokenizer_uri"] == result.tokenizer_uri
        assert ds.meta["curated_content_hash"] == store.read_artifact(curated_uri).content_hash
        # a re-run finds the committed artefact and reports the same tokenizer
        again = run_tokenize(CFG, store, curated_uri=curated_uri, output_prefix="datasets/t/tokens", num_workers=1,
                             progress=False)
        assert again.reused and again.tokenizer_uri == result.tokenizer_uri


def test_artefacts_with_uris_in_meta_json_still_load_and_resume(tmp_path):
    """The layout before: meta.json holds curated_uri and tokenizer_uri, the manifest metadata may not."""
    store = LocalStore(tmp_path / "store")
    curated_uri = write_curated(store, make_docs(30))
    new = run_tokenize(CFG, store, curated_uri=curated_uri, output_prefix="datasets/t/tokens", num_workers=1,
                       progress=False)
    art = store.read_artifact(new.uri)
    old_meta = {**art.get_json(META_NAME), "curated_uri": curated_uri, "tokenizer_uri": new.tokenizer_uri}
    old_meta.pop("tokenizer_key")
    prefix = store.key_for_uri(new.uri)
    names = art.names()
    with store.write_artifact(prefix, overwrite=True) as w:  # no lineage in the manifest metadata
        for name in names:
            if name == META_NAME:
                w.put_bytes(name, json.dumps(old_meta).encode())
            else:
                w.put_bytes(name, art.get_bytes(name))
    assert store.read_artifact(new.uri).metadata.get("tokenizer_uri") is None
    ds = TokenDataset.open(new.uri, "val", cache_dir=tmp_path / "cache")
    assert ds.meta["curated_uri"] == curated_uri and ds.meta["tokenizer_uri"] == new.tokenizer_uri
    assert len(ds.document(0)) > 2
    again = run_tokenize(CFG, store, curated_uri=curated_uri, output_prefix="datasets/t/tokens", num_workers=1,
                         progress=False)
    assert again.reused and again.tokenizer_uri == new.tokenizer_uri
