"""The cluster topology natively on this machine (the issue's core, `slow`): a Ray cluster of a head and
two worker nodes (`ray start` on loopback, one CPU each, bounded object stores), PostgreSQL scratch
databases for the catalog, Prefect and MLflow, an S3 server (moto) for every artefact (MLflow's
included, proxied by the MLflow server), the Prefect server on PostgreSQL with the platform's `flows`
service (deployments on the process work pool + a Prefect worker). A deployment run of the shortened
tiny `pipeline` (every stage) is submitted through Prefect's API; it curates and tokenizes with 2 Ray workers, trains
with 2 Ray Train workers (one per worker node: the head has no CPUs) and evaluates. Checked: artefacts
in S3, runs in MLflow, lineage in the Postgres catalog, tasks on both worker nodes, and the curated and
token content hashes equal to an embedded (local store, one process) run of the same recipe.

Every stage of the pipeline runs (curate, tokenize, pretrain, posttrain_data, sft, reward, align (DPO),
evaluate, deploy), each shortened to a few steps: the post-training stages read the pretrained model's version
from the MLflow registry on PostgreSQL, write their checkpoints and HF exports to S3 and register versions
whose parents are their inputs; deploy gates the aligned version and moves its ``champion`` alias.
The faults in this topology are in test_cluster_faults.py; both share ``tests/topology.py``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import moto_s3_server  # noqa: E402
from topology import BUCKET, RayNodes, cluster_env, ray_node_env, scratch_databases, tiny_recipe  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.service, pytest.mark.timeout(1500)]


def _recipe():
    short = {"max_steps": 4, "log_every": 2, "checkpoint_every": 4, "warmup_steps": 1}
    sets = {f"{stage}.{k}": v for stage in ("sft", "reward", "align") for k, v in short.items()}
    sets.update({"sft.heldout_max_examples": 16, "sft.exact_match_max_prompts": 8, "reward.heldout_pairs": 16,
                 "reward.max_pairs": 64, "align.heldout_pairs": 16, "align.max_pairs": 64, "align.kl_pairs": 8,
                 "posttrain_data.max_functions": 60, "posttrain_data.num_arithmetic": 200, "evaluate.limit": 4,
                 "evaluate.specialisation_texts": 4})
    return tiny_recipe(**sets)


def test_pipeline_deployment_on_a_multi_node_cluster(tmp_path, monkeypatch):
    from moeflow.flows.pipeline import pipeline
    from moeflow.platform import services
    from moeflow.platform.settings import get_settings
    from moeflow.platform.stages import flow_kwargs

    recipe = _recipe()
    home = tmp_path / "home"
    with moto_s3_server() as moto, scratch_databases("catalog", "prefect", "mlflow") as dbs:
        for key, value in cluster_env(home, moto.endpoint, dbs).items():
            monkeypatch.setenv(key, value)
        settings = get_settings()
        settings.ensure_dirs()
        from moeflow.platform.store import open_store

        store = open_store(settings, create_bucket=True)
        nodes = RayNodes(home, ray_node_env())
        monkeypatch.setenv("MOEFLOW_RAY_ADDRESS", nodes.address)
        settings = get_settings()
        svcs = services.services(settings)
        started = []
        try:
            nodes.start(workers=2)
            for name in ("prefect", "mlflow", "flows"):
                services.start_service(svcs[name], settings, timeout=400)
                started.append(name)
            _check_doctor(settings)
            state, result = _run_deployment(settings, flow_kwargs(pipeline, recipe))
            assert state == "COMPLETED", _logs(home)
            _check_cluster_result(result, store, settings, nodes.address, dbs)
        finally:
            for name in reversed(started):
                services.stop_service(svcs[name], settings)
            nodes.stop()
    _check_embedded_hashes(recipe, result, tmp_path)


def _check_doctor(settings) -> None:
    """`moeflow doctor` on the whole configuration: every service ok, Ray's 2 CPUs counted."""
    from moeflow.platform import doctor

    checks = doctor.run_checks(settings, min_cpus=2)
    assert all(c.ok for c in checks), [c.line() for c in checks]
    short = doctor.check_ray(settings, min_cpus=3)
    assert not short.ok and "has 2 CPU" in short.detail and "3 node" not in short.detail


def _logs(home: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((home / "logs").glob("*.log")))


def _run_deployment(settings, parameters: dict, timeout_s: float = 1200):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: settings.prefect_url}):
        flow_run = run_deployment("pipeline/local", parameters=parameters, timeout=0, as_subflow=False)
        deadline = time.time() + timeout_s
        with get_client(sync_client=True) as client:
            while time.time() < deadline:
                run = client.read_flow_run(flow_run.id)
                if run.state.is_final():
                    result = run.state.result() if run.state.is_completed() else None
                    return run.state.type.value, result
                time.sleep(3)
    return "TIMEOUT", None


def _check_cluster_result(result: dict, store, settings, ray_address: str, dbs: dict) -> None:
    for key in ("curated_uri", "tokens_uri", "checkpoint_uri", "hf_uri"):
        assert result[key].startswith(f"s3://{BUCKET}/"), (key, result[key])
    result["curated_hash"] = store.read_artifact(store.key_for_uri(result["curated_uri"])).content_hash
    result["tokens_hash"] = store.read_artifact(store.key_for_uri(result["tokens_uri"])).content_hash
    assert result["eval"], result  # evaluate ran on the pretrained checkpoint
    # post-training on the cluster: each stage's checkpoint in S3, a registered version whose parent is its input
    for stage in ("sft", "reward", "align"):
        assert result[stage]["hf_uri"].startswith(f"s3://{BUCKET}/"), (stage, result[stage])
    assert len(result["eval_models"]) == 3, result["eval_models"]  # pretrained, sft and aligned versions scored
    assert "promoted" in result["deploy"], result["deploy"]  # the gate decided (and recorded why)
    keys = store.list("")
    assert any(k.startswith("mlflow-artifacts/") for k in keys), "no MLflow artefact reached S3"
    # MLflow on PostgreSQL: the pipeline's run and one per stage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow_server_url)
    experiment = client.get_experiment_by_name(settings.project)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 10, [r.info.run_name for r in runs]  # the pipeline + every stage
    # the catalog on PostgreSQL holds the lineage
    from sqlalchemy import create_engine, text

    engine = create_engine(dbs["catalog"].replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        edges = conn.execute(text("SELECT count(*) FROM lineage_edges")).scalar()
        runs_n = conn.execute(text("SELECT count(*) FROM runs")).scalar()
    engine.dispose()
    assert edges >= 4 and runs_n >= 5, (edges, runs_n)
    # the Prefect server keeps its flow runs on PostgreSQL (MOEFLOW_PREFECT_DATABASE_URL)
    engine = create_engine(dbs["prefect"].replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        flow_runs = conn.execute(text("SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'")).scalar()
    engine.dispose()
    assert flow_runs >= 1, flow_runs
    # the fan-out: curation tasks and Ray Train workers ran on both worker nodes
    code = ("import json, ray; from ray.util.state import list_actors, list_tasks, list_nodes; ray.init(address=%r); "
            "heads = {n.node_id for n in list_nodes() if n.is_head_node}; "
            "t = list_tasks(filters=[('func_or_class_name', '=', 'run_shard_segment')], limit=1000, detail=True); "
            "w = list_actors(filters=[('class_name', '=', 'RayTrainWorker')], limit=1000, detail=True); "
            "print(json.dumps({'shard_nodes': sorted({x.node_id for x in t if x.node_id}), "
            "'actor_nodes': sorted({x.node_id for x in w if x.node_id}), 'heads': sorted(heads)}))"
            % ray_address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(set(seen["shard_nodes"]) - set(seen["heads"])) == 2, seen
    assert len(set(seen["actor_nodes"]) - set(seen["heads"])) == 2, seen


def _check_embedded_hashes(recipe: dict, result: dict, tmp_path: Path) -> None:
    """The same recipe embedded (local store, inline): identical curated and token artefacts."""
    from moeflow.platform.data.curate import CurateConfig, default_output_prefix, run_curation
    from moeflow.platform.data.tokenize import TokenizeConfig, run_tokenize
    from moeflow.platform.store import LocalStore

    store = LocalStore(tmp_path / "embedded")
    curate = CurateConfig.model_validate(recipe["curate"])
    curated = run_curation(curate, store, output_prefix=default_output_prefix(curate), num_workers=1, progress=False)
    tokens = run_tokenize(TokenizeConfig.model_validate(recipe["tokenize"]), store, curated_uri=curated.uri,
                          output_prefix=f"datasets/{curate.name}/tokens", num_workers=1)
    cluster_curated = result["curated_uri"].rsplit("/", 1)[-1]
    assert curated.uri.rsplit("/", 1)[-1] == cluster_curated  # the same config + inputs fingerprint
    assert curated.content_hash == result["curated_hash"]
    # meta.json names its inputs by content, not by location (s3://... there, file://... here)
    assert tokens.content_hash == result["tokens_hash"]
