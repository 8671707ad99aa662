"""Atomic multi-file artefacts on any ``ObjectStore``: the writer and the verified reader.

Protocol (the same for a local directory and S3):

1. ``write_artifact(prefix)`` refuses a committed artefact unless ``overwrite=True``;
   with no committed manifest, whatever lies under the prefix is a leftover of an
   interrupted write and is deleted first (nested committed artefacts are kept).
2. Files are written under ``<prefix>/.tmp-<uuid>/<name>``; size and sha256 are computed
   while writing.
3. Commit: on overwrite the old ``MANIFEST.json`` is deleted *first* (so no reader sees
   old manifest + new files), then the old files; then each staged file is moved into
   ``<prefix>/<name>`` (rename / server-side copy), and ``MANIFEST.json`` is written LAST.
   An S3 PUT and a local ``os.replace`` are atomic, so a reader sees either no manifest or
   a whole one, and a manifest only ever names files that are already in place.
4. An exception inside the ``with`` block deletes the staging prefix (best effort; a
   killed process leaves it, and the next writer of the prefix removes it).

Readers (``Artifact``) only exist for a committed manifest and verify every file's size
and sha256 on read. One writer per prefix at a time is assumed: two concurrent writers of
the same prefix may delete each other's staging files (the loser fails; nothing torn is
ever committed, because the manifest is written only from the winner's own hashes).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .errors import ArtifactExistsError, BucketNotFoundError, ChecksumError, InvalidKeyError, NotFoundError, StoreError
from .keys import MANIFEST_NAME, STAGING_PREFIX, check_key, in_folder, join_key, norm_prefix

if TYPE_CHECKING:  # annotations only: base.py builds artefacts, artefacts use the store's primitives
    from .base import ObjectStore

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "moeflow-artifact/1"
_CHUNK = 1 << 20


def content_hash(files: dict[str, dict]) -> str:
    """sha256 over the sorted (name, sha256) pairs: a stable id of an artefact's content."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]['sha256']}\n".encode())
    return digest.hexdigest()


def file_digest(path: str | Path) -> tuple[int, str]:
    """(size, sha256 hex) of a local file, streamed."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def stage_file(store: "ObjectStore", staging_prefix: str, name: str, local_path: str | Path) -> dict:
    """Upload ``local_path`` into another process's artefact writer (its ``staging_prefix``); returns the
    manifest entry to pass to that writer's ``adopt``."""
    size, sha = file_digest(local_path)
    store.put_file(join_key(staging_prefix, check_name(name)), local_path)
    if os.path.getsize(local_path) != size:
        raise StoreError(f"{local_path} changed while it was uploaded", store.uri(staging_prefix))
    return {"size": size, "sha256": sha}


def check_name(name: str) -> str:
    """An artefact file name: a valid key that cannot clash with the protocol's own keys."""
    check_key(name, "artefact file name")
    if name.split("/")[-1] == MANIFEST_NAME:
        raise InvalidKeyError(f"artefact file name {name!r} is reserved for the manifest")
    if name.split("/")[0].startswith(STAGING_PREFIX):
        raise InvalidKeyError(f"artefact file name {name!r} may not start with {STAGING_PREFIX!r}")
    return name


def _nested_artifacts(keys: list[str], prefix: str) -> list[str]:
    """Folders strictly inside ``prefix`` that hold their own committed manifest."""
    own = join_key(prefix, MANIFEST_NAME)
    return [k[: -len(MANIFEST_NAME) - 1] for k in keys if k.endswith("/" + MANIFEST_NAME) and k != own]


def _removable(keys: list[str], prefix: str, keep_folder: str | None = None) -> list[str]:
    """Keys under ``prefix`` that are not part of a nested artefact or of ``keep_folder``."""
    nested = _nested_artifacts(keys, prefix)
    return [
        k
        for k in keys
        if not any(in_folder(k, n) for n in nested) and not (keep_folder and in_folder(k, keep_folder))
    ]


class _HashingReader(io.RawIOBase):
    """Passes reads through while counting bytes and hashing them (for ``put_stream``)."""

    def __init__(self, inner: BinaryIO):
        self._inner = inner
        self._start = inner.tell() if inner.seekable() else 0
        self._reset()

    def _reset(self) -> None:
        self.size = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._inner.seekable()

    def tell(self) -> int:
        return self.size

    def seek(self, offset: int, whence: int = 0) -> int:
        # Only rewinding to the start is meaningful: a retry re-sends from the beginning.
        if offset != 0 or whence != 0:
            raise io.UnsupportedOperation("a hashing reader can only be rewound to its start")
        self._inner.seek(self._start)
        self._reset()
        return 0

    def readinto(self, buf) -> int:
        data = self._inner.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.size += n
        self.digest.update(data)
        return n


class _VerifyingReader(io.RawIOBase):
    """Streams an artefact file and checks its size and sha256 when EOF is reached."""

    def __init__(self, inner: BinaryIO, size: int, sha256: str, uri: str):
        self._inner, self._size, self._sha256, self._uri = inner, size, sha256, uri
        self._digest = hashlib.sha256()
        self._seen = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self._inner.read(len(buf))
        n = len(data)
        buf[:n] = data
        self._seen += n
        self._digest.update(data)
        if self._seen > self._size or (n == 0 and self._seen != self._size):
            raise ChecksumError(f"{self._uri}: size differs from the manifest's {self._size} bytes: corrupted", self._uri)
        if n == 0 and self._digest.hexdigest() != self._sha256:
            raise ChecksumError(f"{self._uri}: sha256 does not match the manifest: corrupted", self._uri)
        return n

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


class ArtifactWriter:
    """Context manager returned by ``ObjectStore.write_artifact``; see the module docstring."""

    def __init__(self, store: ObjectStore, prefix: str, metadata: dict | None = None, overwrite: bool = False):
        self.store = store
        self.prefix = norm_prefix(prefix)
        if not self.prefix:
            raise InvalidKeyError("an artefact needs a non-empty prefix")
        self.uri = store.uri(self.prefix)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.overwrite = overwrite
        self.manifest: dict | None = None
        self._staging = join_key(self.prefix, f"{STAGING_PREFIX}{uuid.uuid4().hex}")
        self._files: dict[str, dict] = {}
        self._state = "new"

    @property
    def manifest_key(self) -> str:
        return join_key(self.prefix, MANIFEST_NAME)

    # -- lifecycle
    def __enter__(self) -> "ArtifactWriter":
        self.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False

    def begin(self) -> None:
        if self._state != "new":
            raise StoreError(f"artefact writer for {self.uri} was already started", self.uri)
        keys = self.store.list(self.prefix)
        committed = self.manifest_key in keys
        if committed and not self.overwrite:
            raise ArtifactExistsError(
                f"artefact {self.uri} already exists; pass overwrite=True to replace it", self.uri
            )
        # Leftovers of interrupted writes: everything when nothing is committed, only stale
        # staging folders when a committed artefact stays readable until our commit.
        leftovers = _removable(keys, self.prefix)
        if committed:
            stale = join_key(self.prefix, STAGING_PREFIX)
            leftovers = [k for k in leftovers if k.startswith(stale)]
        if leftovers:
            log.info("removing %d leftover object(s) of an interrupted write under %s", len(leftovers), self.uri)
            for key in leftovers:
                self.store.delete(key)
        self._state = "open"

    # -- writing files
    def _staged(self, name: str) -> str:
        if self._state != "open":
            raise StoreError(f"artefact writer for {self.uri} is {self._state}; use it inside its `with` block", self.uri)
        return join_key(self._staging, check_name(name))

    def put_bytes(self, name: str, data: bytes) -> None:
        key = self._staged(name)
        self.store.put_bytes(key, data)
        self._files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def put_json(self, name: str, obj: Any) -> None:
        self.put_bytes(name, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def put_file(self, name: str, local_path: str | Path) -> None:
        key = self._staged(name)
        size, sha = file_digest(local_path)
        self.store.put_file(key, local_path)
        if os.path.getsize(local_path) != size:
            raise StoreError(f"{local_path} changed while it was uploaded to {self.store.uri(key)}", self.uri)
        self._files[name] = {"size": size, "sha256": sha}

    def put_stream(self, name: str, stream: BinaryIO) -> None:
        """Upload a readable of unknown length (hashed on the fly)."""
        key = self._staged(name)
        reader = _HashingReader(stream)
        self.store.put_stream(key, reader)
        self._files[name] = {"size": reader.size, "sha256": reader.digest.hexdigest()}

    def names(self) -> list[str]:
        return sorted(self._files)

    # -- files staged by other processes (a sharded checkpoint: every rank uploads its own shards)
    @property
    def staging_prefix(self) -> str:
        """Where this writer stages files: other processes upload there with ``stage_file`` and hand
        the returned entry to ``adopt``; the commit then promotes them with the writer's own files."""
        return self._staging

    def adopt(self, name: str, info: dict) -> None:
        """Take a file another process staged (``stage_file``) into this artefact; its size is checked
        against the store now, its sha256 (computed by the uploader) goes into the manifest."""
        key = self._staged(name)
        if name in self._files:
            raise StoreError(f"artefact {self.uri}: file {name!r} was staged twice", self.uri)
        if not self.store.exists(key) or self.store.size(key) != int(info["size"]):
            raise StoreError(f"artefact {self.uri}: staged file {name!r} is missing or has the wrong size", self.uri)
        self._files[name] = {"size": int(info["size"]), "sha256": str(info["sha256"])}

    # -- commit / abort
    def commit(self) -> dict:
        if self._state != "open":
            raise StoreError(f"artefact writer for {self.uri} is {self._state}, cannot commit", self.uri)
        files = {name: self._files[name] for name in sorted(self._files)}
        manifest = {
            "format": MANIFEST_FORMAT,
            "files": files,
            "metadata": self.metadata,
            "content_hash": content_hash(files),
            "created_at": datetime.now(timezone.utc).isoformat(),
        }
        try:
            manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
        except (TypeError, ValueError) as exc:
            self.abort()
            raise StoreError(f"metadata of artefact {self.uri} is not JSON-serialisable: {exc}", self.uri) from exc
        try:
            self._replace_old()
            for name in files:
                self.store._promote(join_key(self._staging, name), join_key(self.prefix, name))
            self.store.put_bytes(self.manifest_key, manifest_bytes)  # the commit point
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self.manifest = manifest
        self._cleanup_staging()
        return manifest

    def _replace_old(self) -> None:
        keys = self.store.list(self.prefix)
        if self.manifest_key in keys:
            if not self.overwrite:  # committed by someone else while we were writing
                raise ArtifactExistsError(f"artefact {self.uri} was committed by another writer", self.uri)
            self.store.delete(self.manifest_key)  # first: readers stop seeing the old artefact
        for key in _removable(keys, self.prefix, keep_folder=self._staging):
            if key != self.manifest_key:
                self.store.delete(key)

    def abort(self) -> None:
        if self._state in ("committed", "aborted"):
            return
        self._state = "aborted"
        self._cleanup_staging()

    def _cleanup_staging(self) -> None:
        # Best effort: an unreachable server must not mask the original error; the next
        # writer of this prefix removes what is left.
        try:
            self.store.delete_prefix(self._staging)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not remove staging files %s: %s", self.store.uri(self._staging), exc)

    # -- results
    @property
    def content_hash(self) -> str:
        if self.manifest is None:
            raise StoreError(f"artefact {self.uri} is not committed yet", self.uri)
        return self.manifest["content_hash"]

    def artifact(self) -> "Artifact":
        if self.manifest is None:
            raise StoreError(f"artefact {self.uri} is not committed yet", self.uri)
        return Artifact(self.store, self.prefix, self.manifest)


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f"format is not {MANIFEST_FORMAT!r}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "no 'files' mapping"
    for name, info in files.items():
        if not (isinstance(info, dict) and isinstance(info.get("size"), int) and isinstance(info.get("sha256"), str)
                and len(info["sha256"]) == 64):
            return f"bad entry for {name!r}: {info!r}"
    return None


class Artifact:
    """A committed artefact: its manifest and checksum-verified access to its files."""

    def __init__(self, store: ObjectStore, prefix: str, manifest: dict):
        self.store = store
        self.prefix = prefix
        self.uri = store.uri(prefix)
        self.manifest = manifest

    @classmethod
    def load(cls, store: ObjectStore, prefix: str) -> "Artifact":
        prefix = norm_prefix(prefix)
        uri = store.uri(prefix) if prefix else store.root_uri
        if not prefix:
            raise InvalidKeyError("an artefact needs a non-empty prefix", uri)
        try:
            raw = store.get_bytes(join_key(prefix, MANIFEST_NAME))
        except BucketNotFoundError:
            raise
        except NotFoundError as exc:
            raise NotFoundError(f"no committed artefact at {uri} (no {MANIFEST_NAME})", uri) from exc
        try:
            manifest = json.loads(raw)
            problem = _manifest_problem(manifest)
        except ValueError as exc:
            problem = f"not JSON ({exc})"
        if problem:
            raise ChecksumError(f"manifest of {uri} is malformed: {problem}", uri)
        return cls(store, prefix, manifest)

    # -- manifest
    @property
    def metadata(self) -> dict:
        return self.manifest.get("metadata", {})

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest["files"]

    @property
    def created_at(self) -> str | None:
        return self.manifest.get("created_at")

    @property
    def content_hash(self) -> str:
        return content_hash(self.files)

    @property
    def total_size(self) -> int:
        return sum(f["size"] for f in self.files.values())

    def names(self) -> list[str]:
        return sorted(self.files)

    def _info(self, name: str) -> dict:
        if name not in self.files:
            raise NotFoundError(f"artefact {self.uri} has no file {name!r} (has {self.names()[:20]})", self.file_uri(name))
        return self.files[name]

    def key(self, name: str) -> str:
        return join_key(self.prefix, name)

    def file_uri(self, name: str) -> str:
        return self.store.uri(self.key(name))

    # -- verified reads
    def get_bytes(self, name: str) -> bytes:
        info = self._info(name)
        data = self.store.get_bytes(self.key(name))
        if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            uri = self.file_uri(name)
            raise ChecksumError(f"{uri}: content does not match the manifest (size/sha256): corrupted", uri)
        return data

    def get_json(self, name: str) -> Any:
        return json.loads(self.get_bytes(name))

    def open(self, name: str) -> BinaryIO:
        """Streaming, forward-only reader; raises ChecksumError at EOF on a mismatch."""
        info = self._info(name)
        raw = _VerifyingReader(self.store.open(self.key(name)), info["size"], info["sha256"], self.file_uri(name))
        return io.BufferedReader(raw, buffer_size=_CHUNK)

    def download(self, local_dir: str | Path, names: list[str] | None = None) -> Path:
        """Fetch files into ``local_dir`` (keeping sub-folders); present, valid files are skipped."""
        local_dir = Path(local_dir)
        corrupted = []
        for name in self.names() if names is None else names:
            info = self._info(name)
            dest = local_dir / name
            if dest.is_file() and dest.stat().st_size == info["size"] and file_digest(dest)[1] == info["sha256"]:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.download-{uuid.uuid4().hex[:8]}")
            try:
                self.store.get_file(self.key(name), tmp)
                if file_digest(tmp) == (info["size"], info["sha256"]):
                    os.replace(tmp, dest)
                else:  # keep going: one error then names every corrupted file
                    corrupted.append(self.file_uri(name))
            finally:
                tmp.unlink(missing_ok=True)
        if corrupted:
            raise ChecksumError(
                f"{len(corrupted)} file(s) of {self.uri} do not match the manifest (corrupted): {', '.join(corrupted)}",
                corrupted[0],
            )
        return local_dir

    def __repr__(self) -> str:
        return f"Artifact({self.uri!r}, {len(self.files)} files)"
