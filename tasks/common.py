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


def resolve_input(stage: str, param: str, **options) -> str:
    """The newest catalog artefact a stage reads when its URI parameter ``param`` is not given.

    What to look up (kind, name from the run options) comes from the stage registry; a missing
    input raises ``MissingInput`` naming the command that produces it and the ``--set`` key.
    """
    from moeflow.platform.stages import find_input, get_stage

    spec = get_stage(stage)
    inp = next(i for i in spec.inputs if i.param == param)
    return find_input(inp, options, stage=stage)


def flow_run_namer(stage: str):
    """A Prefect ``flow_run_name`` callable: ``<stage>-<dataset or run_name>-<recipe>`` from the run's
    parameters and its ``recipe:`` tag, so runs read as what they are, not as "crimson-otter"."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters or {}
        tags = flow_run.tags or []
        parts = [stage]
        for key in ("dataset", "run_name"):
            if isinstance(params.get(key), str) and params[key] not in parts:
                parts.append(params[key])
        recipe = next((t.split(":", 1)[1] for t in tags if t.startswith("recipe:")), None)
        if recipe:
            parts.append(recipe)
        return "-".join(parts)

    return name
