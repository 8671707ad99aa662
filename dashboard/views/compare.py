"""Compare (A/B): overlay the curves of several runs and tabulate their final metrics and differences."""

from __future__ import annotations

import streamlit as st

from moeflow.dashboard import cache, charts, data

from .common import empty, header, home, require_catalog, run_label


def render() -> None:
    header("Compare")
    if require_catalog() is None:
        return
    runs = [r for r in cache.runs(home()) if r.get("mlflow_run_id") and r["stage"] != "pipeline"]
    if len(runs) < 1:
        empty("No run has MLflow metrics yet.", "moeflow run pretrain --recipe tiny")
        return
    by_id = {r["id"]: r for r in runs}
    wanted = [i for i in st.query_params.get("runs", "").split(",") if i in by_id]
    default = wanted or [r["id"] for r in runs if r["stage"] == runs[0]["stage"]][:2]
    chosen = st.multiselect("runs (the first is the baseline)", list(by_id), default=default,
                            format_func=lambda i: run_label(by_id[i]), key="compare-runs")
    st.query_params["runs"] = ",".join(chosen)
    if not chosen:
        st.info("Pick at least one run.")
        return
    picked = [by_id[i] for i in chosen]
    histories = {r["id"]: cache.metric_history(home(), r["mlflow_run_id"]) for r in picked}
    names = sorted({row["metric"] for h in histories.values() for row in h} - {""})
    curves = [n for n in names if not n.startswith("system/")]
    default_metric = next((n for n in ("loss", "train/loss", "val_loss") if n in curves), curves[0] if curves else None)
    if default_metric is None:
        st.info("These runs have no metric histories in MLflow.")
        return
    metric = st.selectbox("metric", curves, index=curves.index(st.query_params.get("metric", default_metric))
                          if st.query_params.get("metric") in curves else curves.index(default_metric), key="cmp-m")
    st.query_params["metric"] = metric
    rows = [{**row, "run": run_label(by_id[rid])} for rid, h in histories.items() for row in h if row["metric"] == metric]
    with st.container(key="compare-chart"):
        st.vega_lite_chart(rows, charts.curves(rows, metric, color="run"), width="stretch")
    st.subheader("final metrics")
    st.dataframe(data.final_metrics_table(picked, histories), hide_index=True, width="stretch", key="final")
