"""Experts: every layer's step × expert load heatmap, MaxVio per layer and global, router bias,
dead / overloaded expert alerts and the evaluation stage's specialisation report; two runs side by side."""

from __future__ import annotations

import numpy as np
import streamlit as st

from moeflow.dashboard import cache, charts, data

from .common import empty, header, home, live, require_catalog, run_label

MAX_LAYERS = 64  # heatmaps drawn per run (a 60-layer model still fits; the npz keeps them all)


def render() -> None:
    header("Experts")
    if require_catalog() is None:
        return
    live(_body)


def _body() -> None:
    runs = cache.expert_load_runs(home())
    if not runs:
        empty("No training run has recorded expert load yet.", "moeflow run pretrain --recipe tiny")
        return
    by_id = {r["id"]: r for r in runs}
    ids = list(by_id)
    wanted = st.query_params.get("run")
    first = st.selectbox("run", ids, index=ids.index(wanted) if wanted in ids else 0,
                         format_func=lambda i: run_label(by_id[i]), key="experts-run")
    others = ["—", *[i for i in ids if i != first]]
    wanted_vs = st.query_params.get("vs")
    second = st.selectbox("side by side with", others, index=others.index(wanted_vs) if wanted_vs in others else 0,
                          format_func=lambda i: i if i == "—" else run_label(by_id[i]), key="experts-vs")
    st.query_params["run"] = first
    if second == "—":
        st.query_params.pop("vs", None)
        show_run(by_id[first], "a")
    else:
        st.query_params["vs"] = second
        left, right = st.columns(2)
        with left:
            show_run(by_id[first], "a")
        with right:
            show_run(by_id[second], "b")
    _specialisation()


def show_run(run: dict, slot: str) -> None:
    arrays = cache.expert_load(home(), run["expert_load_uri"])
    counts_NLE, steps_N = arrays["counts"], arrays["steps"]
    if counts_NLE.size == 0:
        st.info("This run recorded no expert-load windows yet (one per `log_every` steps).")
        return
    N, L, E = counts_NLE.shape
    st.markdown(f"**{run['stage']}** `{run['id'][:8]}`: {N} windows up to step {int(steps_N[-1])}, "
                f"{L} router layers × {E} experts")
    alerts = data.expert_alerts(counts_NLE)
    with st.container(key=f"alerts-{slot}"):
        if alerts:
            dead = [a for a in alerts if a["alert"] == "dead"]
            hot = [a for a in alerts if a["alert"] == "overloaded"]
            st.warning(f"{len(dead)} dead and {len(hot)} overloaded experts over the last 3 windows "
                       f"(relative load < {data.DEAD_BELOW} or > {data.OVERLOADED_ABOVE})")
            st.dataframe(alerts, hide_index=True, width="stretch", key=f"alert-table-{slot}")
        else:
            st.success("No dead or overloaded experts over the last 3 windows.")
    maxvio = data.maxvio_NL(counts_NLE)
    global_maxvio = data.global_maxvio_NL(counts_NLE)
    cols = st.columns(2)
    rows = data.layer_series_rows(steps_N, maxvio, "maxvio")
    cols[0].vega_lite_chart(rows, charts.curves(rows, "MaxVio per window", color="layer", y="maxvio"), width="stretch")
    rows = data.layer_series_rows(steps_N, global_maxvio, "maxvio_global")
    cols[1].vega_lite_chart(rows, charts.curves(rows, "MaxVio global (cumulative load)", color="layer",
                                                y="maxvio_global"), width="stretch")
    _rl_routing(run, slot)
    st.subheader("load per layer")
    with st.container(key=f"heatmaps-{slot}"):
        grid = st.columns(2 if slot == "a" and L > 1 else 1)
        for layer in range(min(L, MAX_LAYERS)):
            title = f"layer {int(arrays['layers'][layer]) if 'layers' in arrays else layer}"
            with grid[layer % len(grid)]:
                with st.container(key=f"heatmap-{slot}-{layer}"):
                    rows = data.heatmap_rows(arrays, layer)
                    st.vega_lite_chart(rows, charts.heatmap(rows, title), width="stretch")
    bias = arrays.get("bias")
    st.subheader("router bias")
    if bias is None or not np.any(bias):
        st.info("The router bias stayed at zero (aux-loss balancing or a bias update speed of 0).")
    else:
        layer = st.slider("layer", 0, L - 1, 0, key=f"bias-layer-{slot}") if L > 1 else 0
        rows = data.bias_rows(arrays, layer)
        st.vega_lite_chart(rows, charts.curves(rows, f"router bias, layer {layer}", color="expert", y="bias"),
                           width="stretch")


def _rl_routing(run: dict, slot: str) -> None:
    """RL runs: MaxVio per layer of the rollout's routing beside the update's, and their agreement."""
    rl = cache.rl_routing(home(), run.get("mlflow_run_id") or "")
    if not rl["maxvio"] and not rl["agreement"]:
        return
    st.subheader("RL routing: rollout vs update")
    with st.container(key=f"rl-routing-{slot}"):
        cols = st.columns(2)
        if rl["maxvio"]:
            cols[0].vega_lite_chart(rl["maxvio"], charts.curves(rl["maxvio"], "MaxVio per layer (— rollout, ┅ update)",
                                                                color="layer", y="maxvio", dash="phase"),
                                    width="stretch")
        if rl["agreement"]:
            cols[1].vega_lite_chart(rl["agreement"], charts.curves(rl["agreement"], "routing agreement (update's top-k "
                                                                   "= rollout's)", color="layer", y="agreement"),
                                    width="stretch")
            last = max(r["step"] for r in rl["agreement"])
            mean = next((r["agreement"] for r in rl["agreement"] if r["step"] == last and r["layer"] == "mean"), None)
            if mean is not None:
                st.caption(f"agreement at step {last}: {mean:.3f} (1 = the update routed every token as the rollout "
                           "did, e.g. with routing replay on)")


def _specialisation() -> None:
    reports = cache.specialisation(home())
    st.subheader("expert specialisation by domain")
    if not reports:
        empty("No evaluation has measured expert specialisation yet.", "moeflow run evaluate --recipe tiny")
        return
    latest = reports[0]
    st.caption(f"from `{latest['dataset']['uri']}`")
    report = latest["report"]
    st.json(report, expanded=False) if not isinstance(report, dict) else _specialisation_tables(report)


def _specialisation_tables(report: dict) -> None:
    tables = {k: v for k, v in report.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    scalars = {k: v for k, v in report.items() if isinstance(v, (int, float, str))}
    if scalars:
        st.dataframe([scalars], hide_index=True, width="stretch")
    for name, rows in tables.items():
        st.markdown(f"**{name}**")
        st.dataframe(rows, hide_index=True, width="stretch")
    if not tables and not scalars:
        st.json(report, expanded=False)
