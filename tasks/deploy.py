"""The deploy task: gate a registered model version and move the serving alias.

(Rolling back is an operator action, ``moeflow deploy rollback``: ``platform.serve.deploy.rollback_run``.)
"""

from __future__ import annotations

from prefect import task

from moeflow.platform import artifacts as A
from moeflow.platform.serve.deploy import DeployConfig, follow_promotion, run_deploy
from moeflow.platform.serve.registry import MLflowRegistry
from moeflow.platform.stage import stage_run

__all__ = ["DeployConfig", "deploy_task"]


@task(name="deploy")  # not cached: the answer depends on the registry's state, not only on the inputs
def deploy_task(config: DeployConfig, model_name: str, version: str | None = None, pipeline: dict | None = None) -> dict:
    with stage_run("deploy", config.to_dict(), pipeline=pipeline) as st:
        result = run_deploy(config, st.store, model_name=model_name, version=version,
                            registry=MLflowRegistry(st.settings.tracking_uri), tracker=st.tracker,
                            output_prefix=f"deploy/{model_name}")
        st.add_output(result.decision_uri, kind=A.DEPLOY_DECISION, name=f"{model_name}-deploy")
        st.log_metrics({"deploy/promoted": float(result.promoted)})
        st.tracker.set_tags({"moeflow.deploy.serving": follow_promotion(result, st.settings)})
    return result.to_dict()
