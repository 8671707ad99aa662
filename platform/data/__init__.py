"""Data engine: readers, curation steps, near-duplicate detection, token shards.

Exports are resolved lazily (module ``__getattr__``) so that importing
``moeflow.platform.data`` stays cheap and does not pull numpy/pyarrow-heavy modules, and
so one unfinished module never breaks the others' imports.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Document": "schema",
    "QuarantineRecord": "schema",
    "make_doc_id": "schema",
    "SourceConfig": "sources",
    "SourceError": "sources",
    "CurateConfig": "curate",
    "CurationResult": "curate",
    "CurationError": "curate",
    "run_curation": "curate",
    "iter_artifact_documents": "documents",
    "near_duplicate_clusters": "lsh",
    "compute_signatures": "minhash",
    "clusters_from_signatures": "lsh",
    "MinHashIndex": "lsh",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
