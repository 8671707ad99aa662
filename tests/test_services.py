"""``moeflow up/status/down`` with the real servers, and a smoke run visible in each UI.

Ports are free ones picked per session so the test never collides with a developer's
running ``moeflow up``. This is the slowest test module (~1 minute on 2 cores): the
Prefect server, MLflow server, Streamlit and a Ray head all start for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = [pytest.mark.service, pytest.mark.slow]


def moeflow(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moeflow.platform.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("services-home")
    env = dict(os.environ)
    env.update({
        "MOEFLOW_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "MOEFLOW_PREFECT_PORT": str(free_port()),
        "MOEFLOW_MLFLOW_PORT": str(free_port()),
        "MOEFLOW_DASHBOARD_PORT": str(free_port()),
        "MOEFLOW_RAY_PORT": str(free_port()),
    })
    env.pop("PREFECT_API_URL", None)
    out = moeflow("up", env=env)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        yield env, home, out.stdout
    finally:
        moeflow("down", env=env, timeout=120)


def get_json(url: str, data: dict | None = None):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_up_is_healthy_idempotent_and_smoke_is_visible(stack):
    env, home, first_output = stack
    assert "Prefect UI" in first_output and "MLflow UI" in first_output and "Dashboard" in first_output

    status = moeflow("status", env=env)
    assert status.returncode == 0
    rows = [line.split() for line in status.stdout.splitlines()[1:]]
    assert {r[0]: r[2] for r in rows} == {"prefect": "True", "mlflow": "True", "dashboard": "True", "ray": "True",
                                          "flows": "True"}

    again = moeflow("up", env=env)
    assert again.returncode == 0 and again.stdout.count("already running") == 5
    for name in ("prefect", "mlflow", "dashboard"):
        assert (home / "run" / f"{name}.pid").is_file()
        assert (home / "logs" / f"{name}.log").is_file()

    # a flow run joins the head that `up` started instead of starting its own Ray
    address = (home / "run" / "ray_address").read_text().strip()
    probe = subprocess.run([sys.executable, "-c", "import ray; from moeflow.platform.compute import ensure_ray; "
                            "ensure_ray(); print(ray.get_runtime_context().gcs_address)"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert probe.returncode == 0, probe.stderr[-2000:]
    # Ray reports the node's own IP; the port identifies the head (a fresh ray.init picks another)
    assert probe.stdout.strip().splitlines()[-1].rsplit(":", 1)[1] == address.rsplit(":", 1)[1]

    run = moeflow("run", "smoke", "--set", "smoke.message=visible everywhere", env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout[run.stdout.index("{"):run.stdout.rindex("}") + 1])

    # Prefect server: the flow run went through the smoke deployment (its page lists it), ran on the
    # worker, completed, and reads as what it is (name and tags from the recipe and stage)
    prefect = f"http://127.0.0.1:{env['MOEFLOW_PREFECT_PORT']}/api"
    assert "of deployment smoke/local" in run.stdout, run.stdout[-2000:]
    deployment = get_json(f"{prefect}/deployments/name/smoke/local")
    flow_runs = get_json(f"{prefect}/flow_runs/filter",
                         {"limit": 10, "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
    done = [fr for fr in flow_runs if fr["state_type"] == "COMPLETED"]
    assert done, flow_runs
    assert done[0]["name"] == "smoke-tiny" and {"recipe:tiny", "stage:smoke", "dataset:tiny"} <= set(done[0]["tags"])
    assert done[0]["work_pool_name"] == "moeflow-local"
    workers = get_json(f"{prefect}/work_pools/moeflow-local/workers/filter", {})
    assert any(w["status"] == "ONLINE" for w in workers), workers
    assert (urllib.request.urlopen(f"http://127.0.0.1:{env['MOEFLOW_PREFECT_PORT']}/", timeout=30).status == 200)

    # MLflow server: the stage run, logged through the server
    mlflow = f"http://127.0.0.1:{env['MOEFLOW_MLFLOW_PORT']}"
    mrun = get_json(f"{mlflow}/api/2.0/mlflow/runs/get?run_id={result['mlflow_run_id']}")["run"]
    assert mrun["info"]["status"] == "FINISHED"
    assert {p["key"]: p["value"] for p in mrun["data"]["params"]}["message"] == "visible everywhere"

    # dashboard answers (Streamlit renders client-side; its health endpoint and page respond)
    dash = f"http://127.0.0.1:{env['MOEFLOW_DASHBOARD_PORT']}"
    assert urllib.request.urlopen(f"{dash}/_stcore/health", timeout=30).status == 200
    assert urllib.request.urlopen(dash, timeout=30).status == 200


def test_down_stops_everything(tmp_path):
    env = dict(os.environ)
    env.update({"MOEFLOW_HOME": str(tmp_path), "MOEFLOW_DASHBOARD_PORT": str(free_port())})
    started = moeflow("up", "--only", "dashboard", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int((tmp_path / "run" / "dashboard.pid").read_text())
    stopped = moeflow("down", "--only", "dashboard", env=env)
    assert "dashboard: stopped" in stopped.stdout
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    status = moeflow("status", env=env)
    assert "dashboard" in status.stdout


def test_down_leaves_other_rays_alone(stack):
    """Stopping the services' Ray head must not kill a Ray this process started itself."""
    import ray

    from moeflow.platform.compute import ensure_ray

    env, home, _ = stack
    ensure_ray()  # this test process's own local Ray (the test session's settings, not the stack's)
    own = ray.get_runtime_context().gcs_address
    moeflow("down", "--only", "ray", env=env)
    assert not (home / "run" / "ray_address").exists()
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == own
    assert ray.get(ray.put(41)) + 1 == 42
    restarted = moeflow("up", "--only", "ray", env=env)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr


def test_ui_can_start_a_flow_run_through_its_deployment(stack):
    """What the Prefect UI's "Run" button does: create a run of a served deployment, with parameters."""
    import time

    env, home, _ = stack
    prefect = f"http://127.0.0.1:{env['MOEFLOW_PREFECT_PORT']}/api"
    names = {d["name"] + "@" + d["flow_id"] for d in get_json(f"{prefect}/deployments/filter", {"limit": 50})}
    from moeflow.platform.stages import STAGES

    assert len(names) == len(STAGES)  # one deployment per registered stage
    deployment = get_json(f"{prefect}/deployments/name/smoke/local")
    assert deployment["parameters"]["smoke"]["message"] == "hello from the tiny recipe"
    assert "smoke" in deployment["parameter_openapi_schema"]["properties"]  # the UI's form
    run = get_json(f"{prefect}/deployments/{deployment['id']}/create_flow_run",
                   {"parameters": {"smoke": {"message": "started from the UI"}}})
    deadline = time.monotonic() + 240
    state = None
    while time.monotonic() < deadline:
        state = get_json(f"{prefect}/flow_runs/{run['id']}")["state_type"]
        if state in ("COMPLETED", "FAILED", "CRASHED"):
            break
        time.sleep(2)
    assert state == "COMPLETED", (home / "logs" / "flows.log").read_text()[-3000:]
    # the served run logged through the MLflow server of the stack
    mlflow = f"http://127.0.0.1:{env['MOEFLOW_MLFLOW_PORT']}"
    experiment = get_json(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=moeflow")
    found = get_json(f"{mlflow}/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [experiment["experiment"]["experiment_id"]],
                      "filter": "params.message = 'started from the UI'"})
    assert len(found.get("runs", [])) == 1
