"""The dashboard's pages (Streamlit AppTest, in-process) and their logic (plain functions) on a small home
written through the platform's writers (tests/dashboard_home.py), plus the read-only guarantee."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.dashboard_home import DEAD, NUM_LAYERS, build_home, expert_load_recorder

PAGES = ("overview", "run", "compare", "experts", "data_page", "lineage", "models", "serving")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("dash") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEFLOW_HOME", str(path))
        ids = build_home(path)
        yield {"path": path, **ids}


def _page(name):
    import importlib

    importlib.import_module(f"moeflow.dashboard.views.{name}").render()


def open_page(name: str, **query):
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_function(_page, args=(name,), default_timeout=60)
    for key, value in query.items():
        app.query_params[key] = value
    return app.run()


def _texts(app) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "info", "warning", "error", "success", "code")
                     for e in getattr(app, kind))


# ------------------------------------------------------------------ pure logic
def test_maxvio_and_alerts_find_the_dead_expert():
    from moeflow.dashboard import data

    arrays = expert_load_recorder().arrays()
    counts = arrays["counts"]
    maxvio = data.maxvio_NL(counts)
    assert maxvio.shape == counts.shape[:2]
    # a balanced window has MaxVio 0; one expert with all the load has E - 1
    balanced = np.ones((1, 1, 8))
    skewed = np.zeros((1, 1, 8)); skewed[0, 0, 3] = 8
    assert data.maxvio_NL(balanced)[0, 0] == pytest.approx(0.0)
    assert data.maxvio_NL(skewed)[0, 0] == pytest.approx(7.0)
    # global MaxVio averages transient imbalance out: alternating hot experts -> lower than per-window
    alternating = np.zeros((2, 1, 2)); alternating[0, 0, 0] = alternating[1, 0, 1] = 10
    assert data.global_maxvio_NL(alternating)[-1, 0] == pytest.approx(0.0)
    assert data.maxvio_NL(alternating)[-1, 0] == pytest.approx(1.0)
    alerts = data.expert_alerts(counts)
    assert {(a["layer"], a["expert"]) for a in alerts if a["alert"] == "dead"} == {DEAD}
    hot = np.ones((3, 1, 4)); hot[:, 0, 0] = 10
    assert [a["alert"] for a in data.expert_alerts(hot)] == ["overloaded"]


def test_heatmap_and_bias_rows_cover_every_cell():
    from moeflow.dashboard import data

    arrays = expert_load_recorder().arrays()
    N, L, E = arrays["counts"].shape
    rows = data.heatmap_rows(arrays, 1)
    assert len(rows) == N * E
    assert {r["step"] for r in rows} == set(arrays["steps"].tolist())
    last_dead = [r for r in rows if r["step"] == arrays["steps"][-1] and r["expert"] == DEAD[1]]
    assert last_dead[0]["relative_load"] == 0.0
    bias = data.bias_rows(arrays, 0)
    assert len(bias) == N * E and any(r["bias"] != 0 for r in bias)


def test_curve_groups_and_headline():
    from moeflow.dashboard import data

    groups = data.curve_keys(["loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "expert_load/layer0/max_share"])
    assert groups == {"loss": ["loss", "val_loss"], "learning rate": ["lr"], "grad norm": ["grad_norm"],
                      "throughput": ["tokens_per_s"]}
    assert data.headline({"metrics": {"loss": 3.0, "val_loss": 2.5}}) == ("val_loss", 2.5)
    assert data.headline({"metrics": {}}) is None


def test_funnel_keeps_percentages():
    from moeflow.dashboard import data

    table = data.funnel_table([{"stage": "input", "docs": 40, "bytes": 100}, {"stage": "out", "docs": 30, "bytes": 50}])
    assert [r["% docs kept"] for r in table] == [100.0, 75.0]
    assert table[1]["% bytes kept"] == 50.0


def test_serving_summary_from_prometheus_text():
    from moeflow.dashboard import serving

    def text(n_requests: float) -> str:
        lines = [f'moeflow_serve_routed_requests_total{{model="m",version="1",via="split"}} {n_requests}',
                 f'moeflow_serve_routed_requests_total{{model="m",version="2",via="split"}} {3 * n_requests}',
                 f'moeflow_serve_routed_requests_total{{model="other",version="7",via="only"}} {5 * n_requests}',
                 'moeflow_serve_generation_tokens_total{model="m",version="1",replica="0"} 100']
        for le, c in (("0.1", 0), ("0.2", 10), ("+Inf", 10)):
            lines.append(f'moeflow_serve_time_to_first_token_seconds_bucket{{model="m",version="1",replica="0",le="{le}"}} {c}')
        return "# TYPE moeflow_serve_routed_requests counter\n" + "\n".join(lines) + "\n"

    rows = serving.summary(serving.parse(text(20)), serving.parse(text(10)), interval_s=5.0)
    v1 = next(r for r in rows if r["version"] == "1")
    v2 = next(r for r in rows if r["version"] == "2")
    assert v1["requests/s"] == pytest.approx(2.0) and v2["requests/s"] == pytest.approx(6.0)
    assert v1["share"] == pytest.approx(0.25)  # of model m's requests: another model's do not dilute it
    assert next(r for r in rows if r["model"] == "other")["share"] == pytest.approx(1.0)
    assert v1["ttft p50 (s)"] == pytest.approx(0.15)  # linear inside the (0.1, 0.2] bucket
    assert serving.quantile(0.5, []) is None


# ------------------------------------------------------------------ pages (AppTest)
@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders_without_exception(home, name):
    app = open_page(name)
    assert not app.exception, [e.value for e in app.exception]


def test_overview_lists_the_pipeline_with_stages_links_and_the_error(home):
    app = open_page("overview")
    table = app.dataframe[0].value
    assert list(table["stage"]) == ["curate", "tokenize", "pretrain", "evaluate", "deploy"]  # registry order
    assert list(table["status"])[-1] == "failed"
    assert table["run"].iloc[2] == f"/run?id={home['pretrain']}"
    # MLflow's UI resolves #/runs/<id> to the run's page itself: the Overview reads nothing from MLflow
    assert re.fullmatch(r"http://127\.0\.0\.1:5000/#/runs/[0-9a-f]{32}", table["mlflow"].iloc[2])
    assert "val_loss = 5.2" in list(table["metric"])
    assert table["artefacts"].iloc[2] == f"/lineage?pipeline={home['pipeline']}&node={home['pretrain']}"
    assert any("gate refused" in e.value for e in app.error)


def test_run_page_draws_curves_of_the_selected_run(home):
    app = open_page("run", id=home["pretrain"])
    assert app.selectbox[0].value == home["pretrain"]
    charts = app.get("vega_lite_chart")
    assert len(charts) == 4  # loss, learning rate, grad norm, throughput


def test_experts_page_has_one_heatmap_per_layer_and_the_alert(home):
    app = open_page("experts", run=home["pretrain"])
    heatmaps = [c for c in app.get("vega_lite_chart") if '"rect"' in c.proto.spec]
    assert len(heatmaps) == NUM_LAYERS
    assert any("1 dead and 0 overloaded" in w.value for w in app.warning)
    assert app.query_params["run"] == [home["pretrain"]] or app.query_params["run"] == home["pretrain"]


def test_data_page_shows_funnel_rules_and_quarantine(home):
    app = open_page("data_page")
    funnel = app.dataframe[0].value
    assert list(funnel["stage"])[0] == "input" and list(funnel["% docs kept"])[-1] == pytest.approx(75.0)
    rules = {tuple(r) for r in app.dataframe[1].value[["step", "rule", "docs"]].values.tolist()}
    assert rules == {("quality", "too_short", 6), ("exact_dedup", "duplicate", 4)}
    assert any("not_utf8" in str(d.value) for d in app.dataframe)


def test_lineage_graph_holds_the_pipeline_runs_and_artefacts(home):
    app = open_page("lineage", pipeline=home["pipeline"], node=home["pretrain"])
    dot = app.get("graphviz_chart")[0].proto.spec
    for stage in ("curate", "tokenize", "pretrain", "evaluate", "deploy"):
        assert f"{stage}\\n{home[stage][:8]}" in dot
    # click-through keeps the pipeline being looked at (its details are then shown, not the newest pipeline's)
    assert f"URL=\"/lineage?pipeline={home['pipeline']}&node={home['pretrain']}\"" in dot
    assert "penwidth=3" in dot  # the selected node
    assert any(home["pretrain"] in c.value for c in app.code)


def test_models_page_shows_versions_aliases_eval_and_decision(home):
    app = open_page("models")
    versions = app.dataframe[0].value
    assert list(versions["version"]) == [2, 1]
    assert list(versions["aliases"]) == ["champion", ""]
    evals = app.dataframe[1].value
    assert dict(zip(evals["task metric"], evals["value"]))["python_mc.acc"] == "0.25"
    decisions = [d.value for d in app.dataframe if "promoted" in d.value.columns]
    assert decisions and bool(decisions[0]["promoted"].iloc[0]) is True
    # the compared version is in the URL too (a bookmark shows the same comparison)
    assert open_page("models").query_params["vs"] == "1"
    compared = open_page("models", version="1", vs="2")
    table = next(d.value for d in compared.dataframe if "b - a" in d.value.columns)
    assert compared.selectbox(key="compare-version").value == "2" and len(table) >= 1


def test_compare_overlays_runs_and_differences(home):
    from moeflow.dashboard import data

    runs = [{"id": "a" * 32}, {"id": "b" * 32}]
    hist = {"a" * 32: [{"metric": "loss", "step": 1, "value": 3.0}, {"metric": "loss", "step": 2, "value": 2.0}],
            "b" * 32: [{"metric": "loss", "step": 2, "value": 1.5}]}
    table = data.final_metrics_table(runs, hist)
    assert table == [{"metric": "loss", "aaaaaaaa": 2.0, "bbbbbbbb": 1.5, "bbbbbbbb - aaaaaaaa": -0.5}]
    app = open_page("compare", runs=home["pretrain"], metric="loss")
    assert not app.exception and len(app.get("vega_lite_chart")) == 1


# ------------------------------------------------------------------ read-only
def test_fresh_home_creates_nothing(tmp_path, monkeypatch):
    home = tmp_path / "fresh"
    monkeypatch.setenv("MOEFLOW_HOME", str(home))
    for name in PAGES:
        app = open_page(name)
        assert not app.exception, (name, [e.value for e in app.exception])
        if name != "serving":
            assert any("moeflow run" in i.value for i in app.info), name  # the empty state names the command
    assert not home.exists(), sorted(p.name for p in home.rglob("*"))


def test_pages_without_mlflow_reads_leave_it_unopened(home):
    """Importing MLflow is most of a cold visit: the Overview (the first page anyone opens), Data,
    Lineage and Serving pages must not open its client."""
    from moeflow.dashboard import cache, sources

    cache._sources.clear()
    for name in ("overview", "data_page", "lineage", "serving"):
        assert not open_page(name).exception
        assert cache.sources()._mlflow is sources._UNOPENED, name
    assert not open_page("run").exception
    assert cache.sources()._mlflow is not None  # the Run page opened it, on first use


def test_server_warm_up_imports_the_pages_dependencies_and_creates_nothing(tmp_path):
    """``python -m moeflow.dashboard.server`` (what ``moeflow up`` runs) imports MLflow & co. before
    Streamlit binds its port, without touching a fresh home."""
    home = tmp_path / "fresh"
    code = ("import sys; from moeflow.dashboard.server import warm; warm(); "
            "print(sorted(m for m in ('mlflow.tracking', 'pandas', 'pyarrow', 'sqlalchemy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MOEFLOW_HOME": str(home)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "['mlflow.tracking', 'pandas', 'pyarrow', 'sqlalchemy']"
    assert not home.exists()


def test_pages_do_not_write_to_the_home(home):
    before = {p: p.stat().st_mtime_ns for p in home["path"].rglob("*") if p.is_file() and "-wal" not in p.name
              and "-shm" not in p.name}
    for name in PAGES:
        open_page(name)
    after = {p: p.stat().st_mtime_ns for p in home["path"].rglob("*") if p.is_file() and "-wal" not in p.name
             and "-shm" not in p.name}
    assert after == before


def test_pages_refresh_themselves_while_a_run_is_running(tmp_path, monkeypatch):
    """Auto-refresh: the pages' bodies run as a fragment with ``run_every`` while a run is running, and
    without once it ended."""
    import streamlit as st

    from moeflow.dashboard import cache
    from moeflow.dashboard.views import common
    from moeflow.platform.catalog import Catalog

    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))
    from moeflow.platform.settings import get_settings

    settings = get_settings()
    settings.home.mkdir(parents=True)
    catalog = Catalog(settings.catalog_db_url, project=settings.project)
    run_id = catalog.start_run("pretrain", {"stage": "pretrain"})
    every: list = []
    fragment = st.fragment
    monkeypatch.setattr(st, "fragment", lambda *a, **kw: every.append(kw.get("run_every")) or fragment(*a, **kw))
    cache._sources.clear()
    st.cache_data.clear()
    app = open_page("overview")
    assert not app.exception and every == [common.REFRESH_S]
    assert any("refreshing every" in c.value for c in app.caption)
    catalog.finish_run(run_id, "succeeded")
    catalog.close()
    st.cache_data.clear()
    every.clear()
    app = open_page("overview")
    assert not app.exception and every == [None]
    assert not any("refreshing every" in c.value for c in app.caption)


def test_a_missing_browser_fails_the_browser_tests_in_ci(tmp_path):
    """In CI (CI=true) no Chromium is a failure, not a skip (tests/conftest.py's service_unavailable)."""
    env = {**os.environ, "CI": "true", "MOEFLOW_CHROMIUM": str(tmp_path / "no-chromium")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_dashboard_browser.py::test_overview_links_resolve"],
                         cwd=str(Path(__file__).resolve().parents[1]), env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0, out.stdout[-2000:]
    assert "required service unavailable in CI: no Chromium" in out.stdout, out.stdout[-2000:]
    assert "1 error" in out.stdout or "1 failed" in out.stdout, out.stdout[-2000:]


def test_lineage_of_a_pipeline_includes_the_producers_of_cached_inputs():
    from moeflow.dashboard import data

    def run(rid, stage, inputs=(), outputs=(), pipeline=None):
        return {"id": rid, "stage": stage, "status": "succeeded", "inputs": list(inputs), "outputs": list(outputs),
                "pipeline_run_id": pipeline}

    old = [run("c1", "curate", [], ["cur"], "p1"), run("t1", "tokenize", ["cur"], ["tok"], "p1")]
    new = [run("r2", "pretrain", ["tok"], ["model"], "p2")]
    extra = data._upstream_runs(new + old, new)
    assert [r["id"] for r in extra] == ["t1", "c1"]
