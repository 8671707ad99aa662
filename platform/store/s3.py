"""``S3Store``: the object store on any S3-compatible server through the ``minio`` SDK.

Unusual choices:

- The minio client gets our own urllib3 ``PoolManager`` with short timeouts and urllib3
  retries *off*: minio's default pool retries 5xx silently with 5-minute timeouts, which
  hides outages and doubles up with our retry loop. Here one loop (``RetryPolicy``) is in
  charge: transient failures (connection refused/reset, urllib3 errors, timeouts, 5xx,
  SlowDown/InternalError) are retried with exponential backoff and jitter; auth errors,
  missing buckets and missing keys raise at once, naming the URI.
- Uploads are whole-operation retries: ``put_file`` reopens the file, ``put_stream``
  rewinds a seekable stream (a non-seekable one is not retried). Large objects go as
  multipart uploads of ``part_size`` bytes; minio aborts the upload on failure (if the
  server is still reachable; otherwise the parts stay invisible until the bucket's
  lifecycle rule for incomplete uploads removes them).
- ``open`` returns a reader that resumes after a dropped connection with a ranged GET
  pinned to the object's ETag (``If-Match``), so a long read survives a blip but never
  splices two versions of an object.
- A HEAD on a missing bucket answers a body-less 404 that minio reports as NoSuchKey;
  the first "missing key" of a store instance therefore checks the bucket once.
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

import urllib3
from minio import Minio
from minio.commonconfig import ComposeSource, CopySource
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import check_bucket_name

from .base import ObjectStore
from .errors import AuthError, BucketNotFoundError, NotFoundError, StoreError, TransientError
from .keys import check_key, in_folder, norm_prefix

log = logging.getLogger(__name__)
T = TypeVar("T")

_MIB = 1 << 20
MIN_PART_SIZE = 5 * _MIB  # S3's minimum multipart part size
_MAX_COPY = 5 * 1024 * _MIB  # a single CopyObject handles up to 5 GiB

NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "ResourceNotFound", "NoSuchVersion"}
AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AllAccessDisabled",
    "AccountProblem",
}
TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",  # clock skew settles on a retry only rarely, but costs little
    "OperationAborted",
    "XMinioServerNotInitialized",
}


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: delay_n = base * 2**(n-1) (capped), +-25% jitter."""

    tries: int = 4
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        delay = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return delay * random.uniform(0.75, 1.25)


@dataclass(frozen=True)
class S3Config:
    """Connection settings of one S3-compatible server."""

    endpoint: str  # host:port
    access_key: str | None = None
    secret_key: str | None = None
    secure: bool = False
    region: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    part_size: int = 16 * _MIB
    parallel_uploads: int = 3
    retry: RetryPolicy = RetryPolicy()


def classify(exc: BaseException) -> str:
    """'not_found' | 'auth' | 'transient' | 'error' (other S3 failure) | 'foreign'."""
    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", 0) or 0
        if exc.code in NOT_FOUND_CODES:
            return "not_found"
        if exc.code in AUTH_CODES:
            return "auth"
        if exc.code in TRANSIENT_CODES or status >= 500:
            return "transient"
        return "error"
    if isinstance(exc, ServerError):
        return "transient" if exc.status_code >= 500 else "error"
    if isinstance(exc, InvalidResponseError):  # non-XML answer, e.g. a proxy's 502/503 page
        status = getattr(exc, "_code", 0)
        return "transient" if isinstance(status, int) and status >= 500 else "error"
    if isinstance(exc, MinioException):
        return "error"
    if isinstance(exc, urllib3.exceptions.SSLError):
        return "error"  # a certificate problem does not heal by retrying
    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return "transient"
    return "foreign"


class S3Store(ObjectStore):
    def __init__(self, config: S3Config, bucket: str):
        if config.part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be >= {MIN_PART_SIZE} bytes (S3 minimum), got {config.part_size}")
        try:
            check_bucket_name(bucket, strict=True)
        except ValueError as exc:
            raise StoreError(f"invalid S3 bucket name {bucket!r} (s3://{bucket}): {exc}", f"s3://{bucket}") from None
        self.config = config
        self.bucket = bucket
        self.root_uri = f"s3://{bucket}"
        self._bucket_ok = False
        self.client = self._connect()

    def _connect(self) -> Minio:
        config = self.config
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=config.connect_timeout_s, read=config.read_timeout_s),
            retries=False,  # our RetryPolicy is the only retry loop
            maxsize=max(10, config.parallel_uploads + 2),
            cert_reqs="CERT_REQUIRED" if config.secure else "CERT_NONE",
            ca_certs=os.environ.get("SSL_CERT_FILE") or _certifi_where(),
        )
        return Minio(
            config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key,
            secure=config.secure,
            region=config.region,
            http_client=http,
        )

    # -- pickling: a store travels to Ray workers (curation's ShardTask, training's launch) by
    # its settings; the minio client (thread locks, open sockets) is rebuilt on the other side
    def __getstate__(self) -> dict:
        return {"config": self.config, "bucket": self.bucket}

    def __setstate__(self, state: dict) -> None:
        self.config = state["config"]
        self.bucket = state["bucket"]
        self.root_uri = f"s3://{self.bucket}"
        self._bucket_ok = False
        self.client = self._connect()

    # -- addressing
    def uri(self, key: str) -> str:
        return f"{self.root_uri}/{check_key(key)}"

    def key_for_uri(self, uri: str) -> str:
        if not uri.startswith(self.root_uri + "/"):
            raise StoreError(f"{uri} is not inside the store {self.root_uri}; use store_for_uri()", uri)
        return check_key(uri[len(self.root_uri) + 1 :])

    # -- the one retry loop
    def _call(self, what: str, uri: str, fn: Callable[[], T], retriable: bool = True) -> T:
        policy = self.config.retry
        for attempt in range(1, policy.tries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                kind = classify(exc)
                if kind == "foreign":
                    raise
                if kind != "transient":
                    raise self._error(kind, what, uri, exc) from exc
                if not retriable or attempt == policy.tries:
                    note = "" if retriable else " (stream is not seekable, so it was not retried)"
                    raise TransientError(
                        f"{what} {uri} failed after {attempt} attempt(s){note}: {_describe(exc)}", uri
                    ) from exc
                delay = policy.delay(attempt)
                log.warning("%s %s: %s; retry %d/%d in %.2fs", what, uri, _describe(exc), attempt, policy.tries - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _error(self, kind: str, what: str, uri: str, exc: Exception) -> StoreError:
        code = getattr(exc, "code", None) or type(exc).__name__
        if kind == "not_found":
            if code == "NoSuchBucket":
                return self._missing_bucket(uri)
            return NotFoundError(f"no object at {uri} ({code})", uri)
        if kind == "auth":
            return AuthError(
                f"{what} {uri} was refused ({code}): check the S3 credentials "
                f"(MOEFLOW_S3_ACCESS_KEY / MOEFLOW_S3_SECRET_KEY) for {self.config.endpoint}",
                uri,
            )
        return StoreError(f"{what} {uri} failed: {_describe(exc)}", uri)

    def _missing_bucket(self, uri: str) -> BucketNotFoundError:
        return BucketNotFoundError(
            f"bucket {self.root_uri} does not exist on {self.config.endpoint} (while accessing {uri}); "
            "create it or open the store with open_store(settings, create_bucket=True)",
            self.root_uri,
        )

    def _key_missing(self, key: str) -> NotFoundError:
        """A HEAD 404 cannot tell a missing key from a missing bucket: check once."""
        if not self._bucket_ok:
            if not self._call("check bucket", self.root_uri, lambda: self.client.bucket_exists(self.bucket)):
                return self._missing_bucket(self.uri(key))
            self._bucket_ok = True
        return NotFoundError(f"no object at {self.uri(key)}", self.uri(key))

    # -- bucket
    def ensure_bucket(self) -> bool:
        """Create the bucket if it is missing; True if it was created."""
        if self._call("check bucket", self.root_uri, lambda: self.client.bucket_exists(self.bucket)):
            self._bucket_ok = True
            return False
        try:
            self._call("create bucket", self.root_uri, lambda: self.client.make_bucket(self.bucket, self.config.region))
        except StoreError as exc:
            if "BucketAlreadyOwnedByYou" not in str(exc):  # lost a race with another creator
                raise
        self._bucket_ok = True
        return True

    # -- writes
    def put_bytes(self, key: str, data: bytes) -> None:
        uri = self.uri(key)
        self._call("put", uri, lambda: self.client.put_object(self.bucket, key, io.BytesIO(data), len(data)))

    def put_file(self, key: str, local_path: str | Path) -> None:
        uri = self.uri(key)

        def upload() -> None:
            with open(local_path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                self.client.put_object(
                    self.bucket, key, fh, size,
                    part_size=self.config.part_size, num_parallel_uploads=self.config.parallel_uploads,
                )

        self._call("upload", uri, upload)

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        uri = self.uri(key)
        seekable = stream.seekable()
        start = stream.tell() if seekable else 0
        first = [True]

        def upload() -> None:
            if not first[0]:
                stream.seek(start)
            first[0] = False
            self.client.put_object(
                self.bucket, key, stream, -1,
                part_size=self.config.part_size, num_parallel_uploads=self.config.parallel_uploads,
            )

        self._call("upload", uri, upload, retriable=seekable)

    def _promote(self, src_key: str, dst_key: str) -> None:
        size = self.size(src_key)
        dst_uri = self.uri(dst_key)
        if size <= _MAX_COPY:
            copy = lambda: self.client.copy_object(self.bucket, dst_key, CopySource(self.bucket, src_key))  # noqa: E731
        else:  # compose_object splits a big source into UploadPartCopy requests
            copy = lambda: self.client.compose_object(self.bucket, dst_key, [ComposeSource(self.bucket, src_key)])  # noqa: E731
        self._call("copy", dst_uri, copy)
        self.delete(src_key)

    # -- reads
    def _get(self, key: str, offset: int = 0, etag: str | None = None) -> urllib3.BaseHTTPResponse:
        headers = {"If-Match": etag} if etag else None
        return self._call(
            "get", self.uri(key),
            lambda: self.client.get_object(self.bucket, key, offset=offset, request_headers=headers),
        )

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def open(self, key: str) -> BinaryIO:
        return io.BufferedReader(_ResumingReader(self, key), buffer_size=_MIB)

    def get_file(self, key: str, local_path: str | Path) -> Path:
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part-{uuid.uuid4().hex[:12]}")
        try:
            with self.open(key) as src, open(tmp, "wb") as fh:
                while chunk := src.read(8 * _MIB):
                    fh.write(chunk)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _stat(self, key: str):
        try:
            return self._call("stat", self.uri(key), lambda: self.client.stat_object(self.bucket, key))
        except BucketNotFoundError:
            raise
        except NotFoundError:
            raise self._key_missing(key) from None

    def exists(self, key: str) -> bool:
        try:
            self._stat(key)
            return True
        except BucketNotFoundError:
            raise
        except NotFoundError:
            return False

    def size(self, key: str) -> int:
        return self._stat(key).size

    def version(self, key: str) -> tuple[int, str]:
        """(size, ETag) of an object: names its content without downloading it."""
        info = self._stat(key)
        return info.size, str(info.etag).strip('"')

    def list(self, prefix: str = "") -> list[str]:
        prefix = norm_prefix(prefix)
        uri = self.uri(prefix) if prefix else self.root_uri

        def listing() -> list[str]:
            objects = self.client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
            return [o.object_name for o in objects if in_folder(o.object_name, prefix)]

        keys = self._call("list", uri, listing)
        self._bucket_ok = True
        return sorted(keys)

    # -- deletes
    def delete(self, key: str) -> None:
        self._call("delete", self.uri(key), lambda: self.client.remove_object(self.bucket, key))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        uri = self.uri(norm_prefix(prefix)) if norm_prefix(prefix) else self.root_uri
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [DeleteObject(k) for k in keys[start : start + 1000]]

            def remove(batch=batch) -> None:
                # remove_objects is lazy: iterating sends the request and yields failures.
                errors = list(self.client.remove_objects(self.bucket, batch))
                if errors:
                    raise StoreError(f"could not delete {len(errors)} object(s) under {uri}: {errors[0]}", uri)

            self._call("delete", uri, remove)
        return len(keys)


class _ResumingReader(io.RawIOBase):
    """Streams one object; after a dropped connection it resumes at the byte it reached."""

    def __init__(self, store: S3Store, key: str):
        self._store, self._key = store, key
        self._uri = store.uri(key)
        self._pos = 0
        self._resp = store._get(key)  # raises NotFoundError/AuthError now, not at first read
        self._etag = self._resp.headers.get("ETag")
        self._failures = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        policy = self._store.config.retry
        while True:
            try:
                if self._resp is None:
                    self._resp = self._store._get(self._key, offset=self._pos, etag=self._etag)
                n = self._resp.readinto(buf)
                self._pos += n
                self._failures = 0
                return n
            except StoreError:
                raise
            except Exception as exc:  # noqa: BLE001
                if classify(exc) != "transient":
                    raise
                self._release()
                self._failures += 1
                if self._failures >= policy.tries:
                    raise TransientError(f"read {self._uri} failed at byte {self._pos}: {_describe(exc)}", self._uri) from exc
                log.warning("read %s dropped at byte %d (%s); resuming", self._uri, self._pos, _describe(exc))
                time.sleep(policy.delay(self._failures))

    def _release(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp.release_conn()
            self._resp = None

    def close(self) -> None:
        self._release()
        super().close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, S3Error):
        return f"{exc.code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _certifi_where() -> str | None:
    try:
        import certifi
    except ImportError:  # minio depends on certifi, but a system CA bundle works too
        return None
    return certifi.where()
