"""Runs whose process died: found on the next start and marked crashed everywhere they show.

A ``moeflow run`` killed with SIGKILL (or by the OOM killer) cannot say it ended, so its catalog run,
its MLflow run and its Prefect flow run would read "running" forever. Each catalog run records its
owner process (``catalog/owner.py``); the next stage run (and ``moeflow up``) finds the runs whose owner
on this host is gone and marks them: catalog ``crashed`` (with the reason), MLflow ``KILLED`` (tag
``moeflow.status=crashed``), Prefect ``Crashed`` when a Prefect API is configured (never by starting
a temporary server just for this). Recovery never fails the run that triggers it: a service that
cannot be reached is logged and left for the next start.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def recover_crashed_runs(catalog, tracker=None) -> list[dict]:
    """Mark the runs of dead processes crashed in the catalog, MLflow and Prefect; returns them."""
    try:
        crashed = catalog.mark_dead_runs_crashed()
    except Exception as err:  # recovery must not block the run that is starting
        log.warning("could not check the catalog for crashed runs: %s", err)
        return []
    for run in crashed:
        log.warning("run %s (%s, started %s) was left running by a dead process: marked crashed",
                    run["id"], run["stage"], run["started_at"])
        if run.get("mlflow_run_id"):
            _mark_mlflow(tracker, run["mlflow_run_id"])
        if run.get("prefect_flow_run_id"):
            _mark_prefect(run["prefect_flow_run_id"])
    return crashed


def _mark_mlflow(tracker, mlflow_run_id: str) -> None:
    client = getattr(tracker, "client", None)  # the MLflow tracker; the no-op one has nothing to mark
    if client is None:
        return
    try:
        if client.get_run(mlflow_run_id).info.status == "RUNNING":
            client.set_tag(mlflow_run_id, "moeflow.status", "crashed")
            client.set_terminated(mlflow_run_id, status="KILLED")
    except Exception as err:
        log.warning("could not mark MLflow run %s killed: %s", mlflow_run_id, err)


def _mark_prefect(flow_run_id: str) -> None:
    if not os.environ.get("PREFECT_API_URL"):
        log.info("no Prefect API configured: Prefect flow run %s is marked on a later start", flow_run_id)
        return
    try:
        from prefect import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is None or not flow_run.state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message="its process died (found by moeflow)"),
                                          force=True)
    except Exception as err:
        log.warning("could not mark Prefect flow run %s crashed: %s", flow_run_id, err)
