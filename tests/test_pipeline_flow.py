"""The pipeline flow end to end on a tiny slice (curate -> tokenize -> pretrain -> sft -> reward ->
align(dpo) -> evaluate every policy version -> deploy the aligned one), and a re-run after a failed stage that resumes at that stage (the finished
stages are cached Prefect task runs and record no new catalog runs)."""

from __future__ import annotations

import pytest

from moeflow.platform.catalog import Catalog
from moeflow.platform.stages import flow_kwargs
from moeflow.platform.recipes import load_recipe
from moeflow.platform.settings import get_settings

pytestmark = pytest.mark.slow

SLICE = [
    "curate.sources=[{uri: python-stdlib, max_files: 40, include_tests: false}]",
    "tokenize.vocab_size=512",
    "tokenize.val_fraction=0.15",
    "pretrain.max_steps=200",
    "pretrain.micro_batch_size=8",
    "pretrain.seq_len=64",
    "pretrain.warmup_steps=6",
    "pretrain.lr=0.005",
    "pretrain.val_every=0",
    "pretrain.checkpoint_every=100",
    "pretrain.log_every=20",
    "evaluate.num_batches=2",
    "evaluate.batch_size=4",
    "num_workers=1",
    "posttrain_data.max_functions=40",
    "posttrain_data.num_arithmetic=200",
    "sft.max_steps=10",
    "sft.warmup_steps=2",
    "sft.seq_len=96",
    "sft.micro_batch_size=4",
    "sft.checkpoint_every=0",
    "sft.heldout_max_examples=16",
    "sft.exact_match_max_prompts=8",
    "reward.max_steps=6",
    "reward.seq_len=96",
    "align.max_steps=6",
    "align.seq_len=96",
]
POSTTRAIN = {"posttrain_data": 1, "sft": 1, "reward": 1, "align": 1}


def test_pipeline_end_to_end_then_resume_after_failure(moeflow_home, prefect_harness):
    from moeflow.flows.pipeline import pipeline

    # run 1: evaluation is asked for a batch (valid by its bounds) larger than the validation split:
    # it fails at run time, after pretraining (100000 is now refused up front, before anything runs)
    broken = load_recipe("tiny", SLICE + ["evaluate.batch_size=50000"])
    with pytest.raises(Exception, match="batch"):
        pipeline(**flow_kwargs(pipeline, broken))
    catalog = Catalog.from_settings(get_settings())
    stages = [r["stage"] for r in catalog.list_runs()]
    assert sorted(stages) == sorted(["curate", "evaluate", "pipeline", "pretrain", "tokenize", *POSTTRAIN])
    assert {r["stage"]: r["status"] for r in catalog.list_runs()}["evaluate"] == "failed"

    # run 2: fixed config; finished stages come from the cache, only evaluate runs again
    fixed = load_recipe("tiny", SLICE)
    result = pipeline(**flow_kwargs(pipeline, fixed))
    runs = catalog.list_runs()
    counts = {s: sum(r["stage"] == s for r in runs) for s in {r["stage"] for r in runs}}
    assert counts == {"pipeline": 2, "curate": 1, "tokenize": 1, "pretrain": 1, "evaluate": 2, "deploy": 1, **POSTTRAIN}
    # post-training lineage: sft's parent is the pretrained version; reward and align start from sft's
    pretrained = catalog.get_artifact(result["checkpoint_uri"])["id"]
    sft_id = result["sft"]["model_id"]
    assert catalog.get_model(sft_id)["parent_model_id"] == pretrained
    for stage in ("reward", "align"):
        assert catalog.get_model(result[stage]["model_id"])["parent_model_id"] == sft_id, stage
        assert result[stage]["before"] and result[stage]["after"], stage
    assert result["sft"]["after"]["assistant_loss"] < result["sft"]["before"]["assistant_loss"]

    # one evaluation scored the three policy versions (not the reward model), by their exact registry versions
    name = fixed["run_name"]
    versions = {stage: (name if stage == "pretrain" else f"{name}-{stage}", result[stage]["mlflow_model_version"])
                for stage in ("pretrain", "sft", "align")}
    assert result["eval_models"] == [f"{n}/{v}" for n, v in versions.values()]
    ev = result["eval"]
    for n, v in versions.values():  # the model learned: validation loss below the unigram baseline
        assert ev[f"{n}-{v}/val_loss"] < ev[f"{n}-{v}/unigram_loss"], n
    assert not any(k.startswith(f"{name}-reward") for k in ev)
    assert result["hf_uri"] and result["expert_load_uri"]

    # MLflow: the HF export is the "pretrained" version of the registered model named after the run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=get_settings().tracking_uri)
    version = client.get_model_version_by_alias(fixed["run_name"], "pretrained")
    assert version.tags["moeflow.artifact_uri"] == result["hf_uri"]
    assert client.get_run(version.run_id).data.tags["moeflow.stage"] == "pretrain"

    # lineage: the checkpoint's upstream reaches the curated dataset and its source
    upstream = {n.get("uri") for n in catalog.upstream(result["checkpoint_uri"]) if n.get("type") == "artifact"}
    assert result["tokens_uri"] in upstream and result["curated_uri"] in upstream
    assert any(u and u.startswith("python-stdlib://") for u in upstream)
    sft_upstream = {n.get("uri") for n in catalog.upstream(result["sft"]["hf_uri"]) if n.get("type") == "artifact"}
    assert result["checkpoint_uri"] in sft_upstream and result["posttrain_data"]["chat_uri"] in sft_upstream
    sft_version = client.get_model_version_by_alias(f"{fixed['run_name']}-sft", "sft")
    assert sft_version.tags["moeflow.artifact_uri"] == result["sft"]["hf_uri"]
    align_upstream = {n.get("uri") for n in catalog.upstream(result["align"]["hf_uri"]) if n.get("type") == "artifact"}
    assert result["sft"]["hf_uri"] in align_upstream and result["curated_uri"] in align_upstream
    assert any(u and u.startswith("python-stdlib://") for u in align_upstream)
    # evaluation wrote its scores onto every version it scored
    for n, v in versions.values():
        tags = client.get_model_version(n, v).tags
        assert float(tags["eval.val_loss"]) == pytest.approx(ev[f"{n}-{v}/val_loss"], rel=1e-4), n

    # deploy gated that same aligned version, recorded the decision and moved the champion alias
    aligned_name, aligned_version = versions["align"]
    deployed = result["deploy"]
    assert (deployed["model_name"], deployed["version"], deployed["promoted"]) == (aligned_name, aligned_version, True)
    assert client.get_model_version_by_alias(aligned_name, "champion").version == aligned_version
    assert client.get_model_version(aligned_name, aligned_version).tags["deploy.decision"] == "promoted"
    import json

    from moeflow.platform.store import read_artifact

    decision = json.loads(read_artifact(deployed["decision_uri"]).get_bytes("decision.json"))
    assert decision["candidate_metrics"]["val_loss"] == pytest.approx(ev[f"{aligned_name}-{aligned_version}/val_loss"],
                                                                      rel=1e-4)
    assert catalog.get_artifact(deployed["decision_uri"])["kind"] == "deploy_decision"

    # run 3: skip reward, align, evaluate and deploy; a changed sft config trains sft again, from the same
    # pretrained model
    skipping = load_recipe("tiny", SLICE + ["sft.max_steps=8", "skip=[reward, align, evaluate, deploy]"])
    third = pipeline(**flow_kwargs(pipeline, skipping))
    assert set(third) >= {"sft", "pretrain"} and not {"reward", "align", "eval", "deploy"} & set(third)
    runs = catalog.list_runs()
    counts = {s: sum(r["stage"] == s for r in runs) for s in {r["stage"] for r in runs}}
    assert counts["sft"] == 2 and counts["reward"] == 1 and counts["align"] == 1 and counts["pipeline"] == 3
    assert catalog.get_model(third["sft"]["model_id"])["parent_model_id"] == pretrained
