"""The object store: one ``ObjectStore`` interface over a local directory or an S3 bucket.

Every stage reads and writes through here, by URI (``file:///abs/dir/key`` or
``s3://bucket/key``). ``open_store`` picks the backend from the settings;
``store_for_uri`` opens the store that holds a URI. Multi-file outputs are written as
atomic artefacts (``store.write_artifact``), which become visible only when their
manifest is committed last (see ``artifact.py``).

Nothing connects at import or construction time: the first request does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .artifact import Artifact, ArtifactWriter, content_hash
from .base import ObjectStore
from .errors import (
    ArtifactExistsError,
    AuthError,
    BucketNotFoundError,
    ChecksumError,
    InvalidKeyError,
    NotFoundError,
    StoreError,
    TransientError,
)
from .keys import MANIFEST_NAME
from .local import LocalStore, path_from_file_uri

if TYPE_CHECKING:
    from ..settings import Settings
    from .s3 import S3Config, S3Store

__all__ = [
    "MANIFEST_NAME",
    "Artifact",
    "ArtifactExistsError",
    "ArtifactWriter",
    "AuthError",
    "BucketNotFoundError",
    "ChecksumError",
    "InvalidKeyError",
    "LocalStore",
    "NotFoundError",
    "ObjectStore",
    "StoreError",
    "TransientError",
    "content_hash",
    "open_store",
    "read_artifact",
    "s3_config",
    "store_for_uri",
]


def _settings(settings: "Settings | None") -> "Settings":
    if settings is None:
        from ..settings import get_settings

        settings = get_settings()
    return settings


def s3_config(settings: "Settings | None" = None, **overrides) -> "S3Config":
    """The S3 connection of the settings (``overrides`` tune timeouts, part size, retries)."""
    from .s3 import RetryPolicy, S3Config

    settings = _settings(settings)
    if not settings.s3_endpoint:
        raise StoreError("no S3 endpoint configured: set MOEFLOW_S3_ENDPOINT (host:port)")
    secret = lambda v: v.get_secret_value() if v is not None else None  # noqa: E731
    return S3Config(
        endpoint=settings.s3_endpoint,
        access_key=secret(settings.s3_access_key),
        secret_key=secret(settings.s3_secret_key),
        secure=settings.s3_secure,
        region=settings.s3_region,
        **{"retry": RetryPolicy(tries=settings.s3_retry_tries, max_delay_s=settings.s3_retry_max_delay_s),
           **overrides},
    )


def open_store(settings: "Settings | None" = None, create_bucket: bool = False) -> ObjectStore:
    """The platform's store: S3 when ``settings.s3_endpoint`` is set, else ``settings.store_root``.

    An S3 bucket is created only with ``create_bucket=True``; otherwise a missing bucket
    surfaces as BucketNotFoundError (a NotFoundError) on first use.
    """
    settings = _settings(settings)
    if settings.uses_s3:
        from .s3 import S3Store

        store = S3Store(s3_config(settings), settings.s3_bucket)
        if create_bucket:
            store.ensure_bucket()
        return store
    return LocalStore(settings.store_root)


def store_for_uri(uri: str, settings: "Settings | None" = None) -> "tuple[ObjectStore, str]":
    """(store, key) for a ``file://`` or ``s3://`` URI.

    ``s3://bucket/key`` uses the settings' endpoint and credentials with the URI's bucket.
    ``file:///path`` uses the settings' local store when the path lies inside it, else a
    store rooted at the path's parent folder (so deletes never prune above it).
    """
    if uri.startswith("s3://"):
        from .s3 import S3Store

        bucket, _, key = uri[len("s3://") :].partition("/")
        store = S3Store(s3_config(_settings(settings)), bucket)
        return store, store.key_for_uri(f"s3://{bucket}/{key}")
    if uri.startswith("file:"):
        path = path_from_file_uri(uri)
        root = _settings(settings).store_root.expanduser().resolve()
        if root not in path.parents:
            root = path.parent
        store = LocalStore(root)
        return store, store.key_for_uri(uri)
    raise StoreError(f"unsupported store URI {uri!r}: expected file:///abs/path or s3://bucket/key", uri)


def read_artifact(uri: str, settings: "Settings | None" = None) -> Artifact:
    """The committed artefact at ``uri`` (any store)."""
    store, prefix = store_for_uri(uri, settings)
    return store.read_artifact(prefix)
