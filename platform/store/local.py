"""``LocalStore``: the object store as a plain directory (the embedded default).

Every write goes to a hidden temp file in the target's folder, is fsync'ed, and is then
``os.replace``d onto the key, so a reader never sees a partial object (and a killed
writer leaves only a temp file that ``list`` ignores). Empty folders are pruned on
delete so that folders behave like S3 prefixes (they exist only while they hold keys).

Limitation of a file system: a key cannot also be a folder (``a/b`` and ``a/b/c`` cannot
both exist); such a write raises StoreError naming both keys.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Callable
from urllib.parse import unquote, urlsplit

from .base import ObjectStore
from .errors import AuthError, NotFoundError, StoreError
from .keys import check_key, norm_prefix

_TMP_MARK = ".moeflow-tmp-"
_COPY_CHUNK = 8 << 20
_DENIED = (errno.EROFS, errno.EACCES, errno.EPERM)


def path_from_file_uri(uri: str) -> Path:
    """The absolute path of a ``file://`` URI, its folder resolved (symlinks, ``..``)."""
    parts = urlsplit(uri)
    path = Path(unquote(parts.path))
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not path.is_absolute():
        raise StoreError(f"not a local file URI: {uri!r} (expected file:///absolute/path)", uri)
    return Path(os.path.realpath(path.parent)) / path.name


class LocalStore(ObjectStore):
    def __init__(self, root: str | Path, durable: bool = True):
        # durable: fsync each object before it becomes visible (survives a power cut).
        self.root = Path(root).expanduser().resolve()
        self.durable = durable
        self.root_uri = self.root.as_uri()

    # -- addressing
    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_for_uri(self, uri: str) -> str:
        path = path_from_file_uri(uri)
        try:
            return check_key(path.relative_to(self.root).as_posix())
        except (ValueError, StoreError):
            raise StoreError(f"{uri} is not inside the store {self.root_uri}; use store_for_uri()", uri) from None

    def _key_of(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # -- writes: temp file + os.replace
    def _prepare_parent(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            blocker = next((p for p in reversed(path.parents) if p.is_file()), path.parent)
            raise StoreError(
                f"cannot write {path.as_uri()}: {blocker.as_uri()} is an object, and a local store "
                "cannot hold a key that is also a folder",
                path.as_uri(),
            ) from None
        if path.is_dir():
            raise StoreError(f"cannot write {path.as_uri()}: it is a folder of other keys", path.as_uri())

    def _write(self, key: str, fill: Callable[[BinaryIO], None]) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            self._prepare_parent(path)
            with open(tmp, "wb") as fh:
                fill(fh)
                fh.flush()
                if self.durable:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            if exc.errno in _DENIED:  # a read-only or foreign directory: no retry can help
                raise AuthError(f"cannot write to the store {self.root} ({exc.strerror}): make it writable or set "
                                "MOEFLOW_STORE_DIR", path.as_uri()) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda fh: fh.write(data))

    def put_file(self, key: str, local_path: str | Path) -> None:
        with open(local_path, "rb") as src:
            self._write(key, lambda fh: shutil.copyfileobj(src, fh, _COPY_CHUNK))

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        self._write(key, lambda fh: shutil.copyfileobj(stream, fh, _COPY_CHUNK))

    def _promote(self, src_key: str, dst_key: str) -> None:
        src, dst = self._path(src_key), self._path(dst_key)
        self._prepare_parent(dst)
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            raise NotFoundError(f"no object at {src.as_uri()}", src.as_uri()) from None
        self._prune(src.parent)

    # -- reads
    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"no object at {path.as_uri()}", path.as_uri()) from None

    def get_bytes(self, key: str) -> bytes:
        with self._open(key) as fh:
            return fh.read()

    def open(self, key: str) -> BinaryIO:
        return self._open(key)

    def get_file(self, key: str, local_path: str | Path) -> Path:
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
        with self._open(key) as src:
            try:
                with open(tmp, "wb") as fh:
                    shutil.copyfileobj(src, fh, _COPY_CHUNK)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        return dest

    def list(self, prefix: str = "") -> list[str]:
        prefix = norm_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if base.is_file():
            return [prefix]
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if _TMP_MARK not in name:
                    keys.append(self._key_of(Path(dirpath) / name))
        return sorted(keys)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError(f"no object at {path.as_uri()}", path.as_uri())
        return path.stat().st_size

    # -- deletes
    def _prune(self, folder: Path) -> None:
        """Remove empty folders from ``folder`` up to (not including) the root."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone by a concurrent delete)
                if folder.exists():
                    return
            folder = folder.parent

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            raise StoreError(f"{path.as_uri()} is a folder; use delete_prefix()", path.as_uri())
        path.unlink(missing_ok=True)
        self._prune(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        prefix = norm_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if base.is_file():
            self.delete(prefix)
            return 1
        removed = 0
        # Temp files of killed writers go too: they belong to keys under this prefix.
        for dirpath, _dirs, files in os.walk(base, topdown=False):
            for name in files:
                (Path(dirpath) / name).unlink(missing_ok=True)
                removed += _TMP_MARK not in name
            if Path(dirpath) != self.root:
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
        self._prune(base.parent if prefix else self.root)
        return removed
