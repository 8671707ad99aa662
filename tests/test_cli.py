"""The CLI surface that needs no servers: settings display, recipes, argument errors."""

from __future__ import annotations

from typer.testing import CliRunner

from conftest import free_port

from moeflow.platform.cli import app

runner = CliRunner()


def test_config_show_masks_secrets(moeflow_home, monkeypatch):
    monkeypatch.setenv("MOEFLOW_S3_SECRET_KEY", "super-secret-value")
    monkeypatch.setenv("MOEFLOW_CATALOG_URL", "postgresql://bob:hunter2@db.example/moeflow")
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "super-secret-value" not in result.output and "hunter2" not in result.output
    assert "********" in result.output
    assert str(moeflow_home) in result.output


def test_config_file_is_read(moeflow_home):
    moeflow_home.mkdir(parents=True)
    (moeflow_home / "config.toml").write_text('[moeflow]\nproject = "from-file"\nmlflow_port = 5123\n')
    result = runner.invoke(app, ["config", "show", "--json"])
    assert '"project": "from-file"' in result.output and '"mlflow_port": 5123' in result.output


def test_recipes_lists_tiny():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0 and "tiny" in result.output.split()


def test_run_unknown_flow_and_recipe(moeflow_home):
    bad_flow = runner.invoke(app, ["run", "nope"])
    assert bad_flow.exit_code == 2 and "unknown stage 'nope'" in bad_flow.output
    bad_recipe = runner.invoke(app, ["run", "smoke", "--recipe", "nope"])
    assert bad_recipe.exit_code == 2 and "unknown recipe" in bad_recipe.output


def test_up_rejects_unknown_service(moeflow_home):
    result = runner.invoke(app, ["up", "--only", "nope"])
    assert result.exit_code != 0


def _health_server():
    """An HTTP server on a free port answering 200 to every GET (a stand-in healthy service)."""
    import http.server
    import threading

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_config_show_prints_the_tracking_uri_runs_use(moeflow_home, monkeypatch):
    import json
    import os

    shown = json.loads(runner.invoke(app, ["config", "show", "--json"]).output)
    assert shown["tracking_uri"] == f"sqlite:///{moeflow_home / 'mlflow.db'}"  # no server: the backend itself
    assert shown["prefect_api"].startswith("embedded")
    server = _health_server()  # now an MLflow server of this home is up (its pid file names a live process)
    try:
        monkeypatch.setenv("MOEFLOW_MLFLOW_PORT", str(server.server_address[1]))
        (moeflow_home / "run").mkdir(parents=True, exist_ok=True)
        (moeflow_home / "run" / "mlflow.pid").write_text(str(os.getpid()))
        shown = json.loads(runner.invoke(app, ["config", "show", "--json"]).output)
        assert shown["tracking_uri"] == f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_status_checks_ports_as_well_as_pid_files(moeflow_home, monkeypatch):
    import socket

    with socket.socket() as sock:  # something else holds the dashboard's port; no pid file of ours
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        monkeypatch.setenv("MOEFLOW_DASHBOARD_PORT", str(port))
        monkeypatch.setenv("MOEFLOW_MLFLOW_PORT", str(free_port()))  # nothing listens there
        result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("dashboard"))
    assert "False" in row and "open" in row and f"port {port} is held by pid" in row
    mlflow_row = next(line for line in result.output.splitlines() if line.startswith("mlflow"))
    assert "closed" in mlflow_row and "held" not in mlflow_row


def test_stages_lists_the_registry():
    from moeflow.platform.stages import STAGES

    result = runner.invoke(app, ["stages"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()[1:]] == list(STAGES)


def test_run_prints_the_comparison_table_and_the_deploy_decision(moeflow_home, monkeypatch):
    """What a pipeline returns (its eval comparison rows and deploy result) is printed as a table and a verdict."""
    from moeflow.platform import cli

    result = {"comparison": [{"model": "moe-tiny/1", "arith_mc/acc_norm": 0.375},
                             {"model": "moe-tiny-align/1", "arith_mc/acc_norm": 0.5}],
              "deploy": {"model_name": "moe-tiny-align", "version": "1", "alias": "champion", "promoted": True,
                         "reasons": ["val_loss: no champion yet, nothing to regress from"]}}
    monkeypatch.setattr(cli, "run_in_process", lambda flow, recipe, tags: result)
    out = runner.invoke(app, ["run", "smoke", "--local"])
    assert out.exit_code == 0, out.output
    assert "| model | arith_mc/acc_norm |" in out.output and "| moe-tiny-align/1 | 0.5 |" in out.output
    assert "deploy moe-tiny-align/1: promoted to @champion (val_loss: no champion yet" in out.output
