"""Lineage catalog API tests, each run on SQLite and on a real PostgreSQL.

PostgreSQL tests share one scratch database per session (created and dropped here) and
truncate the tables before each test; SQLite tests get a fresh file per test.
"""

from __future__ import annotations

import subprocess

import pytest
from test_catalog_helpers import pg_scratch_database, truncate_catalog

from moeflow.platform.catalog import Catalog, CatalogError, NotFoundError, code_version, config_hash, normalize_url
from moeflow.platform.catalog import ids as catalog_ids


@pytest.fixture(scope="session")
def pg_catalog_url():
    with pg_scratch_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.service)])
def catalog(request, tmp_path):
    if request.param == "sqlite":
        cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    else:
        cat = Catalog(request.getfixturevalue("pg_catalog_url"))
        truncate_catalog(cat.engine)
    yield cat
    cat.close()


def _types(nodes):
    return {(n["type"], n["uri"] if n["type"] == "artifact" else n["id"]) for n in nodes}


# ---------------------------------------------------------------------- runs
def test_run_lifecycle_records_config_code_and_ids(catalog):
    config = {"b": [1, 2], "a": {"lr": 3e-4}}
    run_id = catalog.start_run("curate", config, prefect_flow_run_id="flow-1")
    assert len(run_id) == 32 and int(run_id, 16) >= 0

    run = catalog.get_run(run_id)
    assert run["status"] == "running" and run["ended_at"] is None
    assert run["config"] == config
    assert run["config_hash"] == config_hash(config) == config_hash({"a": {"lr": 3e-4}, "b": [1, 2]})
    assert run["code_version"] == code_version()
    assert run["prefect_flow_run_id"] == "flow-1" and run["mlflow_run_id"] is None

    catalog.set_run_ids(run_id, mlflow_run_id="mlf-9")
    catalog.log_run_metrics(run_id, {"docs_in": 10})
    catalog.finish_run(run_id, metrics={"docs_out": 7})
    run = catalog.get_run(run_id)
    assert run["status"] == "succeeded" and run["error"] is None
    assert run["mlflow_run_id"] == "mlf-9" and run["prefect_flow_run_id"] == "flow-1"
    assert run["metrics"] == {"docs_in": 10, "docs_out": 7}
    assert run["ended_at"] >= run["started_at"]
    assert run["started_at"].endswith("+00:00")


def test_failed_run_keeps_error_and_explicit_code_version(catalog):
    run_id = catalog.start_run("pretrain", {}, code_version="abc1234")
    catalog.finish_run(run_id, status="failed", error="Traceback: boom")
    run = catalog.get_run(run_id)
    assert (run["status"], run["error"], run["code_version"]) == ("failed", "Traceback: boom", "abc1234")


def test_list_runs_filters_and_orders_newest_first(catalog):
    pipeline = catalog.start_run("pipeline", {"recipe": "tiny"})
    children = [catalog.start_run(stage, {}, pipeline_run_id=pipeline) for stage in ("curate", "tokenize", "curate")]
    catalog.start_run("curate", {})  # not part of the pipeline

    assert [r["id"] for r in catalog.list_runs(pipeline_run_id=pipeline)] == children[::-1]
    assert len(catalog.list_runs(stage="curate")) == 3
    assert [r["id"] for r in catalog.list_runs(limit=2)] == [r["id"] for r in catalog.list_runs()][:2]
    catalog.finish_run(children[0], status="failed", error="x")
    assert [r["id"] for r in catalog.list_runs(status="failed")] == [children[0]]
    assert catalog.get_run(children[1])["pipeline_run_id"] == pipeline


def test_runs_are_scoped_to_the_project(catalog):
    other = Catalog(catalog.url, project="other-project")
    try:
        other.start_run("curate", {})
        assert catalog.list_runs() == []
        assert len(other.list_runs()) == 1
    finally:
        other.close()


def test_bad_input_raises_clear_errors(catalog):
    run_id = catalog.start_run("curate", {})
    with pytest.raises(NotFoundError, match="no run 'nope'"):
        catalog.get_run("nope")
    with pytest.raises(NotFoundError, match="nope"):
        catalog.finish_run("nope")
    with pytest.raises(NotFoundError, match="missing-parent"):
        catalog.start_run("tokenize", {}, pipeline_run_id="missing-parent")
    with pytest.raises(ValueError, match="'done'"):
        catalog.finish_run(run_id, status="done")
    with pytest.raises(ValueError, match="stage"):
        catalog.start_run("", {})
    with pytest.raises(TypeError, match="config"):
        catalog.start_run("curate", ["not", "a", "dict"])
    with pytest.raises(ValueError, match="kind"):
        catalog.register_dataset("d", "file:///d", "h", kind="weights")
    with pytest.raises(ValueError, match="no scheme"):
        catalog.register_dataset("d", "relative/path", "h")
    with pytest.raises(TypeError, match="single string"):
        catalog.add_lineage(run_id, inputs="file:///a")
    with pytest.raises(NotFoundError, match="no-such-run"):
        catalog.add_lineage("no-such-run", inputs=["file:///a"])
    with pytest.raises(NotFoundError, match="parent"):
        catalog.register_model("m", "file:///m", "cfg", parent_model_id="ghost")
    assert isinstance(NotFoundError("x"), (KeyError, CatalogError))
    # nothing half-written by the failures
    assert [r["id"] for r in catalog.list_runs()] == [run_id]
    assert catalog.list_datasets() == [] and catalog.list_models() == []


# ---------------------------------------------------------------------- artefacts
def test_dataset_versions_are_numbered_and_idempotent(catalog):
    v1 = catalog.register_dataset("wiki", "file:///s/wiki/1", "h1", {"docs": 10})
    v2 = catalog.register_dataset("wiki", "file:///s/wiki/2", "h2", {"docs": 12})
    tok = catalog.register_dataset("wiki-tok", "file:///s/tok/1", "h3", kind="tokenizer")
    assert len({v1, v2, tok}) == 3
    # a re-run registering the same URI gets the same id, with the new hash/stats
    assert catalog.register_dataset("wiki", "file:///s/wiki/2", "h2b", {"docs": 13}) == v2

    wiki = catalog.list_datasets(name="wiki")
    assert [(d["version"], d["uri"]) for d in wiki] == [(2, "file:///s/wiki/2"), (1, "file:///s/wiki/1")]
    assert wiki[0]["content_hash"] == "h2b" and wiki[0]["stats"] == {"docs": 13}
    assert [d["id"] for d in catalog.list_datasets(kind="tokenizer")] == [tok]
    art = catalog.get_artifact("file:///s/wiki/1")
    assert art["name"] == "wiki" and art["kind"] == "dataset" and art["id"] == v1
    assert catalog.get_artifact("file:///unknown") is None


def test_models_have_versions_parents_and_merged_metrics(catalog):
    base = catalog.register_model("tiny-moe", "file:///ckpt/base", "cfg1", metrics={"loss": 3.2})
    sft = catalog.register_model("tiny-moe-sft", "file:///ckpt/sft", "cfg2", parent_model_id=base)
    base2 = catalog.register_model("tiny-moe", "file:///ckpt/base2", "cfg1")
    assert catalog.register_model("tiny-moe", "file:///ckpt/base", "cfg1", metrics={"ppl": 24.0}) == base

    got = catalog.get_model(base)
    assert got["version"] == 1 and got["metrics"] == {"loss": 3.2, "ppl": 24.0}
    assert catalog.get_model(base2)["version"] == 2
    assert catalog.get_model(sft)["parent_model_id"] == base
    assert [m["id"] for m in catalog.list_models(name="tiny-moe")] == [base2, base]
    assert catalog.get_artifact("file:///ckpt/sft")["kind"] == "model"
    with pytest.raises(NotFoundError):
        catalog.get_model("ghost")


# ---------------------------------------------------------------------- lineage
def _pipeline(catalog):
    """raw -> curate -> curated -> tokenize -> {tokens, tokenizer} -> pretrain x2 -> models; eval."""
    ids = {}
    raw, curated, tokens, tokenizer = "s3://b/raw", "s3://b/curated", "s3://b/tokens", "s3://b/tokenizer"
    ids["curate"] = catalog.start_run("curate", {})
    catalog.register_dataset("curated", curated, "hc")
    catalog.add_lineage(ids["curate"], inputs=[raw], outputs=[curated])
    ids["tokenize"] = catalog.start_run("tokenize", {})
    catalog.register_dataset("tokens", tokens, "ht", kind="tokens")
    catalog.register_dataset("tokenizer", tokenizer, "hk", kind="tokenizer")
    catalog.add_lineage(ids["tokenize"], inputs=[curated], outputs=[tokens, tokenizer])
    for name in ("moe", "dense"):
        ids[name] = catalog.start_run("pretrain", {"arch": name})
        catalog.register_model(name, f"s3://b/ckpt/{name}", "cfg")
        catalog.add_lineage(ids[name], inputs=[tokens, tokenizer], outputs=[f"s3://b/ckpt/{name}"])
    ids["eval"] = catalog.start_run("evaluate", {})
    catalog.add_lineage(ids["eval"], inputs=["s3://b/ckpt/moe", tokenizer], outputs=["s3://b/eval/moe"])
    return ids


def test_upstream_is_transitive_and_excludes_siblings(catalog):
    ids = _pipeline(catalog)
    up = catalog.upstream("s3://b/eval/moe")
    assert _types(up) == {
        ("run", ids["eval"]), ("artifact", "s3://b/ckpt/moe"), ("artifact", "s3://b/tokenizer"),
        ("run", ids["moe"]), ("artifact", "s3://b/tokens"), ("run", ids["tokenize"]),
        ("artifact", "s3://b/curated"), ("run", ids["curate"]), ("artifact", "s3://b/raw"),
    }
    by_key = {n.get("uri") if n["type"] == "artifact" else n["id"]: n for n in up}
    # depth = hops on the shortest path: eval reads the tokenizer directly, so tokenize
    # is 3 hops up (not 5 via ckpt -> moe run -> tokens) and raw is 6
    depths = {k: by_key[k]["depth"] for k in by_key}
    assert depths[ids["eval"]] == 1 and depths["s3://b/tokenizer"] == 2 and depths[ids["moe"]] == 3
    assert depths[ids["tokenize"]] == 3 and depths["s3://b/tokens"] == 4 and depths["s3://b/raw"] == 6
    assert by_key["s3://b/raw"]["registered"] is False and by_key["s3://b/raw"]["kind"] is None
    assert by_key["s3://b/tokens"]["kind"] == "tokens" and by_key["s3://b/ckpt/moe"]["kind"] == "model"
    assert by_key[ids["curate"]]["stage"] == "curate"
    assert [n["depth"] for n in up] == sorted(n["depth"] for n in up)


def test_downstream_reaches_every_descendant(catalog):
    ids = _pipeline(catalog)
    down = catalog.downstream("s3://b/raw")
    assert {k for t, k in _types(down) if t == "run"} == set(ids.values())
    assert {k for t, k in _types(down) if t == "artifact"} == {
        "s3://b/curated", "s3://b/tokens", "s3://b/tokenizer", "s3://b/ckpt/moe", "s3://b/ckpt/dense",
        "s3://b/eval/moe",
    }
    assert _types(catalog.downstream("s3://b/ckpt/dense")) == set()
    assert _types(catalog.downstream("s3://b/ckpt/moe")) == {("run", ids["eval"]), ("artifact", "s3://b/eval/moe")}


def test_walks_start_from_a_run_id_and_lineage_returns_edges(catalog):
    ids = _pipeline(catalog)
    assert _types(catalog.upstream(ids["tokenize"])) == {
        ("artifact", "s3://b/curated"), ("run", ids["curate"]), ("artifact", "s3://b/raw"),
    }
    graph = catalog.lineage("s3://b/tokens")
    keys = {n.get("uri") if n["type"] == "artifact" else n["id"] for n in graph["nodes"]}
    assert "s3://b/tokens" in keys and ids["curate"] in keys and ids["moe"] in keys
    assert ids["eval"] in keys  # via ckpt/moe
    assert "s3://b/tokenizer" not in keys  # a sibling output, neither upstream nor downstream of tokens
    edges = {(e["source"], e["target"], e["direction"]) for e in graph["edges"]}
    assert ("s3://b/curated", ids["tokenize"], "input") in edges
    assert (ids["tokenize"], "s3://b/tokens", "output") in edges
    assert (ids["moe"], "s3://b/ckpt/moe", "output") in edges
    start = [n for n in graph["nodes"] if n["depth"] == 0]
    assert len(start) == 1 and start[0]["uri"] == "s3://b/tokens"


def test_cycles_terminate(catalog):
    a = catalog.start_run("a", {})
    b = catalog.start_run("b", {})
    catalog.add_lineage(a, inputs=["file:///x"], outputs=["file:///y"])
    catalog.add_lineage(b, inputs=["file:///y"], outputs=["file:///x"])
    selfloop = catalog.start_run("rewrite", {})
    catalog.add_lineage(selfloop, inputs=["file:///x"], outputs=["file:///x"])
    expected = {("run", a), ("run", b), ("run", selfloop), ("artifact", "file:///y")}
    assert _types(catalog.upstream("file:///x")) == expected
    assert _types(catalog.downstream("file:///x")) == expected


def test_add_lineage_is_idempotent(catalog):
    run_id = catalog.start_run("curate", {})
    for _ in range(2):
        catalog.add_lineage(run_id, inputs=["file:///in", "file:///in"], outputs=["file:///out"])
    run = catalog.get_run(run_id)
    assert run["inputs"] == ["file:///in"] and run["outputs"] == ["file:///out"]
    assert len(catalog.lineage("file:///in")["edges"]) == 2


# ---------------------------------------------------------------------- settings / helpers
def test_from_settings_uses_sqlite_under_moeflow_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MOEFLOW_CATALOG_URL", raising=False)
    monkeypatch.setenv("MOEFLOW_PROJECT", "proj-x")
    with Catalog.from_settings() as cat:
        assert cat.project == "proj-x"
        cat.start_run("curate", {})
        with cat.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert (tmp_path / "home" / "catalog.db").is_file()


def test_normalize_url_picks_psycopg3():
    assert normalize_url("postgresql://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    with pytest.raises(CatalogError, match="invalid catalog database URL"):
        Catalog("not a url")


def test_code_version_never_fails(monkeypatch):
    catalog_ids.code_version.cache_clear()
    try:
        real = code_version()
        assert real == "unknown" or (len(real) == 40 and int(real, 16) >= 0)

        def boom(*args, **kwargs):
            raise FileNotFoundError("git")

        catalog_ids.code_version.cache_clear()
        monkeypatch.setattr(subprocess, "run", boom)
        assert catalog_ids.code_version() == "unknown"

        catalog_ids.code_version.cache_clear()
        monkeypatch.setattr(
            subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "fatal: not a git repository")
        )
        assert catalog_ids.code_version() == "unknown"
    finally:
        catalog_ids.code_version.cache_clear()


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash({})) == 64


def test_in_memory_catalog_is_shared_across_threads():
    import threading

    with Catalog("sqlite://") as cat:
        run_id = cat.start_run("curate", {})
        seen = []
        thread = threading.Thread(target=lambda: seen.append([r["id"] for r in cat.list_runs()]))
        thread.start()
        thread.join()
        assert seen == [[run_id]]


def test_forked_child_gets_its_own_connections(tmp_path):
    """A child forked after the parent used the catalog must not reuse the parent's connections."""
    import multiprocessing

    url = f"sqlite:///{tmp_path / 'fork.db'}"
    with Catalog(url) as cat:
        cat.start_run("parent", {})

        def child() -> None:
            cat.start_run("child", {})

        proc = multiprocessing.get_context("fork").Process(target=child)
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        cat.start_run("parent-again", {})
        assert sorted(r["stage"] for r in cat.list_runs()) == ["child", "parent", "parent-again"]
