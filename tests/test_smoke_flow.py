"""The smoke flow end to end: a Prefect flow run that writes to the object store, records
lineage in the catalog and a run in MLflow (SQLite backend under MOEFLOW_HOME)."""

from __future__ import annotations

import pytest

from moeflow.platform.catalog import Catalog
from moeflow.platform.settings import get_settings
from moeflow.platform.store import open_store


@pytest.fixture
def home(moeflow_home, prefect_harness):
    return moeflow_home


def test_smoke_flow_records_everything(home):
    from mlflow.tracking import MlflowClient
    from prefect import get_client

    from moeflow.flows.smoke import SmokeConfig, smoke

    result = smoke(SmokeConfig(message="hi there"))
    settings = get_settings()

    # object store: a committed artefact whose content we can read back and verify
    art = open_store(settings).read_artifact(result["uri"])
    assert art.get_json("hello.json")["message"] == "hi there"
    assert art.content_hash == result["content_hash"]
    assert result["uri"].startswith(settings.store_uri)

    # catalog: a succeeded run with the output as lineage and the dataset registered
    catalog = Catalog.from_settings(settings)
    run = catalog.get_run(result["catalog_run_id"])
    assert run["stage"] == "smoke" and run["status"] == "succeeded"
    assert run["mlflow_run_id"] == result["mlflow_run_id"]
    assert run["prefect_flow_run_id"]
    assert result["uri"] in run["outputs"]
    upstream = catalog.upstream(result["uri"])
    assert [(n["type"], n.get("id")) for n in upstream] == [("run", result["catalog_run_id"])]
    assert catalog.downstream(result["uri"]) == []
    assert any(d["uri"] == result["uri"] for d in catalog.list_datasets(name="smoke"))

    # MLflow: the run exists, finished, with params, metric and the catalog/prefect tags
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    mrun = client.get_run(result["mlflow_run_id"])
    assert mrun.info.status == "FINISHED"
    assert mrun.data.params["message"] == "hi there"
    assert mrun.data.metrics["smoke_bytes"] > 0
    assert mrun.data.tags["moeflow.catalog_run_id"] == result["catalog_run_id"]
    assert mrun.data.tags["moeflow.prefect_flow_run_id"] == run["prefect_flow_run_id"]

    # Prefect: the flow run is recorded and completed
    import asyncio
    from uuid import UUID

    async def state():
        async with get_client() as client_:
            fr = await client_.read_flow_run(UUID(run["prefect_flow_run_id"]))
            return fr.state.type.value, fr.name

    state_type, _ = asyncio.run(state())
    assert state_type == "COMPLETED"


def test_smoke_failure_is_recorded(home, monkeypatch):
    """A stage that fails leaves a failed catalog run with the error, and no visible artefact."""
    from moeflow.platform.stage import stage_run

    settings = get_settings()
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("smoke", {"x": 1}, settings=settings) as st:
            with st.store.write_artifact("smoke/failing") as w:
                w.put_bytes("a.bin", b"123")
                raise RuntimeError("boom")
    catalog = Catalog.from_settings(settings)
    runs = catalog.list_runs(stage="smoke")
    assert runs[0]["status"] == "failed" and "boom" in runs[0]["error"]
    assert not st.store.artifact_exists("smoke/failing")


@pytest.mark.slow
def test_library_logging_reaches_the_flow_runs_logs(home, tmp_path):
    """A flow run in its own process (as the worker runs it) with the services' Prefect environment:
    the library's 'moeflow.*' records are in the run's logs on the server, not only on a terminal."""
    import asyncio
    import json
    import os
    import subprocess
    import sys
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL

    from moeflow.platform.services import prefect_env

    run_home = tmp_path / "run-home"
    env = {**os.environ, **prefect_env(get_settings(home=run_home)), "MOEFLOW_HOME": str(run_home),
           "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    code = "import json; from moeflow.flows.smoke import smoke; print(json.dumps(smoke()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    flow_run_id = Catalog.from_settings(get_settings(home=run_home)).get_run(result["catalog_run_id"])["prefect_flow_run_id"]

    async def logs():
        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])))

    names = {entry.name for entry in asyncio.run(logs())}
    assert any(name.startswith("moeflow.") for name in names), names
