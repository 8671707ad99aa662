"""What every stage task shares: the cache policy and small Prefect helpers.

A stage task's result is cached by its inputs (minus the ``pipeline`` ids, which change
every run), its source, and the store + catalog it writes to — so re-running a pipeline
after a failure skips the stages that already finished, and a different ``MOEFLOW_HOME``
never reuses another home's results. The library functions are idempotent as well
(outputs live under config-hashed prefixes and a committed artefact is reused), so a
stage whose cache was wiped still does no work twice.
"""

from __future__ import annotations

import hashlib

from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy

from moeflow.platform.settings import get_settings


def _home_identity(_ctx, _inputs) -> str:
    settings = get_settings()
    return hashlib.sha256(f"{settings.store_uri}|{settings.catalog_db_url}".encode()).hexdigest()[:16]


STAGE_CACHE = (INPUTS - "pipeline") + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_home_identity)


def funnel_markdown(title: str, rows: list[dict]) -> str:
    """A markdown table of a list of dict rows (Prefect artifact description helper)."""
    if not rows:
        return f"# {title}\n\n(no rows)"
    cols = list(rows[0])
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def latest_artifact_uri(kind: str, name: str) -> str:
    """The newest catalog entry of ``kind`` named ``name``, for flows run one stage at a time."""
    from moeflow.platform.catalog import Catalog

    catalog = Catalog.from_settings(get_settings())
    if kind == "model":
        rows = catalog.list_models(name=name, limit=1)
        uri_key = "checkpoint_uri"
    else:
        rows = catalog.list_datasets(kind=kind, name=name, limit=1)
        uri_key = "uri"
    if not rows:
        raise LookupError(f"no {kind} named {name!r} in the catalog: run the stage that produces it first "
                          f"(e.g. `moeflow run pipeline`), or pass its URI explicitly")
    return rows[0][uri_key]
