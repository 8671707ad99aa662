"""The sft stage: a model version + chat data -> a fine-tuned model version (parent: the input), MLflow alias 'sft'."""

from __future__ import annotations

from prefect import task

from moeflow.platform import artifacts as A
from moeflow.platform.config import config_hash
from moeflow.platform.posttrain.engine import resolve_model
from moeflow.platform.posttrain.sft import SFTConfig, run_sft
from moeflow.platform.stage import stage_run
from moeflow.tasks.common import STAGE_CACHE


@task(name="sft", cache_policy=STAGE_CACHE, persist_result=True)
def sft_task(config: SFTConfig, data_uri: str, prompts_uri: str | None = None, model: str | None = None,
             run_name: str = "moe", num_workers: int = 1, use_gpu: bool = False, pipeline: dict | None = None) -> dict:
    """``model``: catalog id, ``name@alias`` or HF-export URI; default the newest pretrained ``run_name``."""
    with stage_run("sft", {**config.to_dict(), "model": model, "data_uri": data_uri, "run_name": run_name},
                   inputs=[data_uri], pipeline=pipeline) as st:
        ref = resolve_model(model, catalog=st.catalog, tracker=st.tracker,
                            default_name=A.stage_model_name(run_name, "pretrain"))
        st.catalog.add_lineage(st.run_id, inputs=[ref.uri])
        name = A.stage_model_name(run_name, "sft")
        prefix = f"runs/{name}/{config_hash({**config.to_dict(), 'model_uri': ref.uri, 'data_uri': data_uri})}"
        result = run_sft(config, st.store, model_uri=ref.uri, data_uri=data_uri, prompts_uri=prompts_uri,
                         output_prefix=prefix, tracker=st.tracker, catalog=st.catalog, parent_model_id=ref.model_id,
                         model_name=name, run_name=name, num_workers=num_workers, use_gpu=use_gpu)
        st.add_output(result.hf_uri or result.checkpoint_uri, kind="model", name=name)
        st.outputs += [u for u in (result.checkpoint_uri, result.expert_load_uri) if u]
        version = (st.register_model_version(name, result.hf_uri, artifact_path="hf", alias="sft",
                                             tags={"moeflow.parent_model_uri": ref.uri})
                   if result.hf_uri else None)
        st.log_metrics({f"{when}/{k}": v for when, figs in (("before", result.before), ("after", result.after))
                        for k, v in figs.items()})
    return {"hf_uri": result.hf_uri, "checkpoint_uri": result.checkpoint_uri, "model_id": result.model_id,
            "parent_model_id": result.parent_model_id, "expert_load_uri": result.expert_load_uri,
            "mlflow_model_version": version, "before": result.before, "after": result.after,
            "metrics": result.metrics}
