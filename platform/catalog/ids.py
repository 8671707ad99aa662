"""Identifiers shared by the catalog and tracking: new ids, config hashes, code version.

``config_hash`` is ``moeflow.platform.config.config_hash`` at full length: a canonical JSON form
(sorted keys, no whitespace, non-JSON values such as paths turned into strings), so the same
config always hashes the same, whichever process or key order produced it. ``code_version`` never raises: provenance is nice to
have, and a missing ``git`` or a copy outside a repository must not stop a stage.
"""

from __future__ import annotations

import functools
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

from moeflow.platform.config import canonical_json
from moeflow.platform.config import config_hash as _config_hash

UNKNOWN_CODE_VERSION = "unknown"


def new_id() -> str:
    """A random 32-character hex id (uuid4), used for every catalog row."""
    return uuid.uuid4().hex


def normalize_json(obj: Any) -> Any:
    """``obj`` as plain JSON data (dicts/lists/str/numbers), what the database will hold."""
    return json.loads(canonical_json(obj))


def config_hash(config: Any) -> str:
    """All 64 hex digits of the one ``moeflow.platform.config.config_hash`` (the catalog keeps them whole)."""
    return _config_hash(config, length=None)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Git commit of the checkout holding this package, else ``"unknown"``.

    Cached per process: the commit cannot change under a running stage in a way that
    matters, and ``git`` costs a subprocess per call.
    """
    package_dir = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=package_dir,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return UNKNOWN_CODE_VERSION
    sha = result.stdout.strip()
    if result.returncode != 0 or len(sha) < 7 or any(c not in "0123456789abcdef" for c in sha):
        return UNKNOWN_CODE_VERSION
    return sha
