"""The ``ObjectStore`` interface, its errors and key rules, shared by both backends.

Keys are ``/``-separated relative paths (``datasets/x/part-00000.parquet``): no leading
or trailing ``/``, no empty, ``.`` or ``..`` segments, no backslashes or NUL. The same
key means the same object in a local directory and in an S3 bucket, so code never
builds paths by hand. ``list``/``delete_prefix`` treat their prefix as a *folder*
(``"a/b"`` matches ``a/b`` and ``a/b/...`` but not ``a/bc``): plain string prefixes
make accidental deletes of sibling artefacts too easy.

A backend implements the primitive operations (``put_*``, ``get_*``, ``open``, ``list``,
``exists``, ``size``, ``delete``, ``_promote``); the atomic artefact protocol on top of
them lives in ``artifact.py`` and is the same for every backend.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .artifact import Artifact, ArtifactWriter
from .keys import MANIFEST_NAME, join_key, norm_prefix



# ---------------------------------------------------------------- interface
class ObjectStore(abc.ABC):
    """Bytes by key, behind one interface for a local directory and an S3 bucket."""

    root_uri: str

    # -- addressing
    @abc.abstractmethod
    def uri(self, key: str) -> str:
        """Full URI of ``key`` (``file:///root/key`` or ``s3://bucket/key``)."""

    @abc.abstractmethod
    def key_for_uri(self, uri: str) -> str:
        """The key of a URI inside this store; StoreError if the URI is elsewhere."""

    def to_key(self, key_or_uri: str) -> str:
        return self.key_for_uri(key_or_uri) if "://" in key_or_uri else key_or_uri

    # -- objects
    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def put_file(self, key: str, local_path: str | Path) -> None:
        """Upload a local file, streaming (multipart on S3): any size."""

    @abc.abstractmethod
    def put_stream(self, key: str, stream: BinaryIO) -> None:
        """Upload from a readable of unknown length. Retried only if ``stream.seekable()``."""

    @abc.abstractmethod
    def get_file(self, key: str, local_path: str | Path) -> Path:
        """Download to ``local_path`` (written to a temp file, then renamed into place)."""

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A streaming binary reader; use as a context manager."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys in the folder ``prefix`` (recursive)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; a missing key is not an error (deletes are idempotent)."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every object in the folder ``prefix``; returns how many were removed."""

    @abc.abstractmethod
    def _promote(self, src_key: str, dst_key: str) -> None:
        """Move a staged object into place (rename locally, server-side copy on S3)."""

    # -- conveniences shared by the backends
    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with self.open(key) as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    # -- atomic artefacts (artifact.py)
    def write_artifact(
        self, prefix: str, metadata: dict | None = None, overwrite: bool = False
    ) -> "ArtifactWriter":
        return ArtifactWriter(self, self.to_key(prefix), metadata=metadata, overwrite=overwrite)

    def artifact_exists(self, prefix_or_uri: str) -> bool:
        return self.exists(join_key(norm_prefix(self.to_key(prefix_or_uri)), MANIFEST_NAME))

    def read_artifact(self, prefix_or_uri: str) -> "Artifact":
        return Artifact.load(self, self.to_key(prefix_or_uri))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"
