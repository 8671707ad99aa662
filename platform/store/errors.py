"""Object-store errors: one type per thing a caller can act on (missing, auth, transient, corrupt, ...)."""

from __future__ import annotations


class StoreError(Exception):
    """Base of all object-store errors; ``uri`` names the object, artefact or bucket."""

    def __init__(self, message: str, uri: str | None = None):
        super().__init__(message)
        self.uri = uri


class NotFoundError(StoreError, FileNotFoundError):
    """A missing key, artefact (no committed manifest) or bucket."""

    def __init__(self, message: str, uri: str | None = None):
        # OSError's constructor would reinterpret a 2-tuple of args as (errno, strerror).
        StoreError.__init__(self, message, uri)

    def __str__(self) -> str:
        return self.args[0]


class BucketNotFoundError(NotFoundError):
    """The S3 bucket itself is missing (a configuration problem, not a missing object)."""


class AuthError(StoreError, PermissionError):
    """Bad credentials or a denied operation: retrying cannot help."""

    def __init__(self, message: str, uri: str | None = None):
        StoreError.__init__(self, message, uri)

    def __str__(self) -> str:
        return self.args[0]


class TransientError(StoreError):
    """A network or server failure that persisted through every retry."""


class ChecksumError(StoreError):
    """Stored bytes do not match the manifest's size/sha256: the object is corrupted."""


class ArtifactExistsError(StoreError, FileExistsError):
    """``write_artifact(overwrite=False)`` on a prefix that holds a committed artefact."""

    def __init__(self, message: str, uri: str | None = None):
        StoreError.__init__(self, message, uri)

    def __str__(self) -> str:
        return self.args[0]


class InvalidKeyError(StoreError, ValueError):
    """A key, prefix or artefact file name that breaks the key rules."""

    def __init__(self, message: str, uri: str | None = None):
        StoreError.__init__(self, message, uri)

    def __str__(self) -> str:
        return self.args[0]


def retry_can_help(exc: BaseException) -> bool:
    """Whether retrying an I/O task after ``exc`` may succeed: not after a refused or misconfigured
    store (credentials, permissions, a read-only directory, a missing bucket), a corrupt object or a
    bad key; yes after transient and unknown errors."""
    return not isinstance(exc, (AuthError, BucketNotFoundError, ChecksumError, InvalidKeyError))
