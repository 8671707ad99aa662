"""What every page shares: the home key, the empty states, run pickers bound to query parameters."""

from __future__ import annotations

import streamlit as st

from moeflow.dashboard import cache

FILL_PIPELINE = "moeflow run pipeline --recipe tiny"
REFRESH_S = 5.0


def home() -> str:
    return str(cache.settings().home)


def header(title: str) -> None:
    s = cache.settings()
    st.title(title)
    st.caption(f"home `{s.home}` · store `{s.store_uri}` · catalog `{s.masked()['catalog_db_url']}`")


def empty(what: str, command: str) -> None:
    st.info(f"{what} Fill it with `{command}`.", icon=":material/info:")


def require_catalog():
    """The sources when a catalog exists, else an empty state naming the command (returns None)."""
    src = cache.sources()
    if src.catalog is None:
        empty("Nothing is recorded in this home yet.", FILL_PIPELINE)
        return None
    return src


def pick(label: str, options: list[str], param: str, format_func=str, key: str | None = None) -> str | None:
    """A selectbox whose choice lives in the URL's query parameter ``param`` (bookmarkable)."""
    if not options:
        return None
    wanted = st.query_params.get(param)
    index = options.index(wanted) if wanted in options else 0
    choice = st.selectbox(label, options, index=index, format_func=format_func, key=key or f"pick-{param}")
    if st.query_params.get(param) != choice:
        st.query_params[param] = choice
    return choice


def run_label(run: dict) -> str:
    started = (run.get("started_at") or "")[:19].replace("T", " ")
    return f"{run['stage']} · {started} · {run['status']} · {run['id'][:8]}"


def any_running(runs: list[dict]) -> bool:
    return any(r.get("status") == "running" for r in runs)


def live(body) -> None:
    """Run ``body`` as a fragment that re-runs every ``REFRESH_S`` while any run is running."""
    running = any_running(cache.runs(home()))
    if running:
        st.caption(f":material/autorenew: a run is running: refreshing every {REFRESH_S:.0f} s")
    st.fragment(run_every=REFRESH_S if running else None)(body)()


def page(path: str) -> st.Page:
    """The registered page at ``path`` for ``st.page_link`` (Streamlit keys pages by URL path)."""
    from . import PAGES

    for url_path, title, view in PAGES:
        if url_path == path:
            return st.Page(view.render, title=title, url_path=url_path, default=(url_path == "overview"))
    raise KeyError(f"no dashboard page {path!r}")
