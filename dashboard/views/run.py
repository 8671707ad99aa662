"""Run: one run's curves from MLflow (loss parts, val loss, lr, grad norm, tokens/s, MFU), config, inputs, outputs."""

from __future__ import annotations

import json

import streamlit as st

from moeflow.dashboard import cache, charts, data

from .common import FILL_PIPELINE, empty, header, home, live, page, pick, require_catalog, run_label


def render() -> None:
    header("Run")
    if require_catalog() is None:
        return
    live(_body)


def _body() -> None:
    runs = [r for r in cache.runs(home()) if r["stage"] != "pipeline"]
    if not runs:
        empty("No stage runs yet.", FILL_PIPELINE)
        return
    by_id = {r["id"]: r for r in runs}
    wanted = st.query_params.get("id")
    if wanted and wanted not in by_id:
        found = cache.run(home(), wanted)
        if found is None:
            st.warning(f"The catalog has no run `{wanted}`; showing the newest.")
        else:
            by_id = {found["id"]: found, **by_id}
    run_id = pick("run", list(by_id), "id", format_func=lambda i: run_label(by_id[i]))
    run = cache.run(home(), run_id) or by_id[run_id]
    show_run(run)


def show_run(run: dict) -> None:
    dur = data.duration_s(run)
    cols = st.columns(4)
    cols[0].metric("stage", run["stage"])
    cols[1].metric("status", run["status"])
    cols[2].metric("duration", f"{dur:.1f} s" if dur is not None else "—")
    head = data.headline(run)
    cols[3].metric(head[0] if head else "metric", f"{head[1]:.4g}" if head else "—")
    if run.get("error"):
        st.error(run["error"])
    if run.get("pipeline_run_id"):
        st.page_link(page("overview"), label=f"pipeline {run['pipeline_run_id'][:8]}", icon=":material/list:")
    history = cache.metric_history(home(), run["mlflow_run_id"]) if run.get("mlflow_run_id") else []
    groups = data.curve_keys(sorted({r["metric"] for r in history}))
    with st.container(key="curves"):
        if not groups:
            st.info("No curves in MLflow for this run (training stages log them every `log_every` steps).")
        chart_cols = st.columns(2)
        for i, (group, keys) in enumerate(groups.items()):
            rows = [r for r in history if r["metric"] in keys]
            chart_cols[i % 2].vega_lite_chart(rows, charts.curves(rows, group), width="stretch")
    if any(u for u in run.get("outputs", []) if u.rstrip("/").endswith("/expert_load")):
        st.page_link(page("experts"), label="expert load of this run", query_params={"run": run["id"]},
                     icon=":material/grid_on:")
    left, right = st.columns(2)
    with left:
        st.subheader("inputs")
        st.dataframe([{"uri": u} for u in run.get("inputs", [])], hide_index=True, width="stretch")
        st.subheader("outputs")
        st.dataframe([{"uri": u} for u in run.get("outputs", [])], hide_index=True, width="stretch")
        st.subheader("metrics")
        st.json(run.get("metrics") or {}, expanded=False)
    with right:
        st.subheader("config")
        st.code(json.dumps(run.get("config"), indent=2, default=str), language="json")
