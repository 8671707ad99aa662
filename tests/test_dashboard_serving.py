"""The Serving page against a real gateway: ``Gateway`` + two ``ModelServer`` versions of a tiny model under
uvicorn on loopback, an A/B split over them, a few bounded requests through the official ``openai`` client.

The fast test reads ``tests/dashboard_gateway_metrics.prom``, a ``/metrics`` scrape captured from such a
gateway by ``capture_fixture`` below (regenerate: ``python -m tests.test_dashboard_serving``), so the
page's parser is held to the gateway's real names and labels without starting one. The slow test starts
the gateway and opens the page on its live ``/metrics`` URL, twice, so rates come from two real scrapes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).with_name("dashboard_gateway_metrics.prom")
KEY = "sk-dash-test"
VERSIONS = (("1", 0), ("2", 1))


def _page():
    from moeflow.dashboard.views import serving

    serving.render()


def open_serving(url: str, app=None):
    from streamlit.testing.v1 import AppTest

    if app is None:
        app = AppTest.from_function(_page, default_timeout=60)
        app.query_params["url"] = url
    return app.run()


class RealGateway:
    """Two versions of a tiny model behind the real gateway app; ``traffic`` sends bounded requests."""

    def __init__(self, root: Path) -> None:
        sys.path.insert(0, str(Path(__file__).parent))
        from serve_helpers import LoopbackServer, make_model_dir

        from moeflow.platform.serve.config import GatewayConfig, ServedModel
        from moeflow.platform.serve.gateway import Gateway, LocalBackend, create_app, hash_key
        from moeflow.platform.serve.model_server import ModelServer
        from moeflow.platform.serve.routing import Arm, LocalRouteStore, RouteTable

        self.servers = {}
        for version, seed in VERSIONS:
            spec = ServedModel(name="tiny", version=version, model_dir=str(make_model_dir(root / f"v{version}", seed)),
                               engine={"max_batch": 4, "prefill_chunk": 16})
            self.servers[spec.key] = ModelServer(spec)
        table = RouteTable(versions={"tiny": ["1", "2"]}, aliases={"tiny": {"champion": "1", "candidate": "2"}})
        table = table.with_split("tiny", [Arm(target="champion", weight=0.5), Arm(target="candidate", weight=0.5)])
        config = GatewayConfig(max_tokens_cap=16, n_cap=2, max_body_bytes=64 * 1024, max_inflight=8)
        self.gateway = Gateway(config, LocalRouteStore(table), LocalBackend(self.servers), {hash_key(KEY)})
        self.loopback = LoopbackServer(create_app(self.gateway))

    def __enter__(self) -> "RealGateway":
        self.loopback.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.loopback.__exit__(*exc)
        for s in self.servers.values():
            s.close()

    @property
    def metrics_url(self) -> str:
        return self.loopback.url + "/metrics"

    def traffic(self, users: range, max_tokens: int = 6) -> dict[str, int]:
        """One request per user (the split is sticky per user), plus two bad requests: one refused before a
        version is chosen, one routed to version 2 and refused by its replica; requests routed per version."""
        import openai

        client = openai.OpenAI(base_url=self.loopback.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        per_version: dict[str, int] = {}
        for u in users:
            out = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=max_tokens,
                                            temperature=0, user=f"user-{u}")
            version = out.model.rsplit("/", 1)[-1].rsplit("@", 1)[-1]
            per_version[version] = per_version.get(version, 0) + 1
        with pytest.raises(openai.BadRequestError):  # over the max_tokens cap: a 400 the page must count
            client.completions.create(model="tiny", prompt="x", max_tokens=999)
        with pytest.raises(openai.BadRequestError):  # a token id outside the vocabulary: version 2's error
            client.completions.create(model="tiny@2", prompt=[10 ** 9], max_tokens=2)
        per_version["2"] = per_version.get("2", 0) + 1
        return per_version


def capture_fixture(root: Path, path: Path = FIXTURE) -> str:
    """Start a real gateway, send a few requests, save its ``/metrics`` text to ``path``."""
    from moeflow.dashboard import serving

    with RealGateway(root) as gw:
        gw.traffic(range(8))
        text = serving.scrape(gw.metrics_url)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


# ------------------------------------------------------------------ fast: a captured real scrape
def test_summary_of_a_captured_gateway_scrape():
    from moeflow.dashboard import serving

    samples = serving.parse(FIXTURE.read_text())
    rows = serving.summary(samples)
    by_version = {r["version"]: r for r in rows}
    assert set(by_version) == {"1", "2"} and {r["model"] for r in rows} == {"tiny"}
    assert sum(r["requests"] for r in rows) == 9  # 8 users and one request refused by version 2's replica
    assert by_version["2"]["errors"] == 1 and by_version["1"]["errors"] == 0
    assert by_version["2"]["error rate"] == pytest.approx(1 / by_version["2"]["requests"])
    for r in rows:  # every request that was not refused finished and produced tokens; latencies are real seconds
        assert r["requests"] >= 1 and r["generated tokens"] >= r["requests"] - r["errors"]
        assert r["finished"] == r["requests"] - r["errors"] and r["cancelled"] == 0
        assert 0 < r["ttft p50 (s)"] <= r["ttft p95 (s)"] <= r["ttft p99 (s)"] < 80
        assert r["ttft p50 (s)"] <= r["e2e p50 (s)"] <= r["e2e p99 (s)"] < 80
        assert any(v.startswith("split:") for v in r["via"].split(", "))  # (version 2 also "2": pinned)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    errors = serving.error_rows(samples)
    assert errors == [{"route": "/v1/completions", "status": "400", "requests": 2.0}]
    assert serving.version_error_rows(samples) == [{"model": "tiny", "version": "2", "status": "400", "code": "",
                                                    "requests": 1.0}]
    replicas = serving.replica_rows(samples)
    assert {(r["version"], r["replica"]) for r in replicas} == {("1", "local"), ("2", "local")}  # LocalBackend's replica


def test_serving_page_on_the_captured_scrape(tmp_path, monkeypatch):
    from moeflow.dashboard import serving

    monkeypatch.setattr(serving, "scrape", lambda url, timeout_s=2.0: FIXTURE.read_text())
    app = open_serving("http://127.0.0.1:9/metrics")
    assert not app.exception, [e.value for e in app.exception]
    versions = app.dataframe[0].value
    assert sorted(versions["version"]) == ["1", "2"]
    assert {"requests", "ttft p50 (s)", "e2e p95 (s)", "share", "cancelled", "errors", "error rate"} <= set(
        versions.columns)
    assert dict(zip(versions["version"], versions["errors"])) == {"1": 0.0, "2": 1.0}
    assert any("2 error responses" in e.value for e in app.warning)
    per_version = app.dataframe[2].value  # after the gateway-wide error table
    assert per_version.to_dict("records") == [{"model": "tiny", "version": "2", "status": "400", "code": "",
                                               "requests": 1.0}]


# ------------------------------------------------------------------ slow: the live gateway
@pytest.mark.slow
def test_serving_page_against_a_live_gateway(tmp_path, one_cpu_thread):
    with RealGateway(tmp_path) as gw:
        first = gw.traffic(range(4))
        app = open_serving(gw.metrics_url)
        assert not app.exception, [e.value for e in app.exception]
        table = app.dataframe[0].value
        assert "requests/s" not in table.columns  # one scrape: no rate yet
        assert dict(zip(table["version"], table["requests"])) == {v: float(n) for v, n in first.items()}
        second = gw.traffic(range(4, 12))
        app = open_serving(gw.metrics_url, app)  # a rerun: the second scrape, rates over the interval
        assert not app.exception, [e.value for e in app.exception]
        table = app.dataframe[0].value
        totals = {v: first.get(v, 0) + second.get(v, 0) for v in {*first, *second}}
        assert dict(zip(table["version"], table["requests"])) == {v: float(n) for v, n in totals.items()}
        assert (table["requests/s"] > 0).all() and (table["tokens/s"] > 0).all()
        assert (table["ttft p50 (s)"] > 0).all() and (table["e2e p99 (s)"] >= table["e2e p50 (s)"]).all()
        assert table["share"].sum() == pytest.approx(1.0)
        assert any("4 error responses" in e.value for e in app.warning)  # two 400s per traffic burst
        assert dict(zip(table["version"], table["errors"])) == {"1": 0.0, "2": 2.0}  # one per burst on version 2


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(capture_fixture(Path(d))[:2000])
