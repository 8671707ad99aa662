"""The ``smoke`` flow: one task that exercises store, catalog, MLflow and Prefect."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from moeflow.tasks.smoke import smoke_task


class SmokeConfig(BaseModel):
    message: str = "hello from moeflow"


@flow(name="smoke", log_prints=True)
def smoke(smoke: SmokeConfig = SmokeConfig()) -> dict:
    return smoke_task(smoke.message)
