"""Every stage's flow as a Prefect deployment on a process work pool, run by a Prefect worker.

``moeflow up`` runs this module as the ``flows`` service: it makes sure the work pool
``moeflow-local`` (type ``process``) exists, registers each flow of the stage registry as the
deployment ``<flow>/local`` with the ``tiny`` recipe as its default parameters, then becomes
``prefect worker start`` on that pool (the cluster convention: a worker process polls the pool
and runs each flow run in a subprocess). The Prefect UI's Run form, ``prefect deployment run``
and ``moeflow run`` (while ``moeflow up`` is running) all create runs the worker picks up.
Wiring only; the list of stages is ``moeflow.platform.stages.STAGES``.
"""

from __future__ import annotations

import os
import sys

from prefect.deployments.runner import EntrypointType

from moeflow.platform.recipes import load_recipe
from moeflow.platform.stages import DEPLOYMENT_NAME, STAGES, WORK_POOL, flow_kwargs


def ensure_work_pool(name: str = WORK_POOL) -> None:
    """Create the process work pool ``name`` unless it exists (idempotent)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template(),
                                                   description="moeflow's local flow runs"))
        except ObjectAlreadyExists:
            pass


def register_deployments(recipe_name: str = "tiny", work_pool: str = WORK_POOL) -> list[str]:
    """Apply one deployment per registered stage; returns their ``flow/deployment`` names."""
    recipe = load_recipe(recipe_name)
    names = []
    for spec in STAGES.values():
        flow = spec.load_flow()
        deployment = flow.to_deployment(
            name=DEPLOYMENT_NAME, parameters=flow_kwargs(flow, recipe),
            tags=["moeflow", f"recipe:{recipe['name']}", f"stage:{spec.name}"],
            entrypoint_type=EntrypointType.MODULE_PATH,
            description=f"{spec.description}. Defaults: the {recipe['name']!r} recipe.")
        deployment.apply(work_pool_name=work_pool)
        names.append(spec.deployment)
    return names


def main() -> None:
    ensure_work_pool()
    names = register_deployments(os.environ.get("MOEFLOW_SERVE_RECIPE", "tiny"))
    print(f"registered {len(names)} deployments on work pool {WORK_POOL!r}: {', '.join(names)}", flush=True)
    worker = os.path.join(os.path.dirname(sys.executable), "prefect")
    argv = [worker, "worker", "start", "--pool", WORK_POOL, "--type", "process", "--name", f"{WORK_POOL}-worker"]
    os.execv(worker, argv)  # the service's pid becomes the worker's: `moeflow down` stops it


if __name__ == "__main__":
    main()
