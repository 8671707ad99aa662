"""Faults in the cluster topology (`slow`, loopback only), one test each, on one topology for the module
(``tests/topology.py``): a Ray head + 2 worker nodes (`ray start`), moto's S3 server for every artefact,
and a PostgreSQL server of this module (its own data directory and port, so it can be restarted without
touching the machine's shared one) holding the catalog and the MLflow backend.

- PostgreSQL restarted between two stages of a `pipeline` run (``pg_ctl restart -m fast`` ends every
  open connection): the next stage connects anew, the pipeline's own catalog and MLflow connections,
  pooled since its start, are found dead by SQLAlchemy's pre-ping and replaced; nothing is lost.
- The S3 server stopped while a stage writes its artefact and started again seconds later on the same
  port: the store's retry loop (``MOEFLOW_S3_RETRY_TRIES``) rides it out, the stage ends with the
  uninterrupted content hash and no partial artefact is visible. The restarted server keeps its objects
  because moto's backend lives in this process (``ThreadedMotoServer``): the stand-in for an S3 server
  whose data is on a persistent volume, as in ``infra/compose.yaml``.
- A Ray worker node SIGKILLed mid-training (its whole `ray start` process group) and a replacement node
  started, as KubeRay would: Ray Train restarts the worker group (``MOEFLOW_RAY_MAX_FAILURES``) and it
  resumes from the last checkpoint committed in S3; the final weights are bit-identical to an
  uninterrupted run's (gloo's all-reduce of 2 ranks is order-independent, and the data position, RNG
  and optimiser state come back with the checkpoint).

The Prefect API of the pipeline run is the session's test server (SQLite): restarting a Prefect server
on PostgreSQL is not covered here.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import DEFAULT_ACCOUNT_ID, MotoS3  # noqa: E402
from topology import (BUCKET, PrivatePostgres, RayNodes, cluster_env, ray_node_env, scratch_databases,  # noqa: E402
                      tiny_recipe)

pytestmark = [pytest.mark.slow, pytest.mark.service, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    """(env, moto, postgres, ray nodes, curated uri, tokens uri) of one topology for the module."""
    root = tmp_path_factory.mktemp("faults")
    with contextlib.ExitStack() as stack:
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        moto = MotoS3().start()
        stack.callback(moto.stop)
        pg = PrivatePostgres().start()
        stack.callback(pg.stop)
        dbs = stack.enter_context(scratch_databases("catalog", "mlflow", admin_url=pg.admin_url))
        env = {**cluster_env(root / "home", moto.endpoint, dbs), "MOEFLOW_S3_RETRY_TRIES": "10"}
        for key, value in env.items():
            mp.setenv(key, value)
        nodes = RayNodes(root / "home", ray_node_env())
        stack.callback(nodes.stop)
        nodes.start(workers=2)
        mp.setenv("MOEFLOW_RAY_ADDRESS", nodes.address)
        stack.callback(_ray_shutdown)
        from moeflow.platform.settings import get_settings
        from moeflow.platform.store import open_store

        store = open_store(get_settings(), create_bucket=True)
        curated, tokens = _curate_and_tokenize(store, tiny_recipe(), dataset="base")
        yield {"env": env, "moto": moto, "pg": pg, "nodes": nodes, "store": store, "root": root,
               "curated": curated, "tokens": tokens}


def _ray_shutdown() -> None:
    import ray

    ray.shutdown()


def _curate_and_tokenize(store, recipe: dict, dataset: str, num_workers: int = 1):
    from moeflow.platform.data.curate import CurateConfig, run_curation
    from moeflow.platform.data.tokenize import TokenizeConfig, run_tokenize

    curate = CurateConfig.model_validate({**recipe["curate"], "name": dataset})
    curated = run_curation(curate, store, output_prefix=f"datasets/{dataset}/curated", num_workers=num_workers,
                           progress=False)
    tokens = run_tokenize(TokenizeConfig.model_validate(recipe["tokenize"]), store, curated_uri=curated.uri,
                          output_prefix=f"datasets/{dataset}/tokens", num_workers=num_workers)
    return curated, tokens


def _bucket_keys() -> list[str]:
    from moto.s3.models import s3_backends

    bucket = s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[BUCKET]
    for _ in range(20):  # the server thread may add a key while we copy the dict
        with contextlib.suppress(RuntimeError):
            return list(bucket.keys.keys())
    return []


# ------------------------------------------------------------------ PostgreSQL restarted between stages
def test_postgres_restart_between_stages_loses_nothing(topology, prefect_harness, monkeypatch):
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from moeflow.flows import pipeline as pipeline_module
    from moeflow.platform.stages import flow_kwargs

    pg = topology["pg"]
    restarted: list[float] = []
    tokenize = pipeline_module.tokenize_task

    def restart_then_tokenize(*args, **kwargs):  # the seam between the curate and tokenize stages
        pg.restart()
        restarted.append(time.time())
        return tokenize.fn(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "tokenize_task",
                        task(name="tokenize", cache_policy=NO_CACHE)(restart_then_tokenize))
    recipe = tiny_recipe()
    recipe["curate"]["name"] = "pgrestart"
    recipe["run_name"] = "pgrestart"
    recipe["skip"] = ["pretrain", "posttrain_data", "sft", "reward", "align", "evaluate", "deploy"]
    result = pipeline_module.pipeline(**flow_kwargs(pipeline_module.pipeline, recipe))
    assert restarted, "PostgreSQL was never restarted"
    _check_postgres_kept_everything(topology, result)


def _check_postgres_kept_everything(topology, result: dict) -> None:
    from mlflow.tracking import MlflowClient
    from sqlalchemy import create_engine, text

    from moeflow.platform.settings import get_settings

    engine = create_engine(topology["env"]["MOEFLOW_CATALOG_URL"].replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        runs = dict(conn.execute(text("SELECT stage, status FROM runs WHERE stage IN "
                                      "('pipeline', 'curate', 'tokenize')")).all())
        produced = {row[0] for row in conn.execute(text("SELECT artifact_uri FROM lineage_edges "
                                                        "WHERE direction = 'output'"))}
    engine.dispose()
    assert runs == {"pipeline": "succeeded", "curate": "succeeded", "tokenize": "succeeded"}, runs
    assert {result["curated_uri"], result["tokens_uri"]} <= produced, produced
    client = MlflowClient(tracking_uri=get_settings().tracking_uri)
    experiment = client.get_experiment_by_name(get_settings().project)
    mlflow_runs = {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])
                   if "pgrestart" in (r.info.run_name or "")}
    assert sorted(mlflow_runs.values()) == ["FINISHED"] * 3, mlflow_runs  # the pipeline's and one per stage


# ------------------------------------------------------------------ the S3 server restarted mid-stage
def test_s3_restart_mid_stage_retries_and_leaves_no_partial_artifact(topology, caplog, tmp_path):
    from moeflow.platform.data.tokenize import TokenizeConfig, run_tokenize
    from moeflow.platform.store import LocalStore

    moto, store = topology["moto"], topology["store"]
    recipe = tiny_recipe()
    prefix = "datasets/s3restart/tokens"
    outage: dict[str, float] = {}

    def restart_when_the_write_starts() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not any(k.startswith(f"{prefix}/") and "/.tmp-" in k for k in _bucket_keys()):
            time.sleep(0.02)
        moto.stop()
        outage["stopped"] = time.time()
        time.sleep(4.0)  # longer than the default retry budget (4 tries, ~1.5 s of backoff)
        moto.start()
        outage["started"] = time.time()

    watcher = threading.Thread(target=restart_when_the_write_starts, daemon=True)
    watcher.start()
    with caplog.at_level("WARNING", logger="moeflow.platform.store.s3"):
        tokens = run_tokenize(TokenizeConfig.model_validate(recipe["tokenize"]), store,
                              curated_uri=topology["curated"].uri, output_prefix=prefix, num_workers=2)
    ended = time.time()
    watcher.join(30)
    assert outage.get("started", ended) < ended and "stopped" in outage, outage  # the outage was mid-stage
    assert any("retry" in r.getMessage() for r in caplog.records), "no request met the stopped server"
    # the uninterrupted result: the same tokenization on a local store
    local = LocalStore(tmp_path / "embedded")
    local_curated = local.uri("curated")
    with local.write_artifact("curated") as w:
        art = store.read_artifact(store.key_for_uri(topology["curated"].uri))
        for name in art.names():
            w.put_bytes(name, art.get_bytes(name))
    reference = run_tokenize(TokenizeConfig.model_validate(recipe["tokenize"]), local, curated_uri=local_curated,
                             output_prefix=prefix, num_workers=1)
    assert tokens.content_hash == reference.content_hash
    # nothing partial: under the stage's prefix only committed artefacts' files and their manifests
    keys = store.list(prefix)
    assert not [k for k in keys if "/.tmp-" in k], keys
    committed = {k.rsplit("/", 1)[0] for k in keys if k.endswith("/MANIFEST.json")}
    assert all(any(k.startswith(c + "/") for c in committed) for k in keys), keys


# ------------------------------------------------------------------ a Ray worker node killed mid-training
def _train(topology, prefix: str):
    from moeflow.platform.train.launcher import run_pretrain
    from moeflow.platform.train.config import PretrainConfig

    recipe = tiny_recipe(**{"pretrain.max_steps": 24, "pretrain.checkpoint_every": 4, "pretrain.log_every": 4,
                            "pretrain.val_every": 12})
    config = PretrainConfig.from_dict(recipe["pretrain"])
    return run_pretrain(config, topology["store"], tokens_uri=topology["tokens"].uri, output_prefix=prefix,
                        num_workers=2)


def _weights_sha(store, hf_uri: str) -> dict[str, str]:
    art = store.read_artifact(store.key_for_uri(hf_uri))
    return {name: info["sha256"] for name, info in art.files.items() if name.endswith(".safetensors")}


def test_killed_worker_node_resumes_from_the_last_s3_checkpoint(topology, capfd):
    store, nodes = topology["store"], topology["nodes"]
    reference = _train(topology, "runs/uninterrupted")
    victim = nodes.alive()[1]  # a worker node (the head is alive()[0]); each holds one of the 2 workers
    prefix = "runs/node-killed"
    kill: dict = {}

    def kill_after_the_first_checkpoint() -> None:
        manifest = f"{prefix}/checkpoints/step-00000004/MANIFEST.json"
        deadline = time.time() + 600
        while time.time() < deadline and manifest not in _bucket_keys():
            time.sleep(0.05)
        kill["checkpoints"] = sorted(k.split("/")[3] for k in _bucket_keys()
                                     if k.startswith(f"{prefix}/checkpoints/") and k.endswith("/MANIFEST.json"))
        nodes.kill_worker(victim)
        kill["at"] = time.time()
        kill["replacement"] = nodes.add_worker()  # what KubeRay does for a lost pod

    watcher = threading.Thread(target=kill_after_the_first_checkpoint, daemon=True)
    watcher.start()
    result = _train(topology, prefix)
    watcher.join(60)
    assert "at" in kill, "the node was never killed"
    assert kill["checkpoints"] and kill["checkpoints"][-1] != "step-00000024", kill  # killed mid-training
    out = capfd.readouterr()
    resumed = [int(s) for s in re.findall(r"resumed from s3://\S+/checkpoints/step-(\d+) at step", out.out + out.err)]
    # from the newest checkpoint committed when the node died (rank 0 may have committed one more alone)
    assert resumed and int(kill["checkpoints"][-1].split("-")[1]) <= min(resumed) < 24, (resumed, kill)
    assert result.steps == reference.steps == 24
    assert _weights_sha(store, result.hf_uri) == _weights_sha(store, reference.hf_uri)
    assert result.metrics == reference.metrics
