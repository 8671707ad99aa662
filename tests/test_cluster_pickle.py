"""Stores travel to Ray workers by their settings: an ``S3Store`` pickles without its minio client
(thread locks, sockets) and rebuilds it on the other side; curation against a real S3 server (moto on
loopback) with 2 Ray workers gives the same artefact as with one."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import moto_s3_server, settings_s3_store  # noqa: E402

from moeflow.platform.store import LocalStore  # noqa: E402

pytestmark = [pytest.mark.service, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def moto():
    with moto_s3_server() as server:
        yield server


@pytest.fixture
def s3_env(moto, tmp_path, monkeypatch):
    return settings_s3_store(moto, tmp_path / "home", monkeypatch, "cluster-pickle")


def test_s3_store_pickles_by_its_settings_and_works_after(s3_env):
    store = s3_env
    store.put_bytes("a/b.txt", b"hello")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.client is not store.client  # a fresh client, not a shared lock
    assert (clone.config, clone.bucket, clone.root_uri) == (store.config, store.bucket, store.root_uri)
    assert clone.get_bytes("a/b.txt") == b"hello"
    clone.put_bytes("a/c.txt", b"from the clone")
    assert store.get_bytes("a/c.txt") == b"from the clone"
    assert len(pickle.dumps(store)) < 2000  # settings only: no pool, no buffers


def test_local_store_pickles(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.put_bytes("k", b"v")
    assert pickle.loads(pickle.dumps(store)).get_bytes("k") == b"v"


def _write_raw(store, n_files: int = 4, per_file: int = 30) -> None:
    for f in range(n_files):
        rows = [json.dumps({"text": f"document {f}-{i}: " + " ".join(f"w{(f * 7 + i * j) % 53}" for j in range(40))})
                for i in range(per_file)]
        rows += rows[:3]  # exact duplicates for dedup to find
        store.put_bytes(f"raw/web/part{f}.jsonl.gz", gzip.compress(("\n".join(rows) + "\n").encode()))


@pytest.mark.slow
def test_curation_on_s3_with_two_ray_workers_matches_one_worker(s3_env, monkeypatch):
    """The reported bug: `cannot pickle '_thread.lock'` as soon as a ShardTask went to a Ray worker."""
    import ray

    from moeflow.platform.data.curate import CurateConfig, run_curation
    from moeflow.platform.data.sources import SourceConfig

    store = s3_env
    _write_raw(store)
    config = CurateConfig(sources=[SourceConfig(uri="s3://cluster-pickle/raw/web")],
                          steps=["normalize", "exact_dedup", "near_dedup", "pii"], files_per_shard=1)
    one = run_curation(config, store, output_prefix="datasets/one/curated", num_workers=1, progress=False)
    monkeypatch.setenv("RAY_ADDRESS", "local")  # our own Ray, never another session's cluster
    from moeflow.platform.compute import ensure_ray

    ensure_ray()  # conftest bounds it: 2 CPUs, 256 MB object store; workers inherit the S3 env
    try:
        two = run_curation(config, store, output_prefix="datasets/two/curated", num_workers=2, progress=False)
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    assert two.num_shards == 4 and two.num_tasks_run >= 4
    assert two.content_hash == one.content_hash
    assert two.num_docs_out == one.num_docs_out < one.num_docs_in
    assert two.uri.startswith("s3://cluster-pickle/")
