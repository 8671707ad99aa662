"""The smoke stage: proves the stack end to end (store, catalog, MLflow, Prefect).

It writes a small artefact describing the environment, records it as a dataset in the
catalog with lineage, logs the run to MLflow and publishes a Prefect artifact. Every real
stage task follows this shape.
"""

from __future__ import annotations

import platform as std_platform  # the standard library: moeflow's platform/ never shadows it
import time

from prefect import task
from prefect.artifacts import create_markdown_artifact

from moeflow.platform.stage import stage_run


@task(name="smoke-write", retries=2, retry_delay_seconds=2)
def smoke_task(message: str, pipeline: dict | None = None) -> dict:
    config = {"message": message}
    with stage_run("smoke", config, pipeline=pipeline) as st:
        payload = {"message": message, "python": std_platform.python_version(),
                   "machine": std_platform.machine(), "created_at": time.time()}
        with st.store.write_artifact(f"smoke/{st.config_hash}", metadata={"stage": "smoke"}, overwrite=True) as writer:
            writer.put_json("hello.json", payload)
        artifact = st.store.read_artifact(writer.uri)
        st.add_output(writer.uri, kind="dataset", name="smoke", content_hash=artifact.content_hash,
                      stats={"num_files": len(artifact.names())})
        st.log_metrics({"smoke_bytes": sum(f["size"] for f in artifact.manifest["files"].values())})
        create_markdown_artifact(
            key="smoke-output",
            markdown=f"# smoke\n\nwrote `{writer.uri}`\n\ncatalog run `{st.run_id}`, MLflow run `{st.mlflow_run_id}`",
            description="moeflow smoke artefact",
        )
    return {"uri": writer.uri, "catalog_run_id": st.run_id, "mlflow_run_id": st.mlflow_run_id,
            "content_hash": artifact.content_hash}
