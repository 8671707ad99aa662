"""The dashboard's server process: import what the pages use, then serve ``app.py`` with Streamlit.

Streamlit imports a page's modules in the first session that runs it, so the first visitor of a
plain ``streamlit run`` waits for MLflow, SQLAlchemy, pandas and pyarrow (≈ 5 s on this
machine; benchmarks/RESULTS.md, "Dashboard render time"). ``moeflow up`` and the browser tests start
the dashboard through this module instead:

    python -m moeflow.dashboard.server [streamlit flags, e.g. --server.port 8501]

It imports those modules and opens the home's sources once (read-only, ``sources.py``: a fresh home
stays untouched) *before* Streamlit binds its port, so the health check that ``moeflow up`` waits for
answers only when a first visit no longer pays for imports. The page modules themselves
(``dashboard/views``, ``cache.py``) are not imported here: their ``st.cache_data`` functions belong
to the runtime that Streamlit creates afterwards.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def warm() -> float:
    """Import the pages' heavy dependencies and open the sources once; returns the seconds it took."""
    start = time.perf_counter()
    import pandas  # noqa: F401 - Streamlit turns every table into a DataFrame
    import pyarrow  # noqa: F401 - ... and sends it as Arrow
    import streamlit.elements.arrow  # noqa: F401
    from prometheus_client.parser import text_string_to_metric_families  # noqa: F401 - the Serving page

    import moeflow.platform.catalog  # noqa: F401 - SQLAlchemy; also when the home has no catalog yet
    import moeflow.platform.store  # noqa: F401
    from moeflow.platform.settings import get_settings
    from moeflow.platform.tracking.mlflow_env import quiet_mlflow_env

    from .sources import open_sources

    quiet_mlflow_env()  # before MLflow's first import (its telemetry)
    import mlflow.tracking  # noqa: F401 - the client, also when the home has no MLflow database yet

    try:
        sources = open_sources(get_settings())
        sources.mlflow  # noqa: B018 - opening the client imports MLflow's SQL stores and their drivers
    except Exception as err:  # noqa: BLE001 - a broken source is the pages' to show; the server must start
        print(f"moeflow dashboard: could not open the home's sources ({type(err).__name__}: {err})", flush=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    seconds = warm()
    print(f"moeflow dashboard: pages' imports done in {seconds:.1f} s; starting Streamlit", flush=True)
    from streamlit.web import cli

    cli.main(["run", str(APP), *(sys.argv[1:] if argv is None else argv)], prog_name="streamlit")


if __name__ == "__main__":
    main()
