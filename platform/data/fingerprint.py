"""Fingerprints of the input files, so that a changed input is never mistaken for the old one.

A curated artefact depends on its config *and* on the bytes it read. ``file_version(read_uri)``
names one file's content as cheaply as is still safe:

* a local file up to ``FULL_HASH_BYTES`` (and every ``python-stdlib`` file): sha256 of the content,
  so touching a file without changing it changes nothing, and the stdlib's fingerprint is the
  same on every machine with the same Python;
* a larger local file: size, mtime (ns) and sha256 of its first and last ``EDGE_BYTES`` (a whole
  hash of a 100 GB corpus would cost as much as reading it);
* an ``s3://`` object: its size and ETag (the store's content tag; no download);

``inputs_fingerprint(sources)`` hashes the versions of every planned unit (and the listing:
an added or removed file changes it). It goes into the shard ids (``plan_shards``), into the
curated artefact's metadata, into the default output prefix (``curate.default_output_prefix``)
and into the Prefect cache key of the curate task, so a re-run over edited or added files
computes a new artefact instead of returning the old documents, and a resume at the same prefix
over changed inputs is refused with the list of files that changed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from functools import lru_cache

FULL_HASH_BYTES = 8 << 20
EDGE_BYTES = 1 << 20


def _sha256_file(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        else:
            digest.update(fh.read(EDGE_BYTES))
            fh.seek(max(0, size - EDGE_BYTES))
            digest.update(fh.read(EDGE_BYTES))
    return digest.hexdigest()[:16]


def local_version(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"missing:{type(exc).__name__}"
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the hash's open()
        return f"special:{stat.S_IFMT(st.st_mode):o}"
    return _hashed_version(path, st.st_size, st.st_mtime_ns, st.st_ino)


@lru_cache(maxsize=1 << 16)
def _hashed_version(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """Keyed by the stat fields, so one process (the cache key, the prefix, the plan) hashes a file
    once, and an edit (new size or mtime) is hashed again."""
    if size <= FULL_HASH_BYTES:
        return f"sha256:{_sha256_file(path, size)}"
    return f"size:{size},mtime:{mtime_ns},edges:{_sha256_file(path, size)}"


def file_version(read_uri: str) -> str:
    """A short string that changes when the file's content changes (see the module docstring)."""
    if read_uri.startswith("file:"):
        from moeflow.platform.store import path_from_file_uri

        return local_version(str(path_from_file_uri(read_uri)))
    if read_uri.startswith("s3://"):
        from moeflow.platform.store import store_for_uri

        store, key = store_for_uri(read_uri)
        size, etag = store.version(key)
        return f"size:{size},etag:{etag}"
    return local_version(read_uri)


def hash_versions(versions: dict[str, str]) -> str:
    """sha256 over the sorted {logical uri: version} map: the one fingerprint of a set of inputs."""
    digest = hashlib.sha256()
    for uri in sorted(versions):
        digest.update(f"{uri}\0{versions[uri]}\n".encode())
    return digest.hexdigest()[:16]


def versions_of(shards) -> dict[str, str]:
    """{logical uri: version} of every planned unit (a file cut into ranges appears once)."""
    return {u.logical_uri: u.version for s in shards for u in s.units}


def changed_files(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Logical URIs that were added, removed or changed between two {uri: version} maps."""
    return sorted(u for u in set(old) | set(new) if old.get(u) != new.get(u))
