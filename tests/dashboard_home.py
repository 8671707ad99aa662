"""A small moeflow home for the dashboard tests, written through the platform's own writers.

What the stages would record for one pipeline run, in seconds instead of minutes: catalog runs
nested under a pipeline run with lineage (curated -> tokens -> pretrain -> model -> evaluate ->
deploy decision) and one failed stage, a curated artefact with the curation stats format (funnel,
excluded samples, quarantine), a pretraining expert-load artefact from ``ExpertLoadRecorder`` (one
dead expert in layer 1), MLflow runs with curves, and a registered model version with evaluation
tags, an alias and a deploy decision. ``build_home(path)`` sets nothing in the environment; the
caller points ``MOEFLOW_HOME`` at it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NUM_LAYERS, NUM_EXPERTS, NUM_WINDOWS = 3, 8, 12
DEAD = (1, 5)  # (layer, expert) that gets no tokens in the last windows


def expert_load_recorder():
    from moeflow.platform.train.expert_load import ExpertLoadRecorder

    rng = np.random.default_rng(0)
    rec = ExpertLoadRecorder()
    bias = np.zeros((NUM_LAYERS, NUM_EXPERTS), np.float32)
    for n in range(NUM_WINDOWS):
        counts = rng.integers(50, 150, size=(NUM_LAYERS, NUM_EXPERTS)).astype(np.float32)
        if n >= NUM_WINDOWS // 2:
            counts[DEAD] = 0.0
        bias += 0.01 * np.sign(counts.mean(axis=1, keepdims=True) - counts)
        rec.record(10 * (n + 1), counts, bias.copy())
    return rec


def _curation_stats() -> dict:
    funnel = [{"stage": s, "docs": d, "bytes": b, "removed": r, "note": ""}
              for s, d, b, r in (("input", 40, 40_000, 0), ("normalize", 40, 39_800, 0), ("quality", 34, 33_000, 6),
                                 ("exact_dedup", 30, 29_000, 4), ("output", 30, 29_000, 0))]
    steps = [{"step": "quality", "docs_in": 40, "docs_out": 34, "bytes_in": 39_800, "bytes_out": 33_000,
              "excluded": {"too_short": 6}, "excluded_bytes": {"too_short": 800}, "excluded_docs": 6, "counters": {}},
             {"step": "exact_dedup", "docs_in": 34, "docs_out": 30, "bytes_in": 33_000, "bytes_out": 29_000,
              "excluded": {"duplicate": 4}, "excluded_bytes": {"duplicate": 4000}, "excluded_docs": 4, "counters": {}}]
    return {"name": "tiny", "funnel": funnel, "steps": steps, "input": {"records": 41, "docs": 40, "bytes": 40_000},
            "quarantined": {"total": 1, "by_reason": {"not_utf8": 1}, "lost": {}},
            "output": {"docs": 30, "bytes": 29_000, "by_domain": {"code": 25, "prose": 5}}}


def build_home(home: Path) -> dict:
    """Write the home; returns the ids the tests look for."""
    from mlflow import MlflowClient

    from moeflow.platform.catalog import Catalog
    from moeflow.platform.settings import Settings
    from moeflow.platform.store import open_store
    from moeflow.platform.train.expert_load import NPZ_NAME

    settings = Settings(home=home)
    settings.ensure_dirs()
    catalog = Catalog(settings.catalog_db_url, project=settings.project)
    store = open_store(settings)
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    experiment = client.create_experiment(settings.project, artifact_location=(home / "mlartifacts").as_uri())

    def mlflow_run(name: str, parent: str | None = None, curves: dict | None = None) -> str:
        tags = {"mlflow.parentRunId": parent} if parent else {}
        run = client.create_run(experiment, run_name=name, tags=tags)
        for key, values in (curves or {}).items():
            for step, value in values:
                client.log_metric(run.info.run_id, key, value, step=step)
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    with store.write_artifact("datasets/tiny/curated") as w:
        w.put_json("stats.json", _curation_stats())
        w.put_bytes("excluded/quality.jsonl", b'{"id": "doc-3", "rule": "too_short", "text": "x = 1"}\n')
        w.put_bytes("excluded/exact_dedup.jsonl", b'{"id": "doc-9", "rule": "duplicate", "text": "import os"}\n')
        w.put_bytes("quarantine.jsonl", b'{"source": "python-stdlib", "location": "a.py", "reason": "not_utf8"}\n')
    curated = w.artifact()
    catalog.register_dataset("tiny-curated", w.uri,
                             curated.content_hash, stats={"docs": 30}, kind="dataset")
    curated_uri = w.uri
    with store.write_artifact("datasets/tiny/tokens") as w:
        w.put_json("meta.json", {"num_tokens": 12345})
    tokens_uri = w.uri
    catalog.register_dataset("tiny-tokens", tokens_uri, w.artifact().content_hash,
                             stats={"num_tokens": 12345, "vocab_size": 512, "bytes_per_token": 3.2}, kind="tokens")
    with store.write_artifact("runs/moe-tiny/expert_load") as w:
        w.put_bytes(NPZ_NAME, expert_load_recorder().to_npz_bytes())
    load_uri = w.uri
    with store.write_artifact("runs/moe-tiny/model") as w:
        w.put_json("config.json", {"preset": "tiny"})
    model_uri = w.uri

    steps = range(10, 130, 10)
    parent_ml = mlflow_run("pipeline-moe-tiny")
    pipeline = catalog.start_run("pipeline", {"options": {"run_name": "moe-tiny"}}, mlflow_run_id=parent_ml,
                                 prefect_flow_run_id="11111111-2222-3333-4444-555555555555")
    ids = {"pipeline": pipeline}
    for stage, inputs, outputs, metrics, curves in (
        ("curate", [], [curated_uri], {"docs_out": 30}, {}),
        ("tokenize", [curated_uri], [tokens_uri], {"num_tokens": 12345}, {}),
        ("pretrain", [tokens_uri], [model_uri, load_uri], {"val_loss": 5.2},
         {"loss": [(s, 7.0 - s / 40) for s in steps], "lr": [(s, 3e-3) for s in steps],
          "grad_norm": [(s, 1.0 + 1 / s) for s in steps], "tokens_per_s": [(s, 5000.0) for s in steps],
          "val_loss": [(60, 5.6), (120, 5.2)]}),
        ("evaluate", [model_uri], [], {"val_loss": 5.25}, {}),
    ):
        ml = mlflow_run(stage, parent_ml, curves)
        run_id = catalog.start_run(stage, {"stage": stage}, pipeline_run_id=pipeline, mlflow_run_id=ml)
        if stage == "pretrain":
            catalog.register_model("moe-tiny", model_uri, "abc123", metrics={"val_loss": 5.2})
        catalog.add_lineage(run_id, inputs=inputs, outputs=outputs)
        catalog.finish_run(run_id, "succeeded", metrics=metrics)
        ids[stage] = run_id
    failed = catalog.start_run("deploy", {"stage": "deploy"}, pipeline_run_id=pipeline)
    catalog.add_lineage(failed, inputs=[model_uri])
    catalog.finish_run(failed, "failed", error="deploy: gate refused: humaneval.pass@1 below the floor")
    ids["deploy"] = failed
    catalog.finish_run(pipeline, "failed", error="deploy failed")

    client.create_registered_model("moe-tiny", description="the tiny MoE")
    for version, score in ((1, "0.1"), (2, "0.25")):
        client.create_model_version("moe-tiny", source=model_uri, run_id=None, description=f"# moe-tiny v{version}",
                                    tags={"eval.python_mc.acc": score, "eval.val.loss": "5.25"})
    client.set_registered_model_alias("moe-tiny", "champion", "2")
    decision = {"model_name": "moe-tiny", "version": "2", "alias": "champion", "promoted": True, "previous": "1",
                "reasons": ["python_mc.acc 0.25 >= 0.1"], "checks": [{"metric": "python_mc.acc", "passed": True}]}
    with store.write_artifact("deploy/moe-tiny-2") as w:
        w.put_bytes("decision.json", json.dumps(decision).encode())
    catalog.register_dataset("moe-tiny-deploy", w.uri, w.artifact().content_hash, kind="deploy_decision")
    catalog.close()
    return {**ids, "expert_load_uri": load_uri, "model_uri": model_uri, "curated_uri": curated_uri}
