"""Key rules shared by every backend and the artefact protocol (see ``base.py``'s docstring)."""

from __future__ import annotations

from .errors import InvalidKeyError

MANIFEST_NAME = "MANIFEST.json"
STAGING_PREFIX = ".tmp-"  # artefact files are staged under "<prefix>/.tmp-<uuid>/"


def check_key(key: str, what: str = "key") -> str:
    """Return ``key`` unchanged if it is a valid object key, else raise InvalidKeyError."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"invalid {what} {key!r}: must be a non-empty string")
    if key.startswith("/") or key.endswith("/"):
        raise InvalidKeyError(f"invalid {what} {key!r}: no leading or trailing '/'")
    if "\\" in key or "\x00" in key:
        raise InvalidKeyError(f"invalid {what} {key!r}: backslash and NUL are not allowed")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidKeyError(f"invalid {what} {key!r}: empty, '.' or '..' path segment")
    return key


def norm_prefix(prefix: str) -> str:
    """A folder prefix without trailing '/'; ``""`` means the whole store."""
    prefix = (prefix or "").rstrip("/")
    return check_key(prefix, "prefix") if prefix else ""


def in_folder(key: str, prefix: str) -> bool:
    return not prefix or key == prefix or key.startswith(prefix + "/")


def join_key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name
