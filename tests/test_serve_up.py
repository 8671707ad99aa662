"""``moeflow up --serve <model>``: the serving gateway as one more local service (status, down, errors).

The fast test starts the real ``moeflow serve`` process with a reference that does not resolve: ``up``
must fail in words, with the serve log's own error, and leave no record behind. The slow test serves a
tiny export on the Ray head that the same ``up`` starts and asks it for a completion over HTTP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from serve_helpers import free_port, make_model_dir


def moeflow(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeflow.platform.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _env(home) -> dict:
    env = dict(os.environ)
    env.update({"MOEFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
                "MOEFLOW_RAY_PORT": str(free_port()), "MOEFLOW_DASHBOARD_PORT": str(free_port())})
    env.pop("PREFECT_API_URL", None)
    return env


def test_serve_service_is_listed_only_once_recorded(tmp_path, monkeypatch):
    from moeflow.platform import services
    from moeflow.platform.settings import Settings

    settings = Settings(home=tmp_path)
    settings.ensure_dirs()
    assert "serve" not in services.services(settings)
    (settings.run_dir / services.SERVE_FILE).write_text(json.dumps({"model_ref": "tiny@champion", "port": 8123}))
    svc = services.services(settings)["serve"]
    assert svc.command[-7:] == ["serve", "--model", "tiny@champion", "--host", settings.host, "--port", "8123"]
    assert svc.health_url == f"http://{settings.host}:8123/health" and svc.port == 8123
    assert services.down(settings, ["serve"]) == [{"name": "serve", "stopped": False}]
    assert "serve" not in services.services(settings), "down forgets the served model"


def test_up_serve_with_a_bad_reference_fails_in_words_and_leaves_nothing(tmp_path):
    env = _env(tmp_path)
    out = moeflow("up", "--only", "serve", "--serve", str(tmp_path / "no-such-export"), "--serve-port",
                  str(free_port()), "--timeout", "120", env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "starting serve ... FAILED" in out.stdout
    assert "serve did not become healthy" in out.stderr and "no-such-export" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "serve.json").exists() and not (tmp_path / "run" / "serve.pid").exists()
    assert "serve" not in moeflow("status", env=env).stdout
    bad = moeflow("up", "--only", "serve", env=env)
    assert bad.returncode == 2 and "needs --serve" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_up_serve_serves_a_model_on_the_up_ray_head_and_down_stops_it(tmp_path):
    model_dir = make_model_dir(tmp_path / "export")
    env = _env(tmp_path / "home")
    port = free_port()
    try:
        out = moeflow("up", "--only", "ray", "--serve", str(model_dir), "--serve-port", str(port), env=env, timeout=400)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"Serving API: http://127.0.0.1:{port}/v1" in out.stdout
        body = json.dumps({"model": "export", "prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        assert answer["usage"]["completion_tokens"] >= 1 and answer["model"].startswith("export@")
        status = moeflow("status", env=env).stdout
        assert any(line.split()[:3] == ["serve", "True", "True"] for line in status.splitlines()), status
    finally:
        down = moeflow("down", env=env, timeout=200)
    assert "serve: stopped" in down.stdout and "ray: stopped" in down.stdout
    assert not (tmp_path / "home" / "run" / "serve.json").exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
