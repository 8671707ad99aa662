"""moeflow dashboard: a Streamlit multipage app over the catalog, MLflow and the object store.

Every view is its own page with its own URL (``/experts?run=<id>`` is a bookmark), and query
parameters hold the selection so a link shows what its sender saw. Page logic lives in
``dashboard/data.py``; the views in ``dashboard/views/`` only render. Strictly read-only (see
``sources.py``). Run with ``moeflow up`` or ``streamlit run dashboard/app.py``; the config beside
this file (``.streamlit/config.toml``) hides the developer toolbar.
"""

from __future__ import annotations

import streamlit as st

from moeflow.dashboard.views import PAGES
from moeflow.platform.stages import STAGES


def main() -> None:
    st.set_page_config(page_title="moeflow", layout="wide")
    pages = [st.Page(view.render, title=title, url_path=path, default=(path == "overview"))
             for path, title, view in PAGES]
    current = st.navigation(pages, position="sidebar", expanded=True)
    # the pipeline's order comes from the stage registry (the one list of stages)
    st.sidebar.caption("pipeline: " + " → ".join(name for name in STAGES if name not in ("pipeline", "smoke")))
    current.run()


main()
