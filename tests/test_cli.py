"""The CLI surface that needs no servers: settings display, recipes, argument errors."""

from __future__ import annotations

from typer.testing import CliRunner

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
    assert bad_flow.exit_code != 0 and "unknown flow" in bad_flow.output
    bad_recipe = runner.invoke(app, ["run", "smoke", "--recipe", "nope"])
    assert bad_recipe.exit_code == 2 and "unknown recipe" in bad_recipe.output


def test_up_rejects_unknown_service(moeflow_home):
    result = runner.invoke(app, ["up", "--only", "nope"])
    assert result.exit_code != 0
