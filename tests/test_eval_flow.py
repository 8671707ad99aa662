"""The evaluate flow through Prefect: a registered model version in, the evaluate run's metrics, the model
version's tags, the catalog run and its results artefact out (SQLite MLflow and catalog under MOEFLOW_HOME)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.hf import export_hf
from moeflow.models.tokenizer import train_bpe
from moeflow.platform.catalog import Catalog
from moeflow.platform.eval.config import EvaluateConfig
from moeflow.platform.eval.tasks import CONFIG_DIR
from moeflow.platform.settings import get_settings
from moeflow.platform.stage import stage_run
from moeflow.platform.store import open_store

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="code tasks use the Linux sandbox"), pytest.mark.slow]


@pytest.fixture
def registered(moeflow_home, prefect_harness, tmp_path, one_cpu_thread):
    """A tiny model exported to HF, stored, and registered as `moe-flow@pretrained` by a stage run."""
    texts = [json.loads(x)["prompt"] for x in (CONFIG_DIR / "arith.jsonl").read_text().splitlines()] * 3
    tok = train_bpe(texts, vocab_size=400)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, max_seq_len=128))
    local = tmp_path / "hf"
    export_hf(model, local, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    tok.save(local / "tokenizer.json")
    store = open_store(get_settings(), create_bucket=True)
    with store.write_artifact("runs/moe-flow/hf", metadata={"kind": "hf-model"}) as w:
        for p in sorted(local.iterdir()):
            w.put_file(p.name, p)
    hf_uri = store.uri("runs/moe-flow/hf")
    with stage_run("pretrain", {"fake": True}) as st:
        st.add_output(hf_uri, kind="model", name="moe-flow")
        version = st.register_model_version("moe-flow", hf_uri, artifact_path="hf")
    return hf_uri, version


def test_evaluate_flow_scores_a_registry_alias_and_writes_back(registered, capsys):
    from mlflow.tracking import MlflowClient

    from moeflow.flows.evaluate import evaluate

    hf_uri, version = registered
    config = EvaluateConfig(models=["moe-flow@pretrained"], tasks=["arith_mc", "stdlib_bpb", "stdlib_doctests"],
                            limit=3, specialisation_texts=4, code_workers=2)
    metrics = evaluate(evaluate=config, dataset="none", run_name="moe-flow")
    assert {"arith_mc/acc_norm", "stdlib_bpb/bpb", "stdlib_doctests/pass_at_1"} <= set(metrics)
    printed = capsys.readouterr()
    assert "| moe-flow/1 |" in printed.out + printed.err  # the comparison table is printed (Prefect logs it)

    settings = get_settings()
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    mv = client.get_model_version("moe-flow", version)
    assert float(mv.tags["eval.arith_mc.acc_norm"]) == pytest.approx(metrics["arith_mc/acc_norm"], abs=1e-5)
    catalog = Catalog.from_settings(settings)
    try:
        run = next(r for r in catalog.list_runs() if r["stage"] == "evaluate")
        assert run["status"] == "succeeded" and run["metrics"]["eval/stdlib_bpb/bpb"] == pytest.approx(metrics["stdlib_bpb/bpb"])
        (results_uri,) = run["outputs"]
        assert json.loads(open_store(settings).read_artifact(results_uri).get_bytes("results.json"))["mlflow_version"] == version
        assert catalog.get_artifact(hf_uri)["metrics"]["eval/arith_mc/acc"] == pytest.approx(metrics["arith_mc/acc"])
        mlflow_run = client.get_run(run["mlflow_run_id"])
        assert mlflow_run.data.metrics["eval/arith_mc/acc_norm"] == pytest.approx(metrics["arith_mc/acc_norm"])
    finally:
        catalog.close()
