"""Data: the curation funnel per step (docs, bytes, % kept), excluded samples per rule, the quarantine
with reasons, and tokenization stats."""

from __future__ import annotations

import streamlit as st

from moeflow.dashboard import cache, charts, data

from .common import empty, header, home, pick, require_catalog

_FILL = "moeflow run curate --recipe tiny"


def render() -> None:
    header("Data")
    if require_catalog() is None:
        return
    datasets = cache.curated(home())
    if not datasets:
        empty("No curated dataset yet.", _FILL)
    else:
        by_uri = {d["uri"]: d for d in datasets}
        uri = pick("curated dataset", list(by_uri), "dataset",
                   format_func=lambda u: f"{by_uri[u]['name']} v{by_uri[u]['version']} · {by_uri[u]['created_at'][:19]}")
        _curation(cache.curation_report(home(), uri))
    _tokens()


def _curation(report: dict) -> None:
    funnel = data.funnel_table(report["funnel"])
    st.subheader("funnel")
    with st.container(key="funnel"):
        if funnel:
            st.dataframe(funnel, hide_index=True, width="stretch", column_config={
                "% docs kept": st.column_config.NumberColumn(format="%.1f"),
                "% bytes kept": st.column_config.NumberColumn(format="%.1f")})
            docs_key = next((k for k in ("docs", "docs_out") if k in funnel[0]), None)
            label_key = next((k for k in ("stage", "step") if k in funnel[0]), None)
            if docs_key and label_key:
                st.vega_lite_chart(funnel, charts.bars(funnel, docs_key, label_key, "documents after each step"),
                                   width="stretch")
        else:
            st.info("This artefact has no funnel in its stats.json.")
    stats = report["stats"]
    steps = stats.get("steps", [])
    st.subheader("excluded per rule")
    rule_rows = [{"step": s["step"], "rule": rule, "docs": n, "bytes": s.get("excluded_bytes", {}).get(rule)}
                 for s in steps for rule, n in s.get("excluded", {}).items()]
    if rule_rows:
        st.dataframe(rule_rows, hide_index=True, width="stretch", key="rules")
    else:
        st.success("No document was excluded by any rule.")
    samples = report["excluded"]
    with_samples = [k for k, v in samples.items() if v]
    if with_samples:
        step = st.selectbox("excluded samples of step", with_samples, key="sample-step")
        st.dataframe(samples[step], hide_index=True, width="stretch", key="samples")
    st.subheader("quarantine")
    quarantined = stats.get("quarantined", {})
    if quarantined.get("by_reason"):
        st.dataframe([{"reason": r, "records": n} for r, n in quarantined["by_reason"].items()], hide_index=True)
    if report["quarantine"]:
        st.dataframe(report["quarantine"], hide_index=True, width="stretch", key="quarantine")
    else:
        st.success("Nothing was quarantined: every input record was readable.")
    out = stats.get("output", {})
    if out.get("by_domain"):
        st.subheader("output by domain")
        st.dataframe([{"domain": d, "docs": n} for d, n in out["by_domain"].items()], hide_index=True)


def _tokens() -> None:
    st.subheader("tokenization")
    rows = cache.tokens(home())
    if not rows:
        empty("No token shards yet.", "moeflow run tokenize --recipe tiny")
        return
    table = [{"name": r["name"], "version": r["version"], "created": r["created_at"][:19], **_flat(r["stats"])}
             for r in rows]
    st.dataframe(table, hide_index=True, width="stretch", key="tokens")


def _flat(stats: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in stats.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out
