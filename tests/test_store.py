"""Object store behaviour, each test run against a local directory AND a real S3 server.

The S3 side is moto's S3 HTTP server on loopback (one per module), reached through the
real minio SDK. Failure tests put a real TCP fault proxy in front of it (503s, resets,
hangs, truncated answers) or stop the server mid-upload: no client code is mocked.
S3-only behaviour (buckets, credentials, network failures) is in the second half.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from moeflow.platform.settings import Settings
from moeflow.platform.store import (
    MANIFEST_NAME,
    ArtifactExistsError,
    AuthError,
    BucketNotFoundError,
    ChecksumError,
    InvalidKeyError,
    LocalStore,
    NotFoundError,
    StoreError,
    TransientError,
    open_store,
    read_artifact,
    store_for_uri,
)
from moeflow.platform.store.artifact import content_hash
from moeflow.platform.store.s3 import RetryPolicy, S3Config, S3Store
from s3server import FaultProxy, MotoS3, moto_s3_server

MIB = 1 << 20
S3_LOG = "moeflow.platform.store.s3"
FAST_RETRY = RetryPolicy(tries=3, base_delay_s=0.01, max_delay_s=0.05)

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def moto():
    with moto_s3_server() as server:
        yield server


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))


def s3_settings(moto: MotoS3, bucket: str, **kw) -> Settings:
    base = dict(
        home=Path(os.environ["MOEFLOW_HOME"]),
        s3_endpoint=moto.endpoint,
        s3_bucket=bucket,
        s3_access_key="test-key",
        s3_secret_key="test-secret",
        s3_region="us-east-1",
    )
    return Settings(**(base | kw))


def new_bucket() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def make_s3_store(endpoint: str, bucket: str, **kw) -> S3Store:
    cfg = dict(access_key="test-key", secret_key="test-secret", region="us-east-1", part_size=5 * MIB, retry=FAST_RETRY)
    return S3Store(S3Config(endpoint=endpoint, **(cfg | kw)), bucket)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.service)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    moto = request.getfixturevalue("moto")
    store = make_s3_store(moto.endpoint, new_bucket())
    assert store.ensure_bucket() is True
    return store


def random_bytes(n: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- objects (both backends)
def test_bytes_round_trip_and_uris(store):
    store.put_bytes("a/b/c.bin", b"\x00hello")
    assert store.get_bytes("a/b/c.bin") == b"\x00hello"
    store.put_bytes("a/b/c.bin", b"replaced")  # overwrite in place
    assert store.get_bytes("a/b/c.bin") == b"replaced"
    assert store.size("a/b/c.bin") == 8

    uri = store.uri("a/b/c.bin")
    assert uri == f"{store.root_uri}/a/b/c.bin"
    assert store.root_uri.startswith("file:///" if isinstance(store, LocalStore) else "s3://t-")
    assert store.key_for_uri(uri) == "a/b/c.bin"
    with store.open("a/b/c.bin") as fh:
        assert fh.read(3) == b"rep" and fh.read() == b"laced"

    store.put_json("cfg.json", {"x": [1, 2]})
    assert store.get_json("cfg.json") == {"x": [1, 2]}
    store.put_stream("s.bin", io.BytesIO(b"streamed"))
    assert store.get_bytes("s.bin") == b"streamed"


def test_store_for_uri_round_trip(store, moto):
    store.put_bytes("x/y.txt", b"1")
    settings = s3_settings(moto, getattr(store, "bucket", "unused"))
    other, key = store_for_uri(store.uri("x/y.txt"), settings)
    assert type(other) is type(store)
    assert other.get_bytes(key) == b"1"
    assert other.uri(key) == store.uri("x/y.txt")


def test_large_file_streams_multipart(store, tmp_path):
    data = random_bytes(20 * 1000 * 1000, seed=1)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store.put_file("big/file.bin", src)

    if isinstance(store, S3Store):  # really a multipart upload with 5 MiB parts
        etag = store.client.stat_object(store.bucket, "big/file.bin").etag
        assert etag.endswith("-4"), etag

    dest = store.get_file("big/file.bin", tmp_path / "out" / "copy.bin")
    assert dest.read_bytes() == data
    digest, total = hashlib.sha256(), 0
    with store.open("big/file.bin") as fh:
        while chunk := fh.read(3 * MIB):
            digest.update(chunk)
            total += len(chunk)
    assert (total, digest.hexdigest()) == (len(data), sha(data))
    assert [p.name for p in dest.parent.iterdir()] == ["copy.bin"]  # no temp file left


def test_list_exists_delete(store):
    for key in ["d/a/1", "d/a/2", "d/ab/3", "d/z", "e/1"]:
        store.put_bytes(key, key.encode())
    assert store.list("d") == ["d/a/1", "d/a/2", "d/ab/3", "d/z"]
    assert store.list("d/a") == ["d/a/1", "d/a/2"]  # a folder: not d/ab
    assert store.list("d/a/") == ["d/a/1", "d/a/2"]
    assert store.list("d/z") == ["d/z"]
    assert store.list("nothing") == []
    assert store.list("") == ["d/a/1", "d/a/2", "d/ab/3", "d/z", "e/1"]

    assert store.exists("d/a/1") and not store.exists("d/a") and not store.exists("d/a/9")
    store.delete("d/a/1")
    store.delete("d/a/1")  # idempotent
    assert not store.exists("d/a/1")
    assert store.delete_prefix("d/a") == 1
    assert store.list("d") == ["d/ab/3", "d/z"]
    assert store.delete_prefix("d") == 2
    assert store.list("") == ["e/1"]


def test_missing_key_names_uri(store, tmp_path):
    uri = store.uri("no/such/key")
    for op in (
        lambda: store.get_bytes("no/such/key"),
        lambda: store.open("no/such/key"),
        lambda: store.get_file("no/such/key", tmp_path / "x"),
        lambda: store.size("no/such/key"),
    ):
        with pytest.raises(NotFoundError) as info:
            op()
        assert uri in str(info.value) and info.value.uri == uri
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/", "a\\b"])
def test_invalid_keys(store, key):
    with pytest.raises(InvalidKeyError):
        store.put_bytes(key, b"x")


# ---------------------------------------------------------------- artefacts (both backends)
def test_artifact_visible_only_after_commit(store, tmp_path):
    (tmp_path / "w.bin").write_bytes(b"w" * 1000)
    with store.write_artifact("models/m1", metadata={"step": 1}) as w:
        w.put_bytes("a.txt", b"alpha")
        w.put_json("sub/cfg.json", {"lr": 0.1})
        w.put_file("w.bin", tmp_path / "w.bin")
        w.put_stream("s.bin", io.BytesIO(b"stream"))
        w.metadata["tokens"] = 123
        # written but not committed: readers see nothing
        assert not store.artifact_exists("models/m1")
        with pytest.raises(NotFoundError, match="no committed artefact"):
            store.read_artifact("models/m1")
        assert not store.exists("models/m1/a.txt")

    assert w.uri == store.uri("models/m1")
    assert store.artifact_exists("models/m1") and store.artifact_exists(w.uri)
    art = store.read_artifact(w.uri)
    assert art.names() == ["a.txt", "s.bin", "sub/cfg.json", "w.bin"]
    assert art.metadata == {"step": 1, "tokens": 123}
    assert art.get_bytes("a.txt") == b"alpha" and art.get_json("sub/cfg.json") == {"lr": 0.1}
    with art.open("w.bin") as fh:
        assert fh.read() == b"w" * 1000
    assert art.manifest["files"]["a.txt"] == {"size": 5, "sha256": sha(b"alpha")}
    assert art.created_at and art.manifest["format"] == "moeflow-artifact/1"
    assert store.list("models/m1") == sorted(
        ["models/m1/" + n for n in ["a.txt", "s.bin", "sub/cfg.json", "w.bin", MANIFEST_NAME]]
    )
    # content hash: sha256 over sorted (name, sha256) pairs, independent of metadata
    expected = hashlib.sha256(
        "".join(f"{n}\0{art.files[n]['sha256']}\n" for n in sorted(art.files)).encode()
    ).hexdigest()
    assert art.content_hash == w.content_hash == expected
    with store.write_artifact("models/m2", metadata={"other": True}) as w2:
        for name in art.names():
            w2.put_bytes(name, art.get_bytes(name))
    assert store.read_artifact("models/m2").content_hash == art.content_hash
    assert read_artifact(w.uri, s3_settings_or_none(store)).names() == art.names()


def s3_settings_or_none(store):
    if isinstance(store, S3Store):
        return Settings(s3_endpoint=store.config.endpoint, s3_bucket=store.bucket, s3_access_key="k",
                        s3_secret_key="s", s3_region="us-east-1")
    return None


def test_artifact_overwrite(store):
    with store.write_artifact("ds/v") as w:
        w.put_bytes("old.txt", b"old")
        w.put_bytes("same.txt", b"1")
    with pytest.raises(ArtifactExistsError, match=w.uri):
        store.write_artifact("ds/v").__enter__()

    # a failed overwrite leaves the old artefact fully readable
    with pytest.raises(RuntimeError):
        with store.write_artifact("ds/v", overwrite=True) as w:
            w.put_bytes("new.txt", b"new")
            raise RuntimeError("boom")
    assert store.read_artifact("ds/v").get_bytes("old.txt") == b"old"
    assert not any(".tmp-" in k for k in store.list("ds/v"))

    with store.write_artifact("ds/v", overwrite=True) as w:
        w.put_bytes("new.txt", b"new")
        w.put_bytes("same.txt", b"2")
    art = store.read_artifact("ds/v")
    assert art.names() == ["new.txt", "same.txt"] and art.get_bytes("same.txt") == b"2"
    assert store.list("ds/v") == ["ds/v/MANIFEST.json", "ds/v/new.txt", "ds/v/same.txt"]


def test_corruption_detected(store, tmp_path):
    with store.write_artifact("c/a") as w:
        w.put_bytes("data.bin", b"0123456789")
        w.put_bytes("ok.bin", b"fine")
    art = store.read_artifact("c/a")
    store.put_bytes("c/a/data.bin", b"0123456780")  # same size, one byte flipped
    with pytest.raises(ChecksumError, match="c/a/data.bin"):
        art.get_bytes("data.bin")
    with pytest.raises(ChecksumError):
        with art.open("data.bin") as fh:
            fh.read()
    with pytest.raises(ChecksumError):
        art.download(tmp_path / "dl")
    assert not (tmp_path / "dl" / "data.bin").exists()
    assert (tmp_path / "dl" / "ok.bin").read_bytes() == b"fine"
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["ok.bin"]  # no temp files

    store.put_bytes("c/a/data.bin", b"012")  # truncated
    with pytest.raises(ChecksumError):
        art.get_bytes("data.bin")
    store.put_bytes("c/a/MANIFEST.json", b"{not json")
    with pytest.raises(ChecksumError, match="malformed"):
        store.read_artifact("c/a")


def test_download_skips_valid_files(store, tmp_path):
    with store.write_artifact("dl/a") as w:
        w.put_bytes("x.bin", b"x" * 100)
        w.put_bytes("d/y.bin", b"y" * 100)
    art = store.read_artifact("dl/a")
    out = art.download(tmp_path / "cache")
    assert (out / "d" / "y.bin").read_bytes() == b"y" * 100
    os.utime(out / "x.bin", (1, 1))
    (out / "d" / "y.bin").write_bytes(b"y" * 99 + b"z")  # locally damaged copy
    art.download(out)
    assert os.stat(out / "x.bin").st_mtime == 1  # valid: not fetched again
    assert (out / "d" / "y.bin").read_bytes() == b"y" * 100  # invalid: replaced
    assert art.download(tmp_path / "one", names=["x.bin"]).joinpath("x.bin").exists()
    assert not (tmp_path / "one" / "d").exists()
    with pytest.raises(NotFoundError, match="nope"):
        art.get_bytes("nope")


def test_interrupted_write_invisible_and_rerun_cleans(store):
    with pytest.raises(ValueError):
        with store.write_artifact("run/a") as w:
            w.put_bytes("part-0", b"0" * 100)
            raise ValueError("crash inside the with")
    assert store.list("run/a") == []  # staging removed on abort
    assert not store.artifact_exists("run/a")

    # leftovers of writers that died without cleaning up: staged files + files in place
    w = store.write_artifact("run/a")
    w.begin()
    w.put_bytes("part-0", b"stale")
    store.put_bytes("run/a/part-9", b"orphan without manifest")
    assert any(".tmp-" in k for k in store.list("run/a"))
    with pytest.raises(NotFoundError):
        store.read_artifact("run/a")

    with store.write_artifact("run/a") as w2:
        w2.put_bytes("part-0", b"fresh")
    assert store.list("run/a") == ["run/a/MANIFEST.json", "run/a/part-0"]
    assert store.read_artifact("run/a").get_bytes("part-0") == b"fresh"


def test_nested_artifacts_survive_cleanup(store):
    with store.write_artifact("p/inner") as w:
        w.put_bytes("f", b"inner")
    store.put_bytes("p/leftover", b"x")  # uncommitted outer artefact's leftovers
    with store.write_artifact("p") as w:
        w.put_bytes("outer", b"o")
    assert store.read_artifact("p/inner").get_bytes("f") == b"inner"
    assert not store.exists("p/leftover")


@pytest.mark.parametrize("name", [MANIFEST_NAME, "sub/MANIFEST.json", ".tmp-x/f", "../f", "/f"])
def test_artifact_names_validated(store, name):
    with store.write_artifact("names/a") as w:
        with pytest.raises(InvalidKeyError):
            w.put_bytes(name, b"x")


_KILLED_WRITER = textwrap.dedent(
    """
    import json, sys, time
    from moeflow.platform.store import LocalStore
    from moeflow.platform.store.s3 import S3Config, S3Store
    spec = json.loads(sys.argv[1])
    if spec["kind"] == "local":
        store = LocalStore(spec["root"])
    else:
        store = S3Store(S3Config(spec["endpoint"], "k", "s", region="us-east-1"), spec["bucket"])
    w = store.write_artifact("killed/art", metadata={"try": 1})
    w.begin()
    w.put_bytes("a.bin", b"a" * 1000)
    w.put_bytes("b/c.bin", b"c" * 1000)
    print("staged", flush=True)
    time.sleep(120)
    """
)


def test_killed_writer_leaves_nothing_visible(store):
    spec = (
        {"kind": "local", "root": str(store.root)}
        if isinstance(store, LocalStore)
        else {"kind": "s3", "endpoint": store.config.endpoint, "bucket": store.bucket}
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, json.dumps(spec)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "staged"
    finally:
        proc.kill()  # SIGKILL: no cleanup code runs
        proc.wait(timeout=10)
    assert store.list("killed/art")  # the dead writer's staged files are there...
    assert not store.artifact_exists("killed/art")  # ...but no reader sees them
    with pytest.raises(NotFoundError):
        store.read_artifact("killed/art")
    with store.write_artifact("killed/art") as w:
        w.put_bytes("a.bin", b"A")
    assert store.list("killed/art") == ["killed/art/MANIFEST.json", "killed/art/a.bin"]


# ---------------------------------------------------------------- settings / factory
@pytest.mark.service
def test_open_store_from_settings(moto, tmp_path):
    local = open_store(Settings(home=tmp_path / "h"))
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "h" / "store").resolve()

    bucket = new_bucket()
    settings = s3_settings(moto, bucket)
    lazy = open_store(settings)  # bucket missing and not created
    with pytest.raises(BucketNotFoundError, match=f"s3://{bucket}"):
        lazy.put_bytes("k", b"v")
    store = open_store(settings, create_bucket=True)
    assert isinstance(store, S3Store) and store.root_uri == f"s3://{bucket}"
    store.put_bytes("k", b"v")
    assert lazy.get_bytes("k") == b"v"
    assert open_store(settings, create_bucket=True).get_bytes("k") == b"v"  # idempotent

    with pytest.raises(StoreError, match="MOEFLOW_S3_ENDPOINT"):
        store_for_uri("s3://b/k", Settings(home=tmp_path / "h"))
    with pytest.raises(StoreError, match="unsupported store URI"):
        store_for_uri("gs://b/k")


def test_store_for_file_uri_outside_store_root(tmp_path):
    settings = Settings(home=tmp_path / "h")
    ext = tmp_path / "elsewhere" / "thing.bin"
    ext.parent.mkdir()
    ext.write_bytes(b"data")
    store, key = store_for_uri(ext.as_uri(), settings)
    assert store.get_bytes(key) == b"data" and store.uri(key) == ext.as_uri()
    inside, key = store_for_uri((tmp_path / "h" / "store" / "a" / "b").as_uri(), settings)
    assert key == "a/b" and inside.root == (tmp_path / "h" / "store").resolve()


# ---------------------------------------------------------------- S3: buckets and credentials
@pytest.mark.service
def test_missing_bucket_names_bucket(moto):
    store = make_s3_store(moto.endpoint, "no-such-bucket-here")
    for op in (
        lambda: store.get_bytes("k"),
        lambda: store.exists("k"),
        lambda: store.size("k"),
        lambda: store.list("x"),
        lambda: store.put_bytes("k", b"v"),
        lambda: store.read_artifact("a"),
        lambda: store.artifact_exists("a"),
    ):
        with pytest.raises(BucketNotFoundError) as info:
            op()
        assert "s3://no-such-bucket-here" in str(info.value) and "create_bucket=True" in str(info.value)
    with pytest.raises(StoreError, match="invalid S3 bucket name"):
        make_s3_store(moto.endpoint, "Bad_Bucket")


@pytest.mark.service
def test_wrong_credentials_raise_auth_error_without_retry(moto, caplog):
    """moto checks SigV4 signatures against its IAM users once auth is switched on."""
    bucket = new_bucket()
    with moto.iam_auth() as (access_key, secret_key):
        good = make_s3_store(moto.endpoint, bucket, access_key=access_key, secret_key=secret_key)
        good.ensure_bucket()
        good.put_bytes("k", b"v")
        assert good.get_bytes("k") == b"v"

        for ak, sk, code in [("AKIAWRONGWRONGWRONG1", "x", "InvalidAccessKeyId"), (access_key, "wrong", "SignatureDoesNotMatch")]:
            bad = make_s3_store(moto.endpoint, bucket, access_key=ak, secret_key=sk,
                                retry=RetryPolicy(tries=4, base_delay_s=0.01))
            with caplog.at_level(logging.WARNING, logger=S3_LOG):
                for op in (lambda: bad.get_bytes("k"), lambda: bad.put_bytes("k2", b"x"), lambda: bad.list(""),
                           lambda: bad.exists("k")):
                    with pytest.raises(AuthError) as info:
                        op()
                    assert bucket in str(info.value) and "credentials" in str(info.value)
                with pytest.raises(AuthError, match=code):
                    bad.get_bytes("k")
            assert not [r for r in caplog.records if "retry" in r.getMessage()]  # raised at once
    assert good.get_bytes("k") == b"v"  # auth off again: anything goes


# ---------------------------------------------------------------- S3: transient failures
@pytest.fixture
def proxied(moto):
    """(direct store, proxy) for one fresh bucket; stores built per case get fresh connections."""
    bucket = new_bucket()
    direct = make_s3_store(moto.endpoint, bucket)
    direct.ensure_bucket()
    with FaultProxy(moto.endpoint, hang_s=3.0) as proxy:
        yield direct, proxy


def retries_logged(caplog) -> int:
    return len([r for r in caplog.records if r.name == S3_LOG and ("retry" in r.getMessage() or "resum" in r.getMessage())])


@pytest.mark.service
def test_503_and_resets_are_retried(proxied, tmp_path, caplog):
    direct, proxy = proxied
    direct.put_bytes("k", b"value")
    caplog.set_level(logging.WARNING, logger=S3_LOG)

    proxy.fail_next(2, "503")
    store = make_s3_store(proxy.endpoint, direct.bucket)
    assert store.get_bytes("k") == b"value"
    assert proxy.faults_served == ["503", "503"] and retries_logged(caplog) == 2

    proxy.fail_next(2, "reset")
    data = random_bytes(7 * MIB, seed=2)  # two-part multipart upload through resets
    (tmp_path / "f").write_bytes(data)
    store = make_s3_store(proxy.endpoint, direct.bucket)
    store.put_file("big", tmp_path / "f")
    assert proxy.faults_served[2:] == ["reset", "reset"] and retries_logged(caplog) >= 3
    assert sha(direct.get_bytes("big")) == sha(data)


@pytest.mark.service
def test_retries_give_up_with_clear_error(proxied):
    direct, proxy = proxied
    direct.put_bytes("k", b"value")
    proxy.fail_next(10, "503")
    store = make_s3_store(proxy.endpoint, direct.bucket, retry=RetryPolicy(tries=3, base_delay_s=0.01))
    with pytest.raises(TransientError) as info:
        store.get_bytes("k")
    assert store.uri("k") in str(info.value) and "after 3 attempt" in str(info.value)
    assert proxy.faults_served == ["503"] * 3


@pytest.mark.service
def test_timeout_is_retried(proxied):
    direct, proxy = proxied
    direct.put_bytes("k", b"value")
    proxy.fail_next(1, "hang")
    store = make_s3_store(proxy.endpoint, direct.bucket, read_timeout_s=0.3)
    start = time.monotonic()
    assert store.get_bytes("k") == b"value"
    assert 0.25 < time.monotonic() - start < 3.0 and proxy.faults_served == ["hang"]


@pytest.mark.service
def test_open_resumes_after_dropped_connection(proxied, caplog):
    direct, proxy = proxied
    data = random_bytes(3 * MIB, seed=3)
    direct.put_bytes("obj", data)
    proxy.truncate_bytes = MIB
    proxy.fail_next(1, "truncate")
    caplog.set_level(logging.WARNING, logger=S3_LOG)
    store = make_s3_store(proxy.endpoint, direct.bucket)
    with store.open("obj") as fh:
        assert sha(fh.read()) == sha(data)
    assert proxy.faults_served == ["truncate"] and retries_logged(caplog) == 1

    # the object changes under a reader whose connection drops: it must not splice versions
    proxy.fail_next(1, "truncate")
    store = make_s3_store(proxy.endpoint, direct.bucket)
    with store.open("obj") as fh:
        direct.put_bytes("obj", random_bytes(3 * MIB, seed=4))
        with pytest.raises(StoreError, match="PreconditionFailed"):
            fh.read()


class _GatedStream(io.RawIOBase):
    """A seekable stream that blocks once at byte ``gate_at`` until ``release`` is set."""

    def __init__(self, data: bytes, gate_at: int):
        self._buf = io.BytesIO(data)
        self.gate_at = gate_at
        self.reached, self.release = threading.Event(), threading.Event()

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self._buf.seek(offset, whence)

    def tell(self):
        return self._buf.tell()

    def readinto(self, buf):
        if not self.release.is_set() and self._buf.tell() >= self.gate_at:
            self.reached.set()
            self.release.wait(30)
        data = self._buf.read(len(buf))
        buf[: len(data)] = data
        return len(data)


@pytest.mark.service
def test_server_stopped_mid_upload(tmp_path):
    from moto.s3.models import s3_backends
    from s3server import DEFAULT_ACCOUNT_ID

    server = MotoS3().start()
    try:
        bucket = new_bucket()
        store = make_s3_store(server.endpoint, bucket, parallel_uploads=1, connect_timeout_s=1.0)
        store.ensure_bucket()
        part = store.config.part_size
        data = random_bytes(20 * 1000 * 1000, seed=5)
        stream = _GatedStream(data, gate_at=2 * part + 1)  # parts 1 and 2 are uploaded by then
        errors: list[BaseException] = []

        def write() -> None:
            try:
                with store.write_artifact("ckpt/step-1") as w:
                    w.put_bytes("config.json", b"{}")
                    w.put_stream("weights.bin", stream)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        assert stream.reached.wait(20)
        uploads = s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[bucket].multiparts
        assert [len(u.parts) for u in uploads.values()] == [2]  # a multipart upload is open
        server.stop()
        stream.release.set()
        writer.join(30)
        assert not writer.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], TransientError), errors
        assert f"s3://{bucket}/ckpt/step-1/.tmp-" in str(errors[0])

        server.start()  # same port, moto's data survives
        assert not store.artifact_exists("ckpt/step-1")
        with pytest.raises(NotFoundError):
            store.read_artifact("ckpt/step-1")
        leftovers = store.list("ckpt/step-1")
        assert leftovers and all("/.tmp-" in k for k in leftovers) and not any("weights" in k for k in leftovers)

        (tmp_path / "w.bin").write_bytes(data)
        with store.write_artifact("ckpt/step-1") as w:
            w.put_bytes("config.json", b"{}")
            w.put_file("weights.bin", tmp_path / "w.bin")
        assert store.list("ckpt/step-1") == [f"ckpt/step-1/{n}" for n in ("MANIFEST.json", "config.json", "weights.bin")]
        assert sha(store.read_artifact("ckpt/step-1").get_bytes("weights.bin")) == sha(data)
    finally:
        server.stop()
