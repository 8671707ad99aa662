"""Serving: live gateway metrics from its Prometheus endpoint, per model version and replica."""

from __future__ import annotations

import time

import streamlit as st

from moeflow.dashboard import serving

from .common import REFRESH_S, empty, header

DEFAULT_URL = "http://127.0.0.1:8000/metrics"


def render() -> None:
    header("Serving")
    url = st.text_input("gateway metrics URL", st.query_params.get("url", DEFAULT_URL), key="serving-url")
    if url != DEFAULT_URL or "url" in st.query_params:
        st.query_params["url"] = url
    st.fragment(run_every=REFRESH_S)(lambda: _live(url))()


def _live(url: str) -> None:
    try:
        samples = serving.parse(serving.scrape(url))
    except (OSError, ValueError) as exc:
        empty(f"No gateway answers at `{url}` ({type(exc).__name__}).", "moeflow serve --model <name>@champion")
        return
    previous = st.session_state.get("serving-prev")
    now = time.monotonic()
    rows = serving.summary(samples, previous[1] if previous else None, (now - previous[0]) if previous else None)
    st.session_state["serving-prev"] = (now, samples)
    if not rows:
        st.info("The gateway has served no request yet.")
        return
    with st.container(key="serving-versions"):
        st.dataframe(rows, hide_index=True, width="stretch")
    if previous is None:
        st.caption(f"requests/s and tokens/s appear from the next scrape (every {REFRESH_S:g} s)")
    errors = serving.error_rows(samples)
    with st.container(key="serving-errors"):
        if errors:
            n = int(sum(e["requests"] for e in errors))
            st.warning(f"{n} error response{'s' if n != 1 else ''} from the gateway (all versions: a request "
                       "can be refused before a version is chosen)")
            st.dataframe(errors, hide_index=True, width="stretch")
        else:
            st.success("No error responses.")
    per_version = serving.version_error_rows(samples)
    with st.container(key="serving-version-errors"):
        if per_version:
            st.markdown("**errors per version** (after the version was chosen; a streamed answer's error too)")
            st.dataframe(per_version, hide_index=True, width="stretch")
        else:
            st.caption("No version has failed a request.")
    st.subheader("per replica")
    st.dataframe(serving.replica_rows(samples), hide_index=True, width="stretch")
