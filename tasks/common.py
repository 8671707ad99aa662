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
import logging
import time

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


def run_posttrain_stage(stage: str, config, run, *, data_uri: str, model: str | None, run_name: str,
                        default_from: str, pipeline: dict | None, data_param: str = "data_uri", **run_kwargs) -> dict:
    """What every post-training task does, once: resolve the input version (``model``, default the newest
    ``default_from`` model of ``run_name``), run ``run`` (``run_sft``, ``run_align`` ...) in a stage run,
    record the outputs, register the export as a version of ``<run_name>-<stage>`` with alias ``stage``,
    log the before/after headline and return it."""
    from moeflow.platform import artifacts as A
    from moeflow.platform import model_refs
    from moeflow.platform.config import config_hash
    from moeflow.platform.stage import stage_run

    params = {**config.to_dict(), "model": model, data_param: data_uri, "run_name": run_name}
    with stage_run(stage, params, inputs=[data_uri], pipeline=pipeline) as st:
        ref = model_refs.resolve(model, default_name=A.stage_model_name(run_name, default_from), catalog=st.catalog,
                                 tracker=st.tracker, store=st.store)
        ref.require_hf()  # one line now, not a worker traceback later
        st.catalog.add_lineage(st.run_id, inputs=[ref.uri])
        name = A.stage_model_name(run_name, stage)
        prefix = f"runs/{name}/{config_hash({**config.to_dict(), 'model_uri': ref.uri, data_param: data_uri})}"
        result = run(config, st.store, model_uri=ref.uri, data_uri=data_uri, output_prefix=prefix, tracker=st.tracker,
                     catalog=st.catalog, parent_model_id=ref.model_id, model_name=name, run_name=name, **run_kwargs)
        st.add_output(result.hf_uri or result.checkpoint_uri, kind="model", name=name)
        st.outputs += [u for u in (result.checkpoint_uri, result.expert_load_uri, getattr(result, "reference_uri", None))
                       if u]
        version = (st.register_model_version(name, result.hf_uri, artifact_path="hf", alias=stage,
                                             tags={"moeflow.parent_model_uri": ref.uri}) if result.hf_uri else None)
        st.log_metrics({f"{when}/{k}": v for when, figs in (("before", result.before), ("after", result.after))
                        for k, v in figs.items()})
    return {"hf_uri": result.hf_uri, "checkpoint_uri": result.checkpoint_uri, "model_id": result.model_id,
            "parent_model_id": result.parent_model_id, "expert_load_uri": result.expert_load_uri,
            "mlflow_model_name": name if version else None, "mlflow_model_version": version,
            "before": result.before, "after": result.after, "metrics": result.metrics}


def retry_if_it_can_help(_task, _task_run, state) -> bool:
    """Prefect ``retry_condition_fn`` of I/O tasks: no retry after an error that no retry can fix
    (``store.errors.retry_can_help``), e.g. a read-only store or refused S3 credentials."""
    from moeflow.platform.store.errors import retry_can_help

    try:
        state.result(raise_on_failure=True)
    except Exception as exc:  # the task's own exception
        return retry_can_help(exc)
    return True


# Prefect's cap on stage re-runs; the setting ``stage_retries`` (<= this, its bound) decides below it
# at run time, so a worker's environment (or a test's) is read when a stage fails, not at import.
STAGE_RETRY_LIMIT = 10


def _store_transient_error(exc: BaseException | None):
    """``exc`` itself or an exception it was raised from, when a store ``TransientError``, else None."""
    from moeflow.platform.store.errors import TransientError

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, TransientError):
            return exc
        exc, seen = exc.__cause__, seen + 1
    return None


def retry_on_transient_store_error(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn`` of the stage tasks: re-run a stage only after the store stayed
    unreachable through its own per-request retries (``TransientError``), up to ``stage_retries``
    times, ``stage_retry_delay_s`` apart; never after a user or configuration error.

    STYLE.md lets only I/O tasks retry; a stage may because its writes are manifest-last (a failed
    attempt leaves no visible partial artefact) and its outputs live under config-hashed prefixes, so a
    re-run reuses what the failed attempt committed (curation shards, the tokenizer, pretraining
    checkpoints; a post-training stage redoes its run) and cannot duplicate an output. Without this an
    S3 outage longer than the store's retry budget (``s3_retry_tries`` x ``s3_retry_max_delay_s``)
    fails the whole pipeline.
    """
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # the task's own exception
        transient = _store_transient_error(exc)
    else:
        return False
    if transient is None:
        return False
    settings = get_settings()
    attempt = int(task_run.run_count)  # attempts so far, this failed one included
    if attempt > settings.stage_retries:
        return False
    log = logging.getLogger("moeflow.tasks")
    log.warning("%s: the store stayed unreachable (%s); re-running the stage (%d/%d) in %.0f s "
                "(MOEFLOW_STAGE_RETRIES, MOEFLOW_STAGE_RETRY_DELAY_S)", task.name, transient, attempt,
                settings.stage_retries, settings.stage_retry_delay_s)
    # the wait is here, not in Prefect's retry_delay_seconds, which is fixed when the task is defined
    time.sleep(settings.stage_retry_delay_s)
    return True


STAGE_RETRY = {"retries": STAGE_RETRY_LIMIT, "retry_condition_fn": retry_on_transient_store_error}
