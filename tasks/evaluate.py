"""The evaluate task: model versions -> benchmark scores, validation loss, reports, a comparison table."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from moeflow.platform.eval.config import EvaluateConfig
from moeflow.platform.eval.decontaminate import training_data_uris
from moeflow.platform.eval.engine import comparison_markdown, run_evaluate
from moeflow.platform.stage import stage_run
from moeflow.tasks.common import STAGE_CACHE, STAGE_RETRY

__all__ = ["EvaluateConfig", "evaluate_task"]


@task(name="evaluate", cache_policy=STAGE_CACHE, persist_result=True, **STAGE_RETRY)
def evaluate_task(config: EvaluateConfig, checkpoint_uri: str | None = None, tokens_uri: str | None = None,
                  pipeline: dict | None = None, models: list[str] | None = None) -> dict:
    """``models``: references (``name@alias``, ``catalog:<id>``, URIs); default: ``config.models``, else
    ``[checkpoint_uri]``.
    Returns the flat metrics (``val_loss``, ``<task>/<metric>``, ``<model>/...`` when several) and, under
    ``comparison``, the table's rows (model version x each task's main metric) for the CLI to print."""
    refs = list(models or config.models or ([checkpoint_uri] if checkpoint_uri else []))
    inputs = [r for r in [*refs, tokens_uri] if r and "://" in r]
    with stage_run("evaluate", config.to_dict(), inputs=inputs, pipeline=pipeline) as st:
        training = training_data_uris(st.catalog, inputs) if config.decontaminate else []
        result = run_evaluate(config, st.store, model_uris=refs, tokens_uri=tokens_uri, training_data_uris=training,
                              output_prefix=f"evals/{st.config_hash}", tracker=st.tracker, catalog=st.catalog)
        for ev in result.models:  # lineage edge run -> results (the catalog keeps no dataset row for them)
            st.outputs.append(ev.results_uri)
        st.metrics.update(result.metrics)
        print(f"evaluation (training data checked for contamination: {len(training)} artefacts)\n"
              + comparison_markdown(result.comparison))
        create_table_artifact(key="evaluation", table=result.comparison, description="model versions x tasks")
    return {**{k.removeprefix("eval/"): v for k, v in result.metrics.items()}, "comparison": result.comparison}
