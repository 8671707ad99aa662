"""The ``deploy`` flow: an evaluated model version -> promotion gate -> the serving alias."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.serve.deploy import DeployConfig
from moeflow.tasks.common import flow_run_namer
from moeflow.tasks.deploy import deploy_task


@flow(name="deploy", log_prints=True, flow_run_name=flow_run_namer("deploy"))
def deploy(deploy: DeployConfig = DeployConfig(), run_name: str = "moe") -> dict:
    """Defaults: the newest version of the model registered under ``run_name``."""
    result = deploy_task(deploy, deploy.model_name or run_name, deploy.version)
    print(f"{result['model_name']}/{result['version']}: {'promoted' if result['promoted'] else 'rejected'} "
          f"({'; '.join(result['reasons'])})")
    return result
