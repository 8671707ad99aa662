"""The smoke task: proves the stack end to end (store, catalog, MLflow, Prefect).

It runs the smoke engine (one small artefact), records it as a dataset in the catalog with
lineage, logs the run to MLflow and publishes a Prefect artifact. Every stage task has this shape.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from moeflow.platform.smoke import SmokeConfig, run_smoke
from moeflow.platform.stage import stage_run
from moeflow.tasks.common import retry_if_it_can_help


@task(name="smoke-write", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_it_can_help)
def smoke_task(config: SmokeConfig, pipeline: dict | None = None) -> dict:
    with stage_run("smoke", config.to_dict(), pipeline=pipeline) as st:
        result = run_smoke(config, st.store, output_prefix=f"smoke/{st.config_hash}")
        st.add_output(result.uri, kind="dataset", name="smoke", content_hash=result.content_hash,
                      stats={"num_files": result.num_files})
        st.log_metrics({"smoke_bytes": result.num_bytes})
        create_markdown_artifact(
            key="smoke-output",
            markdown=f"# smoke\n\nwrote `{result.uri}`\n\ncatalog run `{st.run_id}`, MLflow run `{st.mlflow_run_id}`",
            description="moeflow smoke artefact",
        )
    return {"uri": result.uri, "catalog_run_id": st.run_id, "mlflow_run_id": st.mlflow_run_id,
            "content_hash": result.content_hash}
