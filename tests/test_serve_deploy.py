"""The deploy stage's engine: gate on the registry's eval tags, record the decision, move the alias,
roll back. In memory (fast) and against a real MLflow server (service)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeflow.platform.serve.deploy import DeployConfig, rollback, run_deploy
from moeflow.platform.serve.gate import GateConfig
from moeflow.platform.serve.registry import MemoryRegistry, RegistryError, alias_history
from moeflow.platform.store.local import LocalStore
from moeflow.platform.tracking import NoopTracker

CFG = DeployConfig(gate=GateConfig(max_regression={"val_loss": 0.05}, min_scores={"hellaswag.acc": 0.3}))


def _decision(store, uri) -> dict:
    return json.loads(store.read_artifact(uri).get_bytes("decision.json"))


def _deploy(reg, store, tracker, version=None, config=CFG):
    return run_deploy(config, store, model_name="moe", registry=reg, tracker=tracker, output_prefix="deploy/moe",
                      version=version)


def _exercise(reg, store, tracker, add):
    v1 = add({"eval.val_loss": "2.50", "eval.hellaswag.acc": "0.35"})
    r1 = _deploy(reg, store, tracker)
    assert r1.promoted and r1.version == v1 and r1.previous is None
    assert reg.alias_version("moe", "champion") == v1
    v2 = add({"eval.val_loss": "2.40", "eval.hellaswag.acc": "0.36"})          # better: promoted
    assert _deploy(reg, store, tracker).promoted and reg.alias_version("moe", "champion") == v2
    v3 = add({"eval.val_loss": "2.60", "eval.hellaswag.acc": "0.40"})          # loss regresses by 0.2 > 0.05
    r3 = _deploy(reg, store, tracker)
    assert not r3.promoted and reg.alias_version("moe", "champion") == v2
    assert any("val_loss" in r and "beyond" in r for r in r3.reasons)
    doc = _decision(store, r3.decision_uri)
    assert doc["promoted"] is False and doc["champion_metrics"]["val_loss"] == 2.40
    assert reg.version_tags("moe", v3)["deploy.decision"] == "rejected"
    v4 = add({"eval.val_loss": "2.30"})                                        # no accuracy: never promoted
    assert not _deploy(reg, store, tracker).promoted
    assert alias_history(reg, "moe", "champion") == [v1, v2]
    back = rollback(store, model_name="moe", alias="champion", registry=reg, tracker=tracker,
                    output_prefix="deploy/moe")
    assert back.version == v1 and reg.alias_version("moe", "champion") == v1
    with pytest.raises(RegistryError, match="no earlier version"):
        rollback(store, model_name="moe", alias="champion", registry=reg, tracker=tracker, output_prefix="deploy/moe")
    return v4


def test_deploy_gate_alias_and_rollback_in_memory(tmp_path):
    reg, store, tracker = MemoryRegistry(), LocalStore(tmp_path / "store"), NoopTracker()
    _exercise(reg, store, tracker, lambda tags: reg.add_version("moe", tags))
    decisions = [t["moeflow.deploy.decision"] for t in tracker.tags if "moeflow.deploy.decision" in t]
    assert decisions == ["promoted", "promoted", "rejected", "rejected", "rollback"]


@pytest.mark.service
def test_deploy_against_a_real_mlflow_registry(tmp_path):
    from mlflow_server import mlflow_server

    from moeflow.platform.serve.registry import MLflowRegistry

    with mlflow_server(tmp_path / "mlflow") as url:
        reg = MLflowRegistry(url)
        reg.client.create_registered_model("moe")

        def add(tags):
            mv = reg.client.create_model_version("moe", source="s3://moeflow-test/models/moe", tags=tags)
            return str(mv.version)

        store = LocalStore(tmp_path / "store")
        v4 = _exercise(reg, store, NoopTracker(), add)
        assert reg.version_tags("moe", v4)["deploy.decision"] == "rejected"
        assert reg.client.get_model_version_by_alias("moe", "champion").version == "1"


def test_resolve_model_by_dir_store_uri_and_registry_alias(tmp_path, monkeypatch):
    from serve_helpers import make_model_dir

    from moeflow.platform.model_refs import ModelRefError
    from moeflow.platform.serve.launch import resolve_served as resolve_model

    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))
    local = make_model_dir(tmp_path / "export")
    assert resolve_model(str(local)).model_dir == str(local.resolve())
    store = LocalStore(tmp_path / "home" / "store")
    with store.write_artifact("runs/moe/hf") as w:
        for p in sorted(local.rglob("*")):
            w.put_file(p.relative_to(local).as_posix(), p)
    uri = store.uri("runs/moe/hf")
    fetched = resolve_model(uri)
    assert (Path(fetched.model_dir) / "tokenizer.json").read_bytes() == (local / "tokenizer.json").read_bytes()
    reg = MemoryRegistry()
    v = reg.add_version("moe", {"moeflow.artifact_uri": uri})
    reg.set_alias("moe", "champion", v)
    r = resolve_model("models:/moe@champion", registry=reg)
    assert (r.name, r.version, r.aliases) == ("moe", v, {"champion": v})
    assert resolve_model("moe/1", registry=reg).version == "1"
    with pytest.raises(ModelRefError, match="no alias"):
        resolve_model("moe@candidate", registry=reg)
    with pytest.raises(ModelRefError, match="cannot resolve"):
        resolve_model("not a ref!", registry=reg)
