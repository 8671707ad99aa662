"""Models: registered models and versions with aliases, evaluation results per task, promotion
decisions, the model card (the version's description); compare two versions."""

from __future__ import annotations

import streamlit as st

from moeflow.dashboard import cache, data

from .common import FILL_PIPELINE, empty, header, home, pick, require_catalog


def render() -> None:
    header("Models")
    src = require_catalog()
    if src is None:
        return
    models = cache.models(home()) if src.mlflow is not None else []
    if not models:
        empty("No model is registered in MLflow yet.", FILL_PIPELINE)
    else:
        _registry(models)
    _decisions()


def _registry(models: list[dict]) -> None:
    by_name = {m["name"]: m for m in models}
    name = pick("registered model", list(by_name), "model")
    model = by_name[name]
    with st.container(key="versions"):
        st.dataframe([{"version": v["version"], "aliases": ", ".join(v["aliases"]), "created": v["created"],
                       "decision": v["tags"].get("deploy.decision", ""), "run": v["run_id"]}
                      for v in model["versions"]], hide_index=True, width="stretch", key="versions-table")
    versions = {str(v["version"]): v for v in model["versions"]}
    chosen = pick("version", list(versions), "version")
    v = versions[chosen]
    cols = st.columns(2)
    with cols[0]:
        st.subheader(f"{name} v{chosen}" + (f" ({', '.join('@' + a for a in v['aliases'])})" if v["aliases"] else ""))
        evals = data.eval_tags(v["tags"])
        with st.container(key="eval-results"):
            if evals:
                st.dataframe([{"task metric": k.removeprefix("eval."), "value": val} for k, val in sorted(evals.items())],
                             hide_index=True, width="stretch")
            else:
                empty("This version has no evaluation results yet.", "moeflow run evaluate --recipe tiny")
        if v["tags"].get("deploy.decision"):
            st.info(f"deploy: **{v['tags']['deploy.decision']}**: {v['tags'].get('deploy.reasons', '')}")
    with cols[1]:
        st.subheader("model card")
        st.markdown(v["description"] or model["description"] or "_no model card_")
        with st.expander("all tags"):
            st.json(v["tags"])
    if len(versions) > 1:
        st.subheader("compare two versions")
        others = [k for k in versions if k != chosen]
        other = pick("with version", others, "vs", key="compare-version")
        st.dataframe(data.compare_versions(versions[other], v), hide_index=True, width="stretch",
                     column_config={"a": f"v{other}", "b": f"v{chosen}"}, key="compare-table")


def _decisions() -> None:
    st.subheader("promotion decisions")
    rows = cache.decisions(home())
    if not rows:
        empty("No promotion decision yet.", "moeflow run deploy --recipe tiny")
        return
    st.dataframe([{"at": r["created_at"][:19], "model": r.get("model_name"), "version": r.get("version"),
                   "alias": r.get("alias"), "promoted": r.get("promoted"), "previous": r.get("previous"),
                   "reasons": "; ".join(r.get("reasons") or [])} for r in rows],
                 hide_index=True, width="stretch", key="decisions")
    with st.expander("checks of the newest decision"):
        st.dataframe(rows[0].get("checks") or [], hide_index=True, width="stretch")
