"""Tracking: the no-op recorder, MLflow on a SQLite backend, and a real MLflow server over HTTP.

One MLflow SQLite backend per module (creating its tables takes seconds); each test uses
its own experiment. The server test serves that same, already migrated, database.
"""

from __future__ import annotations

import contextvars
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow_server import mlflow_server

from moeflow.platform.settings import get_settings
from moeflow.platform.tracking import (
    TAG_CATALOG_RUN_ID,
    TAG_PREFECT_FLOW_RUN_ID,
    MLflowTracker,
    NoopTracker,
    Tracker,
    flatten_params,
    get_tracker,
)
from moeflow.platform.tracking import table_columns

PARENT_TAG = "mlflow.parentRunId"


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def tracker(mlflow_root, monkeypatch):
    monkeypatch.setenv("MOEFLOW_HOME", str(mlflow_root / "home"))
    name = f"exp-{uuid.uuid4().hex[:8]}"
    return MLflowTracker(
        f"sqlite:///{mlflow_root / 'mlflow.db'}", experiment=name,
        artifact_location=(mlflow_root / "artifacts" / name).as_uri(),
    )


# ---------------------------------------------------------------------- no-op tracker
def test_noop_tracker_records_every_call(tmp_path):
    tracker = NoopTracker()
    assert isinstance(tracker, Tracker) and tracker.active_run_id is None
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    with tracker.start_run("pipeline", tags={"recipe": "tiny"}) as parent:
        with tracker.start_run("curate", nested=True) as child:
            assert tracker.active_run_id == child
            tracker.log_params({"model": {"dim": 64}, "seed": 1})
            tracker.log_metrics({"loss": 2.0}, step=1)
            tracker.log_metrics({"loss": 1.5}, step=2)
            tracker.log_input("file:///d", "curated", context="training", digest="abc", profile={"docs": 3})
            tracker.log_table([{"step": "dedup", "docs": 9}, {"step": "quality", "kept": 7}])
            tracker.log_dict({"a": 1}, "cfg.json")
            tracker.log_artifact(artifact)
            tracker.set_tags({TAG_CATALOG_RUN_ID: "c1"})
        assert tracker.active_run_id == parent
    assert tracker.active_run_id is None

    assert [(r["name"], r["parent_run_id"], r["status"]) for r in tracker.runs] == [
        ("pipeline", None, "FINISHED"), ("curate", parent, "FINISHED"),
    ]
    assert tracker.all_params() == {"model.dim": "64", "seed": "1"}
    assert tracker.metric_history("loss") == [(1, 2.0), (2, 1.5)]
    assert tracker.inputs[0]["uri"] == "file:///d" and tracker.inputs[0]["profile"] == {"docs": 3}
    assert tracker.tables == [({"step": ["dedup", "quality"], "docs": [9, None], "kept": [None, 7]}, "funnel.json")]
    assert tracker.dicts == [({"a": 1}, "cfg.json")] and tracker.artifacts == [(str(artifact), None)]
    assert tracker.tags == [{TAG_CATALOG_RUN_ID: "c1"}]
    assert {run_id for kind, run_id, _ in tracker.events if kind != "start_run"} == {child}


def test_noop_tracker_marks_failures_and_rejects_bad_values():
    tracker = NoopTracker()
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.start_run("x"):
            raise RuntimeError("boom")
    assert tracker.runs[0]["status"] == "FAILED" and tracker.active_run_id is None
    with pytest.raises(TypeError, match="'loss'"):
        tracker.log_metrics({"loss": "high"})
    with pytest.raises(FileNotFoundError):
        tracker.log_artifact("/nonexistent/file")
    tracker.log_metrics({"outside": 1})  # allowed without a run: model code in unit tests
    assert tracker.events[-1][1] is None


def test_value_shaping_helpers():
    flat = flatten_params({"a": {"b": {"c": 1}}, "l": [1, 2], "empty": {}, "s": "x" * 7000})
    assert flat["a.b.c"] == "1" and flat["l"] == "[1, 2]" and flat["empty"] == "{}"
    assert len(flat["s"]) == 6000 and flat["s"].endswith("...")
    assert table_columns({"a": (1, 2)}) == {"a": [1, 2]}
    assert table_columns([{"a": {"x": 1}}]) == {"a": ['{"x": 1}']}
    with pytest.raises(ValueError, match="different lengths"):
        table_columns({"a": [1], "b": [1, 2]})
    with pytest.raises(TypeError, match="dicts"):
        table_columns([1, 2])


def test_get_tracker_follows_env_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("MOEFLOW_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOEFLOW_TRACKING", "noop")
    assert isinstance(get_tracker(), NoopTracker)

    monkeypatch.delenv("MOEFLOW_TRACKING")
    monkeypatch.setenv("MOEFLOW_PROJECT", "proj")
    settings = get_settings()
    tracker = get_tracker(settings)
    assert isinstance(tracker, MLflowTracker) and isinstance(tracker, Tracker)
    assert (tracker.tracking_uri, tracker.experiment) == (settings.tracking_uri, "proj")
    assert tracker.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracker.artifact_location == settings.mlflow_artifacts_root

    remote = get_tracker(get_settings(mlflow_tracking_uri="http://mlflow:5000"))
    assert remote.tracking_uri == "http://mlflow:5000" and remote.artifact_location is None

    # the local server of `moeflow up` shares the SQLite backend: same store location as direct logging
    local_server = get_settings(mlflow_tracking_uri=settings.mlflow_server_url)
    assert get_tracker(local_server).artifact_location == settings.mlflow_artifacts_root


# ---------------------------------------------------------------------- MLflow, SQLite backend
def test_mlflow_nested_runs_carry_the_parent_tag(tracker):
    client = tracker.client
    with tracker.start_run("pipeline", tags={TAG_PREFECT_FLOW_RUN_ID: "flow-1"}) as pipeline:
        with tracker.start_run("curate", nested=True) as curate:
            pass
        with tracker.start_run("standalone") as standalone:  # nested=False: a new top-level run
            pass
    with tracker.start_run("tokenize", parent_run_id=pipeline) as explicit:
        pass

    assert PARENT_TAG not in client.get_run(pipeline).data.tags
    assert client.get_run(pipeline).data.tags[TAG_PREFECT_FLOW_RUN_ID] == "flow-1"
    assert client.get_run(curate).data.tags[PARENT_TAG] == pipeline
    assert client.get_run(explicit).data.tags[PARENT_TAG] == pipeline
    assert PARENT_TAG not in client.get_run(standalone).data.tags
    assert client.get_run(curate).info.run_name == "curate"
    assert {client.get_run(r).info.status for r in (pipeline, curate, explicit)} == {"FINISHED"}
    assert client.get_run(curate).info.experiment_id == tracker.experiment_id


def test_mlflow_nesting_follows_context_into_worker_threads(tracker):
    """Prefect runs tasks in threads with a copy of the caller's context."""
    with tracker.start_run("pipeline") as pipeline:
        ctx = contextvars.copy_context()

        def stage() -> str:
            with tracker.start_run("stage", nested=True) as run_id:
                return run_id

        with ThreadPoolExecutor(1) as pool:
            child = pool.submit(ctx.run, stage).result()
    assert tracker.client.get_run(child).data.tags[PARENT_TAG] == pipeline


def test_mlflow_params_metrics_tags_and_failure_status(tracker):
    client = tracker.client
    with pytest.raises(ValueError, match="diverged"):
        with tracker.start_run("pretrain") as run_id:
            tracker.log_params({"model": {"num_experts": 8, "top_k": 2}, "lr": 3e-4})
            tracker.log_params({f"p{i}": i for i in range(150)})  # more than one batch
            for step in range(3):
                tracker.log_metrics({"loss": 3.0 - step, "maxvio": 0.1}, step=step)
            tracker.set_tags({TAG_CATALOG_RUN_ID: "cat-1", "n": 5})
            raise ValueError("diverged")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["model.num_experts"] == "8" and run.data.params["lr"] == "0.0003"
    assert run.data.params["p149"] == "149"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert run.data.tags[TAG_CATALOG_RUN_ID] == "cat-1" and run.data.tags["n"] == "5"
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        tracker.log_metrics({"loss": 1.0})


def test_mlflow_inputs_tables_dicts_and_artifacts(tracker, tmp_path):
    client = tracker.client
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    with tracker.start_run("tokenize") as run_id:
        tracker.log_input(
            "file:///store/datasets/wiki/curated/abc", "wiki-curated", context="training",
            digest="f" * 64, schema={"text": "string", "num_tokens": "long"}, profile={"num_docs": 12},
        )
        tracker.log_input("s3://bucket/datasets/wiki/tokens/x", "wiki-tokens", context="validation")
        tracker.log_table([{"step": "input", "docs": 100}, {"step": "dedup", "docs": 80}], "funnel.json")
        tracker.log_dict({"vocab_size": 512}, "meta/tokenizer.json")
        tracker.log_artifact(tmp_path / "a.txt")
        tracker.log_artifact(tmp_path / "dir", artifact_path="extra")
        with pytest.raises(ValueError, match="unknown column types"):
            tracker.log_input("file:///x", "bad", schema={"text": "str"})
        with pytest.raises(ValueError, match="scheme"):
            tracker.log_input("relative/path", "bad")

    inputs = {d.dataset.name: d for d in client.get_run(run_id).inputs.dataset_inputs}
    curated = inputs["wiki-curated"]
    assert curated.dataset.digest == "f" * 36
    assert json.loads(curated.dataset.source) == {"uri": "file:///store/datasets/wiki/curated/abc"}
    assert json.loads(curated.dataset.profile) == {"num_docs": 12}
    assert [c["name"] for c in json.loads(curated.dataset.schema)["mlflow_colspec"]] == ["text", "num_tokens"]
    assert {(t.key, t.value) for t in curated.tags} == {("mlflow.data.context", "training")}
    assert inputs["wiki-tokens"].dataset.source_type == "s3"

    paths = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "extra")}
    assert {"funnel.json", "meta", "a.txt", "extra/b.txt"} <= paths
    table = json.loads(Path(client.download_artifacts(run_id, "funnel.json", str(tmp_path))).read_text())
    assert table["columns"] == ["step", "docs"] and table["data"] == [["input", 100], ["dedup", 80]]
    meta = json.loads(Path(client.download_artifacts(run_id, "meta/tokenizer.json", str(tmp_path))).read_text())
    assert meta == {"vocab_size": 512}
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.name == tracker.experiment and experiment.artifact_location == tracker.artifact_location


def test_mlflow_experiment_is_shared_by_trackers(tracker):
    other = MLflowTracker(tracker.tracking_uri, experiment=tracker.experiment)
    assert other.experiment_id == tracker.experiment_id


# ---------------------------------------------------------------------- a real MLflow server
@pytest.mark.service
def test_mlflow_server_over_http(mlflow_root, tmp_path):
    # serve the module's backend (already migrated by the tests above, or migrated now)
    with mlflow_server(mlflow_root / "server", backend_uri=f"sqlite:///{mlflow_root / 'mlflow.db'}") as url:
        tracker = MLflowTracker(url, experiment="served")
        with tracker.start_run("pipeline") as pipeline:
            with tracker.start_run("evaluate", nested=True) as run_id:
                tracker.log_params({"recipe": "tiny"})
                tracker.log_metrics({"ppl": 42.0}, step=7)
                tracker.log_input("file:///store/ckpt/1", "checkpoint", context="evaluation", digest="d1")
                tracker.log_table({"task": ["hellaswag"], "acc": [0.31]}, "evals.json")
                tracker.set_tags({TAG_CATALOG_RUN_ID: "c-9"})

        from mlflow.tracking import MlflowClient

        reader = MlflowClient(tracking_uri=url)
        run = reader.get_run(run_id)
        assert run.data.tags[PARENT_TAG] == pipeline and run.data.tags[TAG_CATALOG_RUN_ID] == "c-9"
        assert run.data.params == {"recipe": "tiny"}
        assert [(m.step, m.value) for m in reader.get_metric_history(run_id, "ppl")] == [(7, 42.0)]
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["checkpoint"]
        table = json.loads(Path(reader.download_artifacts(run_id, "evals.json", str(tmp_path))).read_text())
        assert table["data"] == [["hellaswag", 0.31]]
        assert reader.get_experiment_by_name("served").experiment_id == tracker.experiment_id


def test_mlflow_nests_under_a_fluent_run_on_the_same_uri(tracker):
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.tracking_uri)
    try:
        with mlflow.start_run(experiment_id=tracker.experiment_id) as outer:
            with tracker.start_run("stage", nested=True) as child:
                pass
    finally:
        mlflow.set_tracking_uri(previous)
    assert tracker.client.get_run(child).data.tags[PARENT_TAG] == outer.info.run_id


def test_mlflow_stage_error_is_not_hidden_by_a_tracking_failure(tracker, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("tracking server down")

    with pytest.raises(ValueError, match="stage failed"):
        with tracker.start_run("x"):
            monkeypatch.setattr(tracker.client, "set_terminated", unreachable)
            raise ValueError("stage failed")
    with pytest.raises(ConnectionError):  # on success the failure to finish is reported
        with tracker.start_run("y"):
            pass


def test_attach_run_logs_into_an_existing_run_without_ending_it(tracker):
    with tracker.start_run("pretrain") as run_id:
        worker = MLflowTracker(tracker.tracking_uri, experiment=tracker.experiment)  # e.g. in a Ray worker
        with worker.attach_run(run_id):
            assert worker.active_run_id == run_id
            worker.log_metrics({"loss": 1.0}, step=5)
        assert tracker.client.get_run(run_id).info.status == "RUNNING"
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 1.0}
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        with worker.attach_run("0" * 32):
            pass

    noop = NoopTracker()
    with noop.attach_run("abc"):
        noop.log_metrics({"x": 1})
    assert noop.events[-1][1] == "abc" and noop.active_run_id is None


def test_mlflow_register_model_version(tracker, tmp_path):
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "deepseek_v3"}')
    with tracker.start_run("pretrain") as run_id:
        v1 = tracker.register_model("moe-test", model_dir, artifact_path="hf", alias="current", tags={"k": "v"})
        v2 = tracker.register_model("moe-test", model_dir, artifact_path="hf2", alias="current")
    assert (v1, v2) == ("1", "2")
    latest = tracker.client.get_model_version_by_alias("moe-test", "current")
    assert str(latest.version) == "2" and latest.run_id == run_id
    first = tracker.client.get_model_version("moe-test", "1")
    assert first.tags["k"] == "v" and first.source.endswith("/hf")
    names = {a.path for a in tracker.client.list_artifacts(run_id, "hf")}
    assert names == {"hf/config.json"}


# ---------------------------------------------------------------------- MLflow conventions (issue 8)
def test_experiment_opens_on_training_runs_unless_a_kind_was_chosen(tracker):
    from moeflow.platform.tracking import EXPERIMENT_KIND_TAG

    client = tracker.client
    assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an experiment made before this convention gets the tag on first use
    old = f"old-{uuid.uuid4().hex[:6]}"
    client.create_experiment(old)
    assert EXPERIMENT_KIND_TAG not in client.get_experiment_by_name(old).tags
    reused = MLflowTracker(tracker.tracking_uri, experiment=old)
    assert client.get_experiment(reused.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # a kind someone chose in the UI stays
    chosen = f"chosen-{uuid.uuid4().hex[:6]}"
    client.create_experiment(chosen, tags={EXPERIMENT_KIND_TAG: "genai_development"})
    kept = MLflowTracker(tracker.tracking_uri, experiment=chosen)
    assert client.get_experiment(kept.experiment_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_summary_values_are_single_values_not_series(tracker):
    with tracker.start_run("pretrain") as run_id:
        for step in (10, 20, 30):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.log_summary({"final/val_loss": 2.5, "docs_out": 7})
    history = tracker.client.get_metric_history(run_id, "final/val_loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.5)]
    assert len(tracker.client.get_metric_history(run_id, "loss")) == 3
    noop = NoopTracker()
    noop.log_summary({"final/val_loss": 2.5})
    assert noop.summary == {"final/val_loss": 2.5} and noop.metric_history("final/val_loss") == []
    with pytest.raises(TypeError, match="'x'"):
        noop.log_summary({"x": "high"})


def test_description_figure_run_name_and_model_description(tracker, tmp_path):
    from matplotlib.figure import Figure

    from moeflow.platform.tracking import NOTE_TAG

    fig = Figure()
    fig.subplots().imshow([[0.0, 1.0], [1.0, 0.0]])
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    with tracker.start_run("tiny/pretrain") as run_id:
        tracker.set_description("**pretrain** · [flow](http://prefect/runs/flow-run/1)")
        tracker.log_figure(fig, "expert_load/heatmap.png")
        version = tracker.register_model("moe-desc", model_dir, description="# card")
    run = tracker.client.get_run(run_id)
    assert run.data.tags[NOTE_TAG].startswith("**pretrain**")
    assert tracker.run_name(run_id) == "tiny/pretrain"
    png = Path(tracker.client.download_artifacts(run_id, "expert_load/heatmap.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tracker.client.get_model_version("moe-desc", version).description == "# card"
    noop = NoopTracker()
    with noop.start_run("a") as rid:
        noop.set_description("d")
        noop.log_figure(fig, "f.png")
    assert noop.run_name(rid) == "a" and noop.descriptions == ["d"] and noop.figures == ["f.png"]
    with pytest.raises(TypeError, match="matplotlib figure"):
        noop.log_figure("not a figure", "f.png")


def test_naming_and_description_conventions():
    from moeflow.platform.tracking import (dataset_display_name, prefect_flow_run_url, run_description,
                                           stage_run_name)

    assert stage_run_name("curate", parent_run_name="pipeline-tiny-brave-fox") == "pipeline-tiny-brave-fox/curate"
    assert stage_run_name("pipeline", flow_run_name="pipeline-tiny-brave-fox") == "pipeline-tiny-brave-fox"
    assert stage_run_name("pretrain", flow_run_name="brave-fox") == "pretrain/brave-fox"
    assert stage_run_name("pretrain") == "pretrain"
    assert prefect_flow_run_url("http://127.0.0.1:4200/api", "f1") == "http://127.0.0.1:4200/runs/flow-run/f1"
    assert prefect_flow_run_url("https://prefect.example/api/", "f1") == "https://prefect.example/runs/flow-run/f1"
    assert dataset_display_name("file:///h/store/datasets/stdlib/curated/3f9a1c2e77d0") == "stdlib-curated@3f9a1c2e"
    assert dataset_display_name("s3://b/datasets/wiki/tokens/0123abcd4567") == "wiki-tokens@0123abcd"
    assert (dataset_display_name("file:///s/runs/moe/ab12cd34ef56/checkpoints/step-00000300")
            == "moe-checkpoints-step-00000300@ab12cd34")
    assert dataset_display_name("file:///x/whatever", {"name": "stdlib-curated", "version": 3}) == "stdlib-curated v3"
    assert dataset_display_name("file:///usr/lib/python3.11") == "lib-python3.11"
    assert dataset_display_name("python-stdlib://3.11") == "python-stdlib:3.11"
    text = run_description("pretrain", prefect_url="http://p/runs/flow-run/f1",
                           inputs=[("stdlib-tokens v1", "file:///t")], outputs=["file:///ckpt", "file:///hf"],
                           model_version="moe/3", status="succeeded")
    assert text.splitlines()[0] == "**pretrain** · succeeded"
    assert "[f1](http://p/runs/flow-run/f1)" in text and "- stdlib-tokens v1: `file:///t`" in text
    assert "- `file:///hf`" in text and "Registered model version: `moe/3`" in text
