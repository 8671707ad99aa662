"""What a stage run looks like in MLflow: named after the pipeline run, described with its Prefect flow run
and artefacts, inputs with readable names, one-off results as single values, and the model registered as a
pyfunc whose description is the model card (MLflow SQLite backend and Prefect test server, both real)."""

from __future__ import annotations

import pytest
import torch

from moeflow.platform.catalog import Catalog
from moeflow.platform.settings import get_settings


@pytest.fixture
def home(moeflow_home, prefect_harness):
    return moeflow_home


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=get_settings().tracking_uri)


def test_stage_runs_are_named_described_and_name_their_inputs(home):
    from prefect import flow, task
    from prefect.context import FlowRunContext

    from moeflow.platform.stage import stage_run
    from moeflow.platform.store import open_store

    settings = get_settings()
    store = open_store(settings, create_bucket=True)
    with store.write_artifact("datasets/x/raw/ff00ff00ff00") as w:
        w.put_bytes("a.txt", b"raw")
    raw_uri = store.uri("datasets/x/raw/ff00ff00ff00")
    with Catalog.from_settings(settings) as catalog:
        catalog.register_dataset("x-raw", raw_uri, store.read_artifact("datasets/x/raw/ff00ff00ff00").content_hash)

    @task
    def curate_like(ids: dict) -> dict:
        with stage_run("curate", {"threshold": 0.5}, inputs=[raw_uri], pipeline=ids) as st:
            with st.store.write_artifact("datasets/x/curated/0123abcd9999") as w:
                w.put_bytes("b.txt", b"kept")
            out_uri = st.add_output(st.store.uri("datasets/x/curated/0123abcd9999"), name="x-curated")
            st.log_metrics({"docs_out": 3})
            return {"mlflow_run_id": st.mlflow_run_id, "out_uri": out_uri}

    @flow(flow_run_name="pipeline-x-tiny")
    def pipeline_like() -> dict:
        with stage_run("pipeline", {}) as run:
            child = curate_like({"catalog_run_id": run.run_id, "mlflow_run_id": run.mlflow_run_id})
            return {"pipeline": run.mlflow_run_id, "flow_run_id": str(FlowRunContext.get().flow_run.id), **child}

    out = pipeline_like()
    client = _client()
    parent, child = client.get_run(out["pipeline"]), client.get_run(out["mlflow_run_id"])
    assert parent.info.run_name == "pipeline-x-tiny"
    assert child.info.run_name == "pipeline-x-tiny/curate"
    assert [d.dataset.name for d in child.inputs.dataset_inputs] == ["x-raw v1"]
    note = child.data.tags["mlflow.note.content"]
    assert note.startswith("**curate** · succeeded")
    assert f"{settings.prefect_url.removesuffix('/api')}/runs/flow-run/{out['flow_run_id']}" in note
    assert f"- x-raw v1: `{raw_uri}`" in note and f"- `{out['out_uri']}`" in note
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "docs_out")] == [(0, 3.0)]
    experiment = client.get_experiment(child.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_failed_stage_says_so_in_its_description(moeflow_home):
    from moeflow.platform.stage import stage_run

    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("tokenize", {}, inputs=["file:///nowhere/datasets/y/curated/abcdef123456"]) as st:
            raise RuntimeError("boom")
    run = _client().get_run(st.mlflow_run_id)
    assert run.info.run_name == "tokenize"  # no pipeline, no Prefect flow run
    assert run.data.tags["mlflow.note.content"].startswith("**tokenize** · failed")
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["y-curated@abcdef12"]


@pytest.mark.service
def test_register_model_version_is_a_pyfunc_over_the_export_with_the_card(moeflow_home, tmp_path, one_cpu_thread):
    import mlflow

    from moeflow.models import ModelConfig, MoETransformer
    from moeflow.models.hf import export_hf
    from moeflow.models.model_card import ModelCardInfo
    from moeflow.models.tokenizer import train_bpe
    from moeflow.platform.stage import stage_run

    tok = train_bpe(["What is 2 + 3? The answer is 5. " * 30], vocab_size=300)
    torch.manual_seed(0)
    local = export_hf(MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=320)).eval(), tmp_path / "hf",
                      tokenizer=tok, card=ModelCardInfo(name="moe-stage", metrics={"val_loss": 4.5}))
    with stage_run("pretrain", {}) as st:
        with st.store.write_artifact("runs/moe-stage/abc/hf") as w:
            for path in sorted(local.rglob("*")):
                w.put_file(path.relative_to(local).as_posix(), path)
        hf_uri = st.store.uri("runs/moe-stage/abc/hf")
        version = st.register_model_version("moe-stage", hf_uri, artifact_path="hf")
    client = _client()
    mv = client.get_model_version("moe-stage", version)
    assert mv.description == (local / "README.md").read_text() and "| val_loss | 4.5 |" in mv.description
    assert mv.tags["moeflow.artifact_uri"] == hf_uri
    files = _all_artifacts(client, st.mlflow_run_id, "hf")
    assert "hf/MLmodel" in files and not any(f.endswith(".safetensors") for f in files)  # weights: store only
    assert client.get_run(st.mlflow_run_id).data.tags["moeflow.model_version"] == f"moe-stage/{version}"
    assert "Registered model version: `moe-stage/1`" in client.get_run(st.mlflow_run_id).data.tags["mlflow.note.content"]

    mlflow.set_tracking_uri(get_settings().tracking_uri)
    try:
        model = mlflow.pyfunc.load_model("models:/moe-stage@pretrained")
    finally:
        mlflow.set_tracking_uri(None)
    texts = model.predict({"prompt": ["What is 2 + 3?", "Hi"]}, params={"max_new_tokens": 4})
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def _all_artifacts(client, run_id: str, path: str) -> set[str]:
    """Every file under ``path`` in the run's artefacts (list_artifacts lists one level)."""
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= _all_artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out
