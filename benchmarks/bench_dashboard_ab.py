"""The dashboard under a plain ``streamlit run`` and under ``python -m moeflow.dashboard.server`` (the warm-up
that ``moeflow up`` runs), both up at once on one home, one headless Chromium page visiting them in turn: the
first visit of ``/``, ``/run`` and ``/experts`` on each (the plain server visited first at each step), then
six alternating reloads of ``/experts``. Complements bench_dashboard.py's cold-start rows, whose variants run
one after another while the machine's load moves.

    python benchmarks/bench_dashboard_ab.py HOME   # a home filled by tests/dashboard_home.py's build_home
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import test_dashboard_browser as B  # noqa: E402
from conftest import free_port  # noqa: E402

def main() -> None:
    home = Path(sys.argv[1])
    port = free_port()
    env = {**os.environ, "MOEFLOW_HOME": str(home)}
    plain_proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "dashboard" / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with tempfile.TemporaryDirectory() as logs:
            with B.open_dashboard(home, {}, Path(logs) / "b.log") as server:
                while True:  # the plain server answers its health check
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                        break
                    except OSError:
                        time.sleep(0.5)
                plain = {**server, "url": f"http://127.0.0.1:{port}"}
                for path in ["/", "/run", "/experts"]:
                    for d, n in ((plain, "plain"), (server, "server")):
                        print(n, "first", path, round(B.load(d, path), 2), flush=True)
                res = {"plain": [], "server": []}
                pair = ((plain, "plain"), (server, "server"))
                for i in range(6):  # alternate which server goes first
                    for d, n in (pair if i % 2 == 0 else pair[::-1]):
                        res[n].append(B.load(d, "/experts"))
                for n, v in res.items():
                    print(n, "experts reload median", round(statistics.median(v), 2), [round(x, 2) for x in v])
    finally:
        os.killpg(plain_proc.pid, 15)
        plain_proc.wait(30)


if __name__ == "__main__":
    main()
