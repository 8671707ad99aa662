"""moeflow dashboard (first page): the runs and artefacts recorded in the lineage catalog.

Read-only: it opens the catalog from the same settings as the CLI (``MOEFLOW_HOME``) and
never writes. Run with ``moeflow up`` or ``streamlit run dashboard/app.py``.
"""

from __future__ import annotations

import json

import streamlit as st

from moeflow.platform.catalog import Catalog
from moeflow.platform.settings import get_settings


def main() -> None:
    st.set_page_config(page_title="moeflow", layout="wide")
    settings = get_settings()
    st.title("moeflow")
    st.caption(f"home `{settings.home}` · store `{settings.store_uri}` · catalog `{settings.masked()['catalog_db_url']}`")
    catalog = Catalog.from_settings(settings)

    stage = st.selectbox("stage", ["all", "pipeline", "smoke", "curate", "tokenize", "pretrain", "evaluate"])
    runs = catalog.list_runs(limit=200, stage=None if stage == "all" else stage)
    st.subheader(f"Runs ({len(runs)})")
    if not runs:
        st.info("No runs yet: try `moeflow run smoke` or `moeflow run pipeline --recipe tiny`.")
        return
    columns = ["run_id", "stage", "status", "started_at", "ended_at", "mlflow_run_id", "prefect_flow_run_id", "error"]
    st.dataframe([{c: r.get(c) for c in columns} for r in runs], use_container_width=True, hide_index=True)

    chosen = st.selectbox("run details", [r["run_id"] for r in runs])
    run = catalog.get_run(chosen)
    left, right = st.columns(2)
    with left:
        st.markdown("**config**")
        st.code(json.dumps(run.get("config"), indent=2, default=str), language="json")
        if run.get("metrics"):
            st.markdown("**metrics**")
            st.json(run["metrics"])
    with right:
        st.markdown("**lineage**")
        st.write({"inputs": run.get("inputs", []), "outputs": run.get("outputs", [])})


main()
