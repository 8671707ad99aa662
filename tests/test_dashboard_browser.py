"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

The dashboard's server as ``moeflow up`` starts it (``python -m moeflow.dashboard.server``: imports,
then ``streamlit run dashboard/app.py``) on a free port over a small home
(tests/dashboard_home.py; or the home named by ``MOEFLOW_DASHBOARD_TEST_HOME``, e.g. one a tiny
pipeline filled). Every page must load without an exception in the page or in the server log and
show its key elements (one heatmap canvas per layer, the lineage graph's run nodes); links must
resolve; a screenshot of each page goes to ``test-artifacts/dashboard/`` (``MOEFLOW_TEST_ARTIFACTS``
overrides the folder). No browser: a failure in CI, a skip elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, service_unavailable
from tests.dashboard_home import NUM_LAYERS, build_home

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MOEFLOW_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("MOEFLOW_TEST_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"
PAGES = ("overview", "run", "compare", "experts", "data", "lineage", "models", "serving")
LOAD_TIMEOUT_MS = 60_000
VEGA_DRAWN = "svg.marks, canvas.marks, canvas"  # a drawn Vega view (SVG or canvas renderer)


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_unavailable("playwright is not installed (pip install -c constraints.txt -e '.[test]')")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        service_unavailable(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    _browser_or_skip()
    given = os.environ.get("MOEFLOW_DASHBOARD_TEST_HOME")
    home = Path(given) if given else tmp_path_factory.mktemp("dash-browser") / "home"
    ids = {} if given else build_home(home)
    with open_dashboard(home, ids, tmp_path_factory.mktemp("dash-log") / "streamlit.log") as dash:
        yield dash


SERVER = ("-m", "moeflow.dashboard.server")  # what `moeflow up` runs: imports first, then `streamlit run`


@contextlib.contextmanager
def open_dashboard(home: Path, ids: dict, log_path: Path, server_args: tuple[str, ...] = SERVER,
                   pythonpath: str | None = None):
    """The dashboard's server over ``home`` (``server_args``: the Python arguments before Streamlit's
    flags; benchmarks/bench_dashboard.py also starts a plain ``-m streamlit run <script>``) and a
    headless Chromium page on it. Yields the page and ``started_s``, the seconds until the health check
    answered. ``pythonpath`` replaces the server's import path (the benchmark's older checkout)."""
    sync_playwright = _browser_or_skip()
    port = free_port()
    env = {**os.environ, "MOEFLOW_HOME": str(home), "PYTHONPATH": pythonpath or os.pathsep.join(
        [str(REPO.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = time.monotonic()
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, *server_args, "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true"],
            cwd=str(home.parent), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    started = time.monotonic() - started
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield {"url": url, "page": page, "errors": errors, "log": log_path, "ids": ids, "home": home,
                   "browser": browser, "started_s": started}
            browser.close()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def load(dash, path: str) -> float:
    """Open ``path``, wait until the script has finished running; returns the seconds it took."""
    page = dash["page"]
    start = time.monotonic()
    page.goto(dash["url"] + path)
    page.wait_for_selector('[data-testid="stMain"] h1', timeout=LOAD_TIMEOUT_MS)
    idle = 0
    while idle < 3:  # the status widget ("Running... Stop") absent for three polls in a row
        page.wait_for_timeout(150)
        running = page.locator('[data-testid="stStatusWidget"]').count() or page.evaluate(
            "() => document.querySelector('[data-testid=\"stApp\"]')?.dataset.teststate === 'running'")
        idle = 0 if running else idle + 1
        if time.monotonic() - start > LOAD_TIMEOUT_MS / 1000:
            pytest.fail(f"{path} still running after {LOAD_TIMEOUT_MS / 1000:.0f} s")
    return time.monotonic() - start - 0.45


def no_exception(dash, name: str) -> None:
    page = dash["page"]
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    shown = page.locator('[data-testid="stException"]')
    assert shown.count() == 0, shown.first.inner_text()
    assert not dash["errors"], dash["errors"]
    server_log = dash["log"].read_text()
    assert "Traceback" not in server_log and "Error" not in server_log, server_log[-3000:]


@pytest.mark.parametrize("name", PAGES)
def test_every_page_loads_without_exception(dashboard, name):
    seconds = load(dashboard, "/" if name == "overview" else f"/{name}")
    no_exception(dashboard, name)
    page = dashboard["page"]
    assert page.locator('[data-testid="stMain"] h1').first.inner_text().strip().lower() == name
    # the developer toolbar is hidden (client.toolbarMode = "viewer" in dashboard/.streamlit/config.toml)
    assert page.locator('[data-testid="stAppDeployButton"]').count() == 0
    page.locator('[data-testid="stMainMenu"]').click()
    menu = page.locator('[data-testid="stMainMenuPopover"]').inner_text()
    page.keyboard.press("Escape")
    assert "Clear cache" not in menu and "Rerun" not in menu, menu
    assert "Page not found" not in page.locator("body").inner_text()
    print(f"{name}: {seconds:.2f} s in the browser")


def test_experts_page_draws_one_heatmap_per_layer(dashboard):
    load(dashboard, "/experts")
    page = dashboard["page"]
    cells = page.locator('[class*="st-key-heatmap-a-"]')
    layers = NUM_LAYERS if dashboard["ids"] else cells.count()
    assert cells.count() == layers >= 1
    for i in range(layers):  # Vega draws a chart once it scrolls into view
        cells.nth(i).scroll_into_view_if_needed()
        cells.nth(i).locator(VEGA_DRAWN).first.wait_for(timeout=LOAD_TIMEOUT_MS)
    assert page.locator(f'[class*="st-key-heatmap-a-"] :is({VEGA_DRAWN})').count() == layers
    cells.first.scroll_into_view_if_needed()
    no_exception(dashboard, "experts")
    page.screenshot(path=str(ARTIFACTS / "experts-heatmaps.png"), full_page=False)


def test_lineage_graph_shows_the_runs_and_nodes_link_through(dashboard):
    load(dashboard, "/lineage")
    page = dashboard["page"]
    page.wait_for_selector(".st-key-lineage-graph svg g.node", timeout=LOAD_TIMEOUT_MS)
    titles = page.locator(".st-key-lineage-graph svg g.node text").evaluate_all("els => els.map(e => e.textContent)")
    ids = dashboard["ids"]
    stages = ("curate", "tokenize", "pretrain", "evaluate", "deploy") if ids else ("curate", "tokenize", "pretrain")
    for stage in stages:
        assert stage in titles, titles
    for stage in stages if ids else ():
        assert ids[stage][:8] in titles
    # click-through: a run node's link opens its details on the lineage page
    link = page.locator(".st-key-lineage-graph svg g.node a").filter(has_text="pretrain").first
    href = link.get_attribute("href") or link.get_attribute("xlink:href")
    assert href and re.fullmatch(r"/lineage\?pipeline=[0-9a-f]{32}&node=[0-9a-f]{32}", href), href
    load(dashboard, href)
    details = page.locator(".st-key-node-details")
    details.get_by_text("open the run").wait_for(timeout=LOAD_TIMEOUT_MS)
    assert details.locator('[data-testid="stPageLink"] a').get_attribute("href").lstrip("/").startswith("run?id=")
    no_exception(dashboard, "lineage-node")


def test_overview_links_resolve(dashboard):
    load(dashboard, "/")
    page = dashboard["page"]
    # page links (lineage of the pipeline) go to a page that renders
    href = page.locator('[data-testid="stPageLink"] a').first.get_attribute("href")
    assert href and re.search(r"(^|/)lineage\?pipeline=[0-9a-f]{32}$", href), href
    page.locator('[data-testid="stPageLink"] a').first.click()
    page.wait_for_url(re.compile(r".*/lineage\?pipeline="), timeout=LOAD_TIMEOUT_MS)
    page.wait_for_selector(".st-key-lineage-graph svg g.node", timeout=LOAD_TIMEOUT_MS)
    # the run page link of a stage row opens that run (query parameter honoured)
    run_id = dashboard["ids"].get("pretrain")
    if run_id:
        load(dashboard, f"/run?id={run_id}")
        page.locator('[data-testid="stMetricValue"]').first.wait_for(timeout=LOAD_TIMEOUT_MS)
        assert page.locator('[data-testid="stMetricValue"]').first.inner_text().strip() == "pretrain"
        assert page.url.endswith(f"id={run_id}")
        page.locator(".st-key-curves").locator(VEGA_DRAWN).first.wait_for(timeout=LOAD_TIMEOUT_MS)
    no_exception(dashboard, "run-from-link")
    # a stage row's "artefacts" link opens its node on the Lineage page: inputs and outputs
    if run_id:
        load(dashboard, f"/lineage?pipeline={dashboard['ids']['pipeline']}&node={run_id}")
        details = page.locator(".st-key-node-details")
        details.get_by_text("open the run").wait_for(timeout=LOAD_TIMEOUT_MS)
        assert "expert_load" in details.inner_text()  # the run's outputs are listed
        no_exception(dashboard, "artefacts-from-link")
