"""Render time of every dashboard page on the tests' small home (tests/dashboard_home.py: one tiny pipeline).

Two figures per page, both against the 2-second bound of issue 14:

* ``script``: server-side script time — the page's script run in-process by Streamlit's AppTest (what the
  server runs on each rerun), cold (``st.cache_data`` cleared, so every read goes to the catalog, MLflow and
  the store; imports and the opened sources stay, as in a running server) and warm (median of ``--reps``
  reruns inside the cache TTL, as when clicking between pages);
* ``browser``, cold: a new server and a new Chromium (empty profile) per variant — an empty Streamlit page
  (the floor: Streamlit's own frontend boot), the dashboard under a plain ``streamlit run app.py``
  (imports in the first session) and under ``python -m moeflow.dashboard.server`` (what ``moeflow up``
  runs: imports before the port opens) — server start until its health check answers, first visit of
  ``/``, and reloads;
* ``browser``, per page: load-to-ready in Debian's headless Chromium against the server — from
  ``goto`` (a full page load: Streamlit's JS bundle, a new session) until the page's title is drawn and the
  script has stopped running (tests/test_dashboard_browser's ``load``), first visit and the median of
  ``--reps`` revisits; and from a click on the page's sidebar link (in-app navigation, how one moves
  between pages) until the same.

The machine's load average is printed beside the figures (other processes share its cores).

    python benchmarks/bench_dashboard.py [--reps 3] [--no-browser] [--cold-rounds 3] [--cold-only]
        [--baseline /tmp/old]   # git archive <commit> | tar -x -C /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

PAGES = ("overview", "run", "compare", "experts", "data_page", "lineage", "models", "serving")


def _page(name: str) -> None:
    import importlib

    importlib.import_module(f"moeflow.dashboard.views.{name}").render()


def script_times(reps: int) -> dict[str, dict[str, float]]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    out = {}
    t = time.perf_counter()
    AppTest.from_function(_page, args=("overview",), default_timeout=120).run()
    out["(first page of a process: imports)"] = {"cold_s": time.perf_counter() - t}
    for name in PAGES:
        app = AppTest.from_function(_page, args=(name,), default_timeout=120)
        if name == "serving":
            app.query_params["url"] = "http://127.0.0.1:9/metrics"  # nothing listens: the page's empty state
        app.run()  # AppTest's own first-run set-up is not the page's
        st.cache_data.clear()
        t = time.perf_counter()
        app.run()
        cold = time.perf_counter() - t
        assert not app.exception, (name, [e.value for e in app.exception])
        warm = []
        for _ in range(reps):
            t = time.perf_counter()
            app.run()
            warm.append(time.perf_counter() - t)
        out[name] = {"cold_s": cold, "warm_s": statistics.median(warm)}
    return out


EMPTY_PAGE = 'import streamlit as st\n\nst.title("overview")\n'  # Streamlit's floor: a title, nothing else


def cold_visits(home: Path, reps: int, logs: Path, rounds: int = 1,
                baseline: Path | None = None) -> dict[str, dict[str, float]]:
    """A new server and a new browser (empty profile: no cached bundle) per variant and round, the variants
    interleaved: seconds until the health check answered, the first visit of ``/``, the median of ``reps``
    reloads, the first load of ``/run`` after them (the first page that reads MLflow), and a second user's
    first visit of ``/`` (another empty profile, the server already warm: the
    difference to the first visit is what the server's first session costs); medians over ``rounds``.
    ``baseline``: an older checkout of the repository (``git archive <commit> | tar -x``) served with a
    plain ``streamlit run``, for a before/after in one run."""
    import test_dashboard_browser as B

    empty = logs / "empty_app.py"
    empty.write_text(EMPTY_PAGE)
    variants = {
        "empty Streamlit page (floor)": (("-m", "streamlit", "run", str(empty)), None),
        "this checkout: streamlit run app.py": (("-m", "streamlit", "run", str(REPO / "dashboard" / "app.py")), None),
        "this checkout: moeflow.dashboard.server": (B.SERVER, None),
    }
    if baseline is not None:
        link = logs / "baseline-path" / "moeflow"  # `import moeflow` -> the older checkout
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(baseline.resolve())
        variants = {f"{baseline.name}: streamlit run app.py": (
            ("-m", "streamlit", "run", str(baseline / "dashboard" / "app.py")), str(link.parent)), **variants}
    seen: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for _ in range(rounds):
        for name, (server_args, pythonpath) in variants.items():
            with B.open_dashboard(home, {}, logs / "cold.log", server_args, pythonpath) as dash:
                first = B.load(dash, "/")
                again = [B.load(dash, "/") for _ in range(reps)]
                # the first visit of a page that reads MLflow (the Overview does not), e.g. a bookmarked run
                mlflow_page = B.load(dash, "/run") if "empty" not in name else float("nan")
                other = dash["browser"].new_context(viewport={"width": 1400, "height": 1000})
                second = B.load({**dash, "page": other.new_page()}, "/")
                other.close()
            for key, value in (("server_start_s", dash["started_s"]), ("first_visit_s", first),
                               ("reload_s", statistics.median(again)), ("first_run_page_s", mlflow_page),
                               ("second_user_first_visit_s", second)):
                seen[name].setdefault(key, []).append(value)
    return {name: {key: statistics.median(values) for key, values in figs.items()} for name, figs in seen.items()}


def browser_times(home: Path, reps: int, rounds: int, cold_only: bool,
                  baseline: Path | None = None) -> dict[str, dict[str, float]]:
    import test_dashboard_browser as B

    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-dash-log-") as logs:
        out.update(cold_visits(home, reps, Path(logs), rounds, baseline))
        if cold_only:
            return out
        with B.open_dashboard(home, {}, Path(logs) / "streamlit.log") as dash:
            for name in B.PAGES:
                path = "/" if name == "overview" else f"/{name}"
                first = B.load(dash, path)
                again = [B.load(dash, path) for _ in range(reps)]
                out[name] = {"first_s": first, "revisit_s": statistics.median(again)}
            for name in B.PAGES:  # in-app navigation: a sidebar click (no page reload: the frontend stays)
                out[name]["sidebar_click_s"] = statistics.median(navigate(dash, name) for _ in range(reps))
    return out


def navigate(dash, name: str) -> float:
    """Click the page's sidebar link from another page; seconds until its title shows and the script stopped."""
    page = dash["page"]
    other = "serving" if name != "serving" else "lineage"
    _click(page, other)
    _ready(page, other)
    start = time.monotonic()
    _click(page, name)
    _ready(page, name)
    return time.monotonic() - start - 0.45  # the three idle polls that confirm the script stopped


def _click(page, name: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text=name.capitalize()).first.click()


def _ready(page, name: str) -> None:
    page.wait_for_function("t => document.querySelector('[data-testid=\"stMain\"] h1')?.innerText.trim()"
                           ".toLowerCase() === t", arg=name, timeout=60_000)
    idle = 0
    while idle < 3:
        page.wait_for_timeout(150)
        running = page.locator('[data-testid="stStatusWidget"]').count() or page.evaluate(
            "() => document.querySelector('[data-testid=\"stApp\"]')?.dataset.teststate === 'running'")
        idle = 0 if running else idle + 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--cold-rounds", type=int, default=1, help="rounds of the cold-start comparison (median)")
    parser.add_argument("--cold-only", action="store_true", help="only the cold-start comparison (no script times)")
    parser.add_argument("--baseline", type=Path, help="an older checkout (git archive <commit> | tar -x) to compare")
    args = parser.parse_args()
    from dashboard_home import build_home

    with tempfile.TemporaryDirectory(prefix="bench-dash-") as tmp:
        home = Path(tmp) / "home"
        os.environ["MOEFLOW_HOME"] = str(home)
        build_home(home)
        result = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
        if not args.cold_only:
            result["script"] = script_times(args.reps)
        if not args.no_browser:
            import pytest

            try:
                result["browser"] = browser_times(home, args.reps, args.cold_rounds, args.cold_only, args.baseline)
            except pytest.skip.Exception as err:  # no Chromium here: report the script times alone
                result["browser_unavailable"] = str(err)
        result["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    for part in ("script", "browser"):
        for name, figs in result.get(part, {}).items():
            print(f"{part:8s} {name:36s} " + "  ".join(f"{k} {v:6.2f}" for k, v in figs.items()))


if __name__ == "__main__":
    main()
