"""The deploy stage end to end on the embedded services (SQLite MLflow + catalog under a fresh home):
the task gates and promotes, the decision lands in MLflow and the catalog, the CLI rolls back."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moeflow.platform.serve.deploy import DeployConfig
from moeflow.platform.serve.gate import GateConfig


@pytest.fixture
def registry(moeflow_home):
    from moeflow.platform.serve.registry import MLflowRegistry
    from moeflow.platform.settings import get_settings

    get_settings.cache_clear() if hasattr(get_settings, "cache_clear") else None
    settings = get_settings()
    settings.ensure_dirs()
    reg = MLflowRegistry(settings.tracking_uri)
    reg.client.create_registered_model("moe")
    return reg


def _add(reg, loss: float) -> str:
    mv = reg.client.create_model_version("moe", source="s3://moeflow-test/m", tags={"eval.val_loss": str(loss)})
    return str(mv.version)


def test_deploy_task_promotes_records_and_cli_rolls_back(registry, moeflow_home):
    from moeflow.platform.catalog import Catalog
    from moeflow.platform.cli import app
    from moeflow.tasks.deploy import deploy_task

    cfg = DeployConfig(gate=GateConfig(max_regression={"val_loss": 0.01}))
    v1 = _add(registry, 2.5)
    assert deploy_task.fn(cfg, "moe")["promoted"]
    v2 = _add(registry, 2.4)
    out = deploy_task.fn(cfg, "moe")
    assert out["promoted"] and out["previous"] == v1 and registry.alias_version("moe", "champion") == v2
    _add(registry, 2.9)
    bad = deploy_task.fn(cfg, "moe")
    assert not bad["promoted"] and registry.alias_version("moe", "champion") == v2

    catalog = Catalog.from_settings()
    try:
        row = catalog.get_artifact(bad["decision_uri"])
        assert row["kind"] == "deploy_decision"
    finally:
        catalog.close()
    runs = registry.client.search_runs(registry.client.get_experiment_by_name("moeflow").experiment_id,
                                       "tags.`moeflow.deploy.decision` = 'rejected'")
    assert len(runs) == 1 and "beyond" in runs[0].data.tags["moeflow.deploy.reasons"]
    promoted = registry.client.search_runs(registry.client.get_experiment_by_name("moeflow").experiment_id,
                                           "tags.`moeflow.deploy.decision` = 'promoted'")
    assert all("no gateway is running" in r.data.tags["moeflow.deploy.serving"] for r in promoted)

    result = CliRunner().invoke(app, ["deploy", "rollback", "--model", "moe"])
    assert result.exit_code == 0, result.output
    assert f"back to {v1}" in result.output and registry.alias_version("moe", "champion") == v1
    again = CliRunner().invoke(app, ["deploy", "rollback", "--model", "moe"])
    assert again.exit_code == 2 and "no earlier version" in again.output
    assert json.loads(registry.get_model_tag("moe", "moeflow.alias_history.champion")) == [v1]


def test_deploy_is_in_the_stage_registry_and_recipes_validate_it():
    from moeflow.platform.stages import get_stage, validate_recipe

    spec = get_stage("deploy")
    assert spec.load_config() is DeployConfig and spec.load_flow().name == "deploy"
    checked = validate_recipe({"deploy": {"alias": "prod", "gate": {"min_scores": {"hellaswag.acc": 0.3}}}})
    assert checked["deploy"].gate.min_scores == {"hellaswag.acc": 0.3}
    with pytest.raises(Exception, match="alais|alias"):
        validate_recipe({"deploy": {"alais": "prod"}})


def test_serve_cli_checks_its_arguments_and_reads_a_config_file(tmp_path):
    from serve_helpers import make_model_dir

    from moeflow.platform.cli import app
    from moeflow.platform.serve.launch import config_for, load_config_file

    runner = CliRunner()
    assert runner.invoke(app, ["serve"]).exit_code == 2
    r = runner.invoke(app, ["serve", "--model", "nope@champion!"])
    assert r.exit_code == 2 and "cannot resolve" in r.output
    r = runner.invoke(app, ["serve", "--model", str(tmp_path), "--quantize", "int4"])
    assert r.exit_code == 2 and "int8" in r.output
    d1, d2 = make_model_dir(tmp_path / "a"), make_model_dir(tmp_path / "b", seed=1)
    (tmp_path / "serve.yaml").write_text(f"""
models:
  - {{name: moe, version: "1", model_dir: {d1}}}
  - {{name: moe, version: "2", model_dir: {d2}, engine: {{quantize: int8}}}}
aliases: {{moe: {{champion: "1", candidate: "2"}}}}
splits: {{moe: [{{target: champion, weight: 0.9}}, {{target: candidate, weight: 0.1}}]}}
gateway: {{port: 8123}}
""")
    cfg = load_config_file(str(tmp_path / "serve.yaml"))
    assert [m.key for m in cfg.models] == ["moe@1", "moe@2"] and cfg.models[1].engine.quantize == "int8"
    assert cfg.splits["moe"][1] == {"target": "candidate", "weight": 0.1}
    one = config_for(str(d1), port=9001, replicas=2, quantize="int8")
    assert one.models[0].num_replicas == 2 and one.models[0].engine.quantize == "int8" and one.gateway.port == 9001
    (tmp_path / "bad.yaml").write_text(f"models:\n  - {{name: moe, version: '1', model_dir: {d1}, replica: 2}}\n")
    r = runner.invoke(app, ["serve", "--config", str(tmp_path / "bad.yaml")])
    assert r.exit_code == 2 and "num_replicas" in r.output
    # --engine key=value: EngineConfig settings of --model, checked before anything is resolved or started
    tuned = config_for(str(d1), engine={"max_batch": 64, "process": True, "compile": "inductor"})
    e = tuned.models[0].engine
    assert (e.max_batch, e.process, e.compile, e.quantize) == (64, "on", "inductor", "none")
    r = runner.invoke(app, ["serve", "--model", str(d1), "--engine", "process=of"])
    assert r.exit_code == 2 and "--engine: process: Input should be 'auto', 'on' or 'off'" in r.output
    r = runner.invoke(app, ["serve", "--model", str(d1), "--engine", "proces=true"])
    assert r.exit_code == 2 and "--engine: unknown field 'proces'" in r.output and "did you mean 'process'" in r.output
    r = runner.invoke(app, ["serve", "--model", str(d1), "--engine", "max_batch=0"])
    assert r.exit_code == 2 and "max_batch" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["serve", "--model", str(d1), "--engine", "max_batch"])
    assert r.exit_code == 2 and "key=value" in r.output
    r = runner.invoke(app, ["serve", "--config", str(tmp_path / "serve.yaml"), "--engine", "max_batch=4"])
    assert r.exit_code == 2 and "--config file" in r.output
