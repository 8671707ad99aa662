"""moeflow dashboard (first pages): the runs recorded in the lineage catalog, and the expert
load of pretraining runs as a step × expert heatmap per layer.

Read-only: it opens the catalog and the object store from the same settings as the CLI
(``MOEFLOW_HOME``) and never writes. Run with ``moeflow up`` or ``streamlit run dashboard/app.py``.
"""

from __future__ import annotations

import json

import numpy as np
import streamlit as st

from moeflow.platform.artifacts import is_expert_load_uri
from moeflow.platform.catalog import Catalog
from moeflow.platform.settings import get_settings
from moeflow.platform.stages import STAGES
from moeflow.platform.store import store_for_uri
from moeflow.platform.train.expert_load import NPZ_NAME, load_expert_load


def runs_page(catalog: Catalog) -> None:
    stage = st.selectbox("stage", ["all", *STAGES])  # the stage registry
    runs = catalog.list_runs(limit=200, stage=None if stage == "all" else stage)
    st.subheader(f"Runs ({len(runs)})")
    if not runs:
        st.info("No runs yet: try `moeflow run smoke` or `moeflow run pipeline --recipe tiny`.")
        return
    columns = ["id", "stage", "status", "started_at", "ended_at", "mlflow_run_id", "prefect_flow_run_id", "error"]
    st.dataframe([{c: r.get(c) for c in columns} for r in runs], width="stretch", hide_index=True)

    chosen = st.selectbox("run details", [r["id"] for r in runs])
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


def expert_load_uris(catalog: Catalog) -> dict[str, str]:
    """{label: expert-load artefact URI} of the pretraining runs in the catalog."""
    found = {}
    for run in catalog.list_runs(limit=200, stage="pretrain"):
        for uri in run.get("outputs", []):
            if is_expert_load_uri(uri):
                found[f"{run['started_at']} · {run['id'][:8]}"] = uri
    return found


def expert_load_page(catalog: Catalog) -> None:
    choices = expert_load_uris(catalog)
    st.subheader("Expert load")
    if not choices:
        st.info("No pretraining run has recorded expert load yet.")
        return
    label = st.selectbox("pretraining run", list(choices))
    store, key = store_for_uri(choices[label])
    arrays = load_expert_load(store.read_artifact(key).get_bytes(NPZ_NAME))
    steps, counts = arrays["steps"], arrays["counts"]  # (N,), (N, L, E)
    if counts.size == 0:
        st.info("The run has no expert-load windows.")
        return
    layer = st.slider("MoE layer (router row)", 0, counts.shape[1] - 1, 0)
    share_NE = counts[:, layer, :] / np.maximum(counts[:, layer, :].sum(axis=1, keepdims=True), 1e-12)
    mean = share_NE.mean(axis=1, keepdims=True)
    maxvio_N = (share_NE.max(axis=1) - mean[:, 0]) / mean[:, 0]
    st.caption(f"{counts.shape[0]} windows up to step {int(steps[-1])}; {counts.shape[2]} experts; "
               f"MaxVio last window {maxvio_N[-1]:.3f}")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    image = ax.imshow(share_NE.T, aspect="auto", origin="lower", cmap="viridis",
                      extent=(float(steps[0]), float(steps[-1]), -0.5, counts.shape[2] - 0.5))
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    st.pyplot(fig)
    st.line_chart({"MaxVio": maxvio_N.tolist()})


def main() -> None:
    st.set_page_config(page_title="moeflow", layout="wide")
    settings = get_settings()
    st.title("moeflow")
    st.caption(f"home `{settings.home}` · store `{settings.store_uri}` · catalog `{settings.masked()['catalog_db_url']}`")
    catalog = Catalog.from_settings(settings)
    runs_tab, load_tab = st.tabs(["Runs", "Expert load"])
    with runs_tab:
        runs_page(catalog)
    with load_tab:
        expert_load_page(catalog)


main()
