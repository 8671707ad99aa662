"""Overview: pipeline runs newest first, each stage's state, duration, headline metric and links."""

from __future__ import annotations

import streamlit as st

from moeflow.dashboard import cache, data

from .common import header, home, live, page, require_catalog

def _columns() -> dict:
    return {
        "run": st.column_config.LinkColumn("run", display_text="open"),
        "artefacts": st.column_config.LinkColumn("artefacts", display_text="lineage"),
        "mlflow": st.column_config.LinkColumn("MLflow", display_text="MLflow"),
        "prefect": st.column_config.LinkColumn("Prefect", display_text="Prefect"),
        "duration_s": st.column_config.NumberColumn("duration (s)", format="%.1f"),
    }


def render() -> None:
    header("Overview")
    if require_catalog() is None:
        return
    live(_body)


def _body() -> None:
    entries = cache.overview(home(), 30)
    if not entries:
        st.info("The catalog holds no runs yet. Fill it with `moeflow run pipeline --recipe tiny`.")
        return
    links = data.Links(cache.settings())
    st.caption(f"{len(entries)} top-level runs, newest first")
    for i, entry in enumerate(entries):
        top = entry["run"]
        dur = data.duration_s(top)
        title = (f"**{top['stage']}** · {top['config'].get('options', {}).get('run_name', '') if isinstance(top['config'].get('options'), dict) else ''}"
                 f" · {(top['started_at'] or '')[:19].replace('T', ' ')} · `{top['status']}`"
                 + (f" · {dur:.0f} s" if dur is not None else ""))
        with st.container(border=True, key=f"pipeline-{i}"):
            st.markdown(title)
            cols = st.columns(4)
            cols[0].page_link(page("lineage"), label="lineage",
                              query_params={"pipeline": top["id"]}, icon=":material/account_tree:")
            if top.get("mlflow_run_id") and links.mlflow_run(top["mlflow_run_id"]):
                cols[1].link_button("MLflow run", links.mlflow_run(top["mlflow_run_id"]))
            if top.get("prefect_flow_run_id"):
                cols[2].link_button("Prefect flow run", links.prefect_flow_run(top["prefect_flow_run_id"]))
            if top.get("error"):
                st.error(top["error"][:500])
            rows = data.stage_rows(entry["stages"], links)
            if rows:
                st.dataframe(rows, hide_index=True, width="stretch", column_config=_columns(), key=f"stages-{i}")
            for row in rows:
                if row["error"]:
                    st.error(f"{row['stage']}: {row['error']}")

