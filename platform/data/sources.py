"""Sources: local files, globs and directories, JSONL (plain/.gz/.zst), JSON arrays, Parquet,
the same through ``file://``/``s3://`` store URIs, and the built-in ``python-stdlib`` corpus.

Reading is split in two so that work can be distributed deterministically:

1. ``plan_shards(sources, ...)`` resolves every source to a sorted list of files (a
   missing source given explicitly is a ``SourceError`` naming it) and cuts them into
   shards: groups of ``files_per_shard`` whole text/code files, or ranges of
   ``records_per_shard`` records of one JSONL/Parquet file. The plan depends only on the
   config and the inputs, never on the number of workers. Each unit carries its file's
   fingerprint (``fingerprint.py``), which is part of the shard id.
2. ``iter_shard(shard, max_doc_bytes)`` (``readers.py``) streams one shard and yields
   ``Document``s and ``QuarantineRecord``s. Nothing is silently dropped.

Directories are walked with symbolic links followed; a directory reached a second time (a
link loop, or two links to one folder) is listed once as a ``symlink_loop`` entry instead of
being read again. FIFOs, sockets and devices are listed as ``not_a_regular_file`` entries and
never opened. A path that exists literally is read as itself even when it holds glob
characters (``data[1].jsonl``).

``python-stdlib`` is the running interpreter's standard library (``sysconfig`` stdlib
path, ``site-packages`` always excluded, ``test`` packages optional); its logical URIs
are ``python-stdlib://<major.minor>/<relative path>``, so document ids do not depend on
where Python is installed.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import hashlib
import json
import os
import stat
import sys
import sysconfig
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field

from moeflow.platform.config import StageConfig

from .readers import (  # noqa: F401  (re-exported: callers import the readers from here)
    count_records,
    file_kind,
    iter_bounded_lines,
    iter_shard,
    iter_unit,
    local_copy,
    open_binary,
    open_records_stream,
)
from .fingerprint import file_version, hash_versions
from .units import InputUnit, ShardSpec, SourceError  # noqa: F401  (re-exported)

STDLIB = "python-stdlib"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.zst", ".ndjson.zst", ".json.gz", ".json.zst")
_GLOB_CHARS = "*?["


class SourceConfig(StageConfig):
    uri: str = Field(..., min_length=1, description="path, glob, directory, file:// or s3:// URI, or 'python-stdlib'")
    format: Literal["auto", "text", "jsonl", "json", "parquet"] = Field(
        "auto", description="file format; 'auto' decides by suffix (.jsonl[.gz|.zst], .json, .parquet, else text)")
    text_field: str = Field("text", min_length=1, description="JSONL/JSON key or Parquet column holding the text")
    extensions: list[str] | None = Field(None, description="directory/glob filter, e.g. ['.py', '.md']")
    max_files: int | None = Field(None, ge=1, le=1 << 40, description="take only the first max_files files (sorted)")
    include_tests: bool = Field(True, description="python-stdlib: include the test packages")
    name: str | None = Field(None, description="label stored as Document.source (default: the uri)")

    @property
    def label(self) -> str:
        return self.name or self.uri


class FileEntry(NamedTuple):
    read_uri: str
    logical_uri: str
    rel_path: str
    skip: tuple[str, str] | None = None  # (reason, detail) of an entry that is listed, never opened


# ---------------------------------------------------------------- resolving sources to files
def _is_store_uri(uri: str) -> bool:
    return uri.startswith(("s3://", "file:"))


def _detect_format(name: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    low = name.lower()
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if low.endswith(".json"):
        return "json"
    if low.endswith(".parquet"):
        return "parquet"
    return "text"


def _keep_rel(rel: str, cfg: SourceConfig) -> bool:
    parts = rel.split("/")
    if any(p.startswith(".") or p == "__pycache__" for p in parts):
        return False
    if cfg.extensions is not None and not rel.lower().endswith(tuple(e.lower() for e in cfg.extensions)):
        return False
    return True


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _stdlib_files(cfg: SourceConfig) -> list[FileEntry]:
    root = stdlib_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    exts = tuple(cfg.extensions or [".py"])
    out = []
    for dirpath, dirs, files in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        skip = {"site-packages", "__pycache__"} | (set() if cfg.include_tests else {"test", "tests", "idle_test"})
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        for name in files:
            if name.endswith(exts):
                rel = (rel_dir / name).as_posix()
                out.append(FileEntry(str(Path(dirpath) / name), f"{STDLIB}://{version}/{rel}", rel))
    return sorted(out, key=lambda t: t[2])


def _file_entry(path: Path, rel: str) -> FileEntry:
    """An entry for a listed non-directory: special files are marked to skip; a path that
    cannot be stat'ed (a dangling link) is listed and quarantined as unreadable when read."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = stat.S_IFREG
    skip = None
    if not stat.S_ISREG(mode):
        skip = ("not_a_regular_file", f"{file_kind(mode)}, not a regular file (skipped unread)")
    return FileEntry(str(path), path.as_uri(), rel, skip)


def _walk_dir(root: Path, cfg: SourceConfig) -> list[FileEntry]:
    """Every file under ``root``, symlinks followed; each real directory is read once."""
    out: list[FileEntry] = []
    seen: dict[tuple[int, int], str] = {}
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, rel_dir = stack.pop()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            first = seen[(st.st_dev, st.st_ino)] or "the source root"
            out.append(FileEntry(str(folder), folder.as_uri(), rel_dir,
                                 ("symlink_loop", f"directory already read as {first!r} (not read twice)")))
            continue
        seen[(st.st_dev, st.st_ino)] = rel_dir
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            out.append(FileEntry(str(folder), folder.as_uri(), rel_dir or ".", ("unreadable", f"cannot list: {exc}")))
            continue
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.name.startswith(".") or entry.name == "__pycache__":
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append((Path(entry.path), rel))
            elif _keep_rel(rel, cfg):
                out.append(_file_entry(Path(entry.path), rel))
        stack += reversed(subdirs)  # depth first, in name order: which link is "first" is deterministic
    return sorted(out, key=lambda t: t[2])


def _local_files(cfg: SourceConfig) -> list[FileEntry]:
    uri = os.path.expanduser(cfg.uri)
    path = Path(uri)
    if any(c in uri for c in _GLOB_CHARS) and not os.path.lexists(uri):
        base = Path(uri.split("*")[0].split("?")[0].split("[")[0]).parent.resolve()
        found = []
        for p in sorted(globlib.glob(uri, recursive=True)):
            if os.path.isdir(p):
                continue
            full = Path(os.path.abspath(p))
            rel = full.relative_to(base).as_posix()
            if _keep_rel(rel, cfg):
                found.append(_file_entry(full, rel))
        if not found:
            raise SourceError(f"source {cfg.uri!r}: the glob matches no files")
        return found
    if path.is_dir():
        return _walk_dir(path.resolve(), cfg)
    if path.is_file():
        return [FileEntry(str(path), path.resolve().as_uri(), path.name)]
    if os.path.lexists(path):
        try:
            kind = file_kind(os.stat(path).st_mode)
        except OSError as exc:
            raise SourceError(f"source {cfg.uri!r} cannot be read: {exc}") from exc
        raise SourceError(f"source {cfg.uri!r} is a {kind}, not a regular file or a directory")
    raise SourceError(f"source {cfg.uri!r} not found: no such file or directory")


def _store_files(cfg: SourceConfig) -> list[FileEntry]:
    from moeflow.platform.store import NotFoundError, StoreError, store_for_uri

    uri = cfg.uri
    glob_at = min((uri.find(c) for c in _GLOB_CHARS if c in uri), default=-1)
    target = uri[:glob_at].rsplit("/", 1)[0] if glob_at >= 0 else uri
    try:
        if glob_at >= 0:  # a key that exists literally wins over the pattern it looks like
            store, key = store_for_uri(uri)
            if store.exists(key):
                return [FileEntry(store.uri(key), store.uri(key), key.rsplit("/", 1)[-1])]
        store, key = store_for_uri(target)
        if glob_at >= 0:
            pattern = store.to_key(uri) if uri.startswith("s3://") else key + uri[len(target):]
            keys = [k for k in store.list(key) if fnmatch.fnmatchcase(k, pattern)]
            base = key
        elif store.exists(key):
            return [FileEntry(store.uri(key), store.uri(key), key.rsplit("/", 1)[-1])]
        else:
            keys, base = store.list(key), key
    except NotFoundError as exc:
        raise SourceError(f"source {uri!r} not found: {exc}") from exc
    except StoreError as exc:
        raise SourceError(f"source {uri!r} cannot be listed: {exc}") from exc
    found = []
    for k in keys:
        rel = k[len(base) + 1 :] if base and k.startswith(base + "/") else k
        if _keep_rel(rel, cfg) and not rel.endswith("MANIFEST.json"):
            found.append(FileEntry(store.uri(k), store.uri(k), rel))
    if not found:
        raise SourceError(f"source {uri!r} not found: no objects under it")
    return found


def resolve_files(cfg: SourceConfig) -> list[FileEntry]:
    """(read_uri, logical_uri, rel_path, skip) of every file of a source, sorted, capped at max_files."""
    if cfg.uri == STDLIB:
        files = _stdlib_files(cfg)
    elif _is_store_uri(cfg.uri):
        files = _store_files(cfg)
    else:
        files = _local_files(cfg)
    return files[: cfg.max_files] if cfg.max_files is not None else files


# ---------------------------------------------------------------- planning
def plan_shards(
    sources: list[SourceConfig], files_per_shard: int = 64, records_per_shard: int = 10_000
) -> list[ShardSpec]:
    """Deterministic shards over all sources (see the module docstring)."""

    if not sources:
        raise SourceError("no sources configured")
    groups: list[list[InputUnit]] = []
    seen: set[str] = set()
    for cfg in sources:
        text_units: list[InputUnit] = []
        for read_uri, logical_uri, rel, skip in resolve_files(cfg):
            if logical_uri in seen:  # the same file named twice would duplicate ids
                continue
            seen.add(logical_uri)
            if skip is not None:
                text_units.append(InputUnit(read_uri, logical_uri, "skip", cfg.label, rel, version=f"skip:{skip[0]}", skip=skip))
                continue
            fmt = _detect_format(rel, cfg.format)
            version = file_version(read_uri)
            if fmt in ("text", "json"):
                text_units.append(InputUnit(read_uri, logical_uri, fmt, cfg.label, rel, text_field=cfg.text_field, version=version))
                continue
            try:
                num = count_records(read_uri, fmt, cfg.text_field)
            except OSError as exc:
                raise SourceError(f"source {cfg.uri!r}: cannot read {logical_uri}: {exc}") from exc
            num = num or 0  # None: a Parquet file that cannot be opened; one unit, quarantined when read
            for start in range(0, max(num, 1), records_per_shard):
                # the last range is open-ended: reading, not counting, decides where a file ends
                stop = None if start + records_per_shard >= num else start + records_per_shard
                unit = InputUnit(read_uri, logical_uri, fmt, cfg.label, rel, start, stop, cfg.text_field, version)
                groups.append([unit])
        for i in range(0, len(text_units), files_per_shard):
            groups.append(text_units[i : i + files_per_shard])
    shards = []
    for index, units in enumerate(groups):
        digest = hashlib.sha1(json.dumps([[u.logical_uri, u.start, u.stop, u.version] for u in units]).encode()).hexdigest()
        shards.append(ShardSpec(f"{index:05d}-{digest[:10]}", index, tuple(units)))
    return shards


def inputs_fingerprint(sources) -> str:
    """Fingerprint of the inputs of ``sources`` (SourceConfigs): lists and versions every file,
    without the record counting that planning does, so it is cheap enough for a cache key.
    Equal to ``hash_versions(versions_of(plan_shards(sources)))``."""
    versions: dict[str, str] = {}
    for cfg in sources:
        for read_uri, logical_uri, _rel, skip in resolve_files(cfg):
            if logical_uri not in versions:
                versions[logical_uri] = f"skip:{skip[0]}" if skip else file_version(read_uri)
    return hash_versions(versions)
