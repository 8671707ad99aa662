"""The evaluate engine end to end on tiny models: registry alias in, metrics out to MLflow (run + model
version tags), the catalog and a results artefact; decontamination applied; two models compared."""

from __future__ import annotations

import io
import json
import sys
import uuid
from pathlib import Path

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.hf import export_hf
from moeflow.models.tokenizer import train_bpe
from moeflow.platform.catalog import Catalog
from moeflow.platform.eval.config import EvaluateConfig
from moeflow.platform.eval.engine import comparison_markdown, run_evaluate
from moeflow.platform.eval.tasks import CONFIG_DIR, TaskError, load_task, load_task_data
from moeflow.platform.store import LocalStore
from moeflow.platform.tracking import MLflowTracker, NoopTracker

from train_fakes import random_docs, write_token_artifact

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="code tasks use the Linux sandbox")
TASKS = ["arith_mc", "python_mc", "arith", "stdlib_bpb", "stdlib_doctests"]


def _hf_artifact(store, prefix: str, tok, seed: int) -> str:
    torch.manual_seed(seed)
    model = MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, max_seq_len=128))
    local = Path(store.root) / ".." / f"export-{seed}"
    export_hf(model, local, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    tok.save(local / "tokenizer.json")
    with store.write_artifact(prefix, metadata={"kind": "hf-model"}, overwrite=True) as w:
        for p in sorted(local.iterdir()):
            w.put_file(p.name, p)
    return store.uri(prefix), local


def _curated(store, prefix: str, texts: list[str]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts, "source": ["t"] * len(texts),
                             "metadata": ["{}"] * len(texts)}), buf)
    with store.write_artifact(prefix, metadata={"kind": "dataset"}) as w:
        w.put_bytes("part-00000.parquet", buf.getvalue())
    return store.uri(prefix)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_cpu_thread):
    root = tmp_path_factory.mktemp("eval-engine")
    store = LocalStore(root / "store")
    texts = [json.loads(x)["prompt"] for x in (CONFIG_DIR / "arith.jsonl").read_text().splitlines()] * 3
    tok = train_bpe(texts + ["def f(x):\n    return x\n"] * 5, vocab_size=400)
    hf_a, local_a = _hf_artifact(store, "runs/a/hf", tok, seed=0)
    hf_b, _ = _hf_artifact(store, "runs/b/hf", tok, seed=1)
    V = tok.vocab_size
    tokens = write_token_artifact(store, "tokens/t", random_docs(40, vocab=V, seed=1, max_len=60),
                                  random_docs(40, vocab=V, seed=2, max_len=60), vocab_size=V, bos_id=tok.bos_id,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id)
    mc = load_task_data(load_task("python_mc"))
    planted = next(i for i, item in enumerate(mc.items) if len(item.question.split()) >= 9)
    curated = _curated(store, "datasets/c", ["Tomatoes need sun and water every single day of the summer.",
                                             f"From the quiz: {mc.items[planted].question} Nobody knew."])
    tracker = MLflowTracker(f"sqlite:///{root / 'mlflow.db'}", experiment=f"e-{uuid.uuid4().hex[:6]}",
                            artifact_location=(root / "mlruns").as_uri())
    with tracker.start_run("pretrain"):
        version = tracker.register_model("moe-eval", local_a, artifact_path="hf", alias="pretrained",
                                         tags={"moeflow.artifact_uri": hf_a})
    catalog = Catalog(f"sqlite:///{root / 'catalog.db'}")
    catalog.register_model("moe-eval", hf_a, "cafe00")
    yield dict(store=store, hf_a=hf_a, hf_b=hf_b, tokens=tokens, curated=curated, tracker=tracker, version=version,
               catalog=catalog, planted_id=mc.ids[planted])
    catalog.close()


@pytest.fixture(scope="module")
def single(world):
    config = EvaluateConfig(tasks=TASKS, limit=4, specialisation_texts=4, num_batches=2, batch_size=4, code_workers=2)
    with world["tracker"].start_run("evaluate") as run_id:
        result = run_evaluate(config, world["store"], model_uris=["moe-eval@pretrained"], tokens_uri=world["tokens"],
                              training_data_uris=[world["curated"]], tracker=world["tracker"], catalog=world["catalog"])
    return result, run_id


@pytest.mark.slow
def test_every_task_and_the_validation_split_are_scored(single):
    result, _ = single
    (ev,) = result.models
    assert ev.ref.mlflow_name == "moe-eval" and ev.ref.label == "moe-eval/1"
    assert {t.name for t in ev.tasks} == set(TASKS)
    for key in ("val_loss", "val_bpb", "unigram_bpb", "arith_mc/acc", "arith_mc/acc_norm", "python_mc/acc",
                "arith/exact_match", "stdlib_bpb/bpb", "stdlib_doctests/pass_at_1", "specialisation/mean_mi_bits"):
        assert key in ev.metrics, key
    assert ev.metrics["stdlib_doctests/pass_at_1"] == 0.0  # an untrained model writes no working code
    assert set(result.comparison[0]) >= {"model", "val_bpb", "arith_mc/acc_norm", "stdlib_doctests/pass_at_1"}
    assert "| model |" in comparison_markdown(result.comparison)


@pytest.mark.slow
def test_planted_contamination_is_excluded_and_reported(single, world):
    (ev,) = single[0].models
    report = next(r for r in ev.contamination if r["task"] == "python_mc")
    assert report["contaminated_ids"] == [world["planted_id"]] and report["excluded"]
    scored = next(t for t in ev.tasks if t.name == "python_mc")
    assert world["planted_id"] not in [row["id"] for row in scored.items]
    assert ev.metrics["python_mc/num_contaminated"] == 1.0


@pytest.mark.slow
def test_results_reach_mlflow_the_model_version_the_catalog_and_the_store(single, world):
    result, run_id = single
    client = world["tracker"].client
    run = client.get_run(run_id)
    assert run.data.metrics["eval/arith_mc/acc_norm"] == pytest.approx(result.models[0].metrics["arith_mc/acc_norm"])
    assert "eval/val_bpb" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"eval_comparison.json", "eval_contamination.json", "eval_specialisation"} <= arts
    mv = client.get_model_version("moe-eval", world["version"])
    assert float(mv.tags["eval.arith_mc.acc_norm"]) == pytest.approx(result.models[0].metrics["arith_mc/acc_norm"], abs=1e-5)
    assert "eval.stdlib_doctests.pass_at_1" in mv.tags and "eval.val_bpb" in mv.tags
    row = world["catalog"].get_artifact(world["hf_a"])
    assert row["metrics"]["eval/python_mc/acc"] == pytest.approx(result.models[0].metrics["python_mc/acc"])
    art = world["store"].read_artifact(result.models[0].results_uri)
    names = set(art.names())
    assert {"results.json", "contamination.json", "specialisation.json", "specialisation.png",
            "items/arith_mc.jsonl"} <= names
    assert json.loads(art.get_bytes("results.json"))["metrics"]["arith_mc/acc"] == result.models[0].metrics["arith_mc/acc"]


def test_two_models_are_compared_in_one_run_with_a_model_level(world):
    tracker = NoopTracker()
    config = EvaluateConfig(tasks=["arith_mc", "stdlib_bpb"], limit=3, specialisation=False, decontaminate=False)
    with tracker.start_run("evaluate"):
        result = run_evaluate(config, world["store"], model_uris=[world["hf_a"], world["hf_b"]], tracker=tracker)
    assert len(result.comparison) == 2
    assert result.comparison[0]["stdlib_bpb/bpb"] != result.comparison[1]["stdlib_bpb/bpb"]
    keys = set(result.metrics)
    assert any(k.endswith("/arith_mc/acc_norm") and k.count("/") >= 3 for k in keys)
    # a URI registered nowhere still evaluates; nothing is tagged
    assert not [e for e in tracker.events if e[0] == "model_version_tags"]


def test_a_bad_task_fails_before_any_model_loads(world):
    with pytest.raises(TaskError, match="no_such_task"):
        run_evaluate(EvaluateConfig(tasks=["no_such_task"]), world["store"], model_uris=["/nonexistent/model"])
