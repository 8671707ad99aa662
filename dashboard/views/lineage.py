"""Lineage: the catalog's graph (datasets -> runs -> model versions -> deployments); click a node for its details."""

from __future__ import annotations

import streamlit as st

from moeflow.dashboard import cache, data

from .common import header, home, page, require_catalog, run_label


def render() -> None:
    header("Lineage")
    if require_catalog() is None:
        return
    pipelines = cache.runs(home(), stage="pipeline")
    options = ["all", *[p["id"] for p in pipelines]]
    labels = {p["id"]: run_label(p) for p in pipelines} | {"all": "the whole catalog"}
    wanted = st.query_params.get("pipeline")
    default = wanted if wanted in options else (options[1] if len(options) > 1 else "all")
    chosen = st.selectbox("pipeline run", options, index=options.index(default), format_func=labels.get,
                          key="lineage-pipeline")
    st.query_params["pipeline"] = chosen
    graph = cache.lineage(home(), None if chosen == "all" else chosen)
    if not graph["nodes"]:
        st.info("No lineage recorded for this selection yet. Fill it with `moeflow run pipeline --recipe tiny`.")
        return
    selected = st.query_params.get("node")
    st.caption(f"{len(graph['nodes'])} nodes, {len(graph['edges'])} edges; click a node for its details")
    with st.container(key="lineage-graph"):
        st.graphviz_chart(data.lineage_dot(graph, selected, chosen), width="stretch")
    nodes = {n["id"]: n for n in graph["nodes"]}
    if selected and selected in nodes:
        _details(nodes[selected], graph)


def _details(node: dict, graph: dict) -> None:
    st.subheader(node["label"].replace("\n", " · "))
    with st.container(key="node-details"):
        if node["type"] == "run":
            st.page_link(page("run"), label="open the run", query_params={"id": node["id"]}, icon=":material/timeline:")
        st.code(node["id"])
        ups = [e["source"] for e in graph["edges"] if e["target"] == node["id"]]
        downs = [e["target"] for e in graph["edges"] if e["source"] == node["id"]]
        st.write({"upstream": ups, "downstream": downs})
        if node.get("entry"):
            st.json(node["entry"], expanded=False)
