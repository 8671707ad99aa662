"""The pretrain stage: token shards -> a trained MoE checkpoint, its HF export and expert-load log."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from moeflow.platform.train.config import PretrainConfig
from moeflow.platform.stage import stage_run
from moeflow.platform.train.launcher import run_pretrain
from moeflow.tasks.common import STAGE_CACHE, STAGE_RETRY


@task(name="pretrain", cache_policy=STAGE_CACHE, persist_result=True, **STAGE_RETRY)
def pretrain_task(config: PretrainConfig, tokens_uri: str, run_name: str = "moe", num_workers: int = 1,
                  use_gpu: bool = False, pipeline: dict | None = None) -> dict:
    with stage_run("pretrain", {**config.to_dict(), "run_name": run_name, "num_workers": num_workers},
                   inputs=[tokens_uri], pipeline=pipeline) as st:
        result = run_pretrain(config, st.store, tokens_uri=tokens_uri,
                              output_prefix=f"runs/{run_name}/{st.config_hash}", num_workers=num_workers,
                              use_gpu=use_gpu, tracker=st.tracker, model_name=run_name)
        st.add_output(result.checkpoint_uri, kind="model", name=run_name, stats=result.metrics)
        for uri in (result.hf_uri, result.expert_load_uri):
            if uri:
                st.outputs.append(uri)
        model_version = None
        if result.hf_uri:  # the HF export becomes a version of the MLflow registered model `run_name`
            model_version = st.register_model_version(run_name, result.hf_uri, artifact_path="hf",
                                                      tags={"moeflow.checkpoint_uri": result.checkpoint_uri})
        create_table_artifact(key="pretrain-metrics", table=[{"metric": k, "value": v} for k, v in result.metrics.items()],
                              description=f"final metrics of {result.checkpoint_uri}")
    return {"checkpoint_uri": result.checkpoint_uri, "hf_uri": result.hf_uri,
            "expert_load_uri": result.expert_load_uri, "metrics": result.metrics, "steps": result.steps,
            "mlflow_model_version": model_version}
