"""Prometheus series of the gateway (one registry per gateway, exposed at ``/metrics``).

Labels: ``model`` (name), ``version`` and, where the replica is known (after it accepted the
request), ``replica``; never an API key or a user id. Latencies are measured where the client
sees them (the gateway): time to first token, inter-token latency (between consecutive tokens of
one choice), end-to-end latency. ``running`` = generating, ``waiting`` = sent to a replica, no
first token yet. Names follow vLLM's (``…_time_to_first_token_seconds`` etc.) under ``moeflow_serve_``.
"""

from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)
VERSION = ("model", "version")
REPLICA = ("model", "version", "replica")


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "moeflow_serve_"
        self.running = Gauge(p + "requests_running", "choices generating", VERSION, registry=r)
        self.waiting = Gauge(p + "requests_waiting", "choices sent to a replica, no first token yet", VERSION,
                             registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "request start -> first token", REPLICA,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "between consecutive tokens of a choice", REPLICA,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "request start -> last token", VERSION,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens", REPLICA, registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "generated tokens", REPLICA, registry=r)
        self.finished = Counter(p + "request_finished", "choices finished, by reason", REPLICA + ("finish_reason",),
                                registry=r)
        self.http = Counter(p + "http_requests", "HTTP requests by route and status", ("route", "status"), registry=r)
        # errors after a version was chosen (the replica refused, failed, stalled, ...), so the A/B split's arms
        # can be compared on errors too; ``http`` counts every refusal, also those before a version is chosen
        self.version_errors = Counter(p + "version_errors", "failed requests per version, by HTTP status and code",
                                      VERSION + ("status", "code"), registry=r)
        self.routed = Counter(p + "routed_requests", "requests per resolved version and how it was chosen",
                              VERSION + ("via",), registry=r)

        # ``metric.labels(...)`` takes a lock and checks the labels each time; a request asked it a dozen times
        self.child = functools.cache(lambda metric, *labels: metric.labels(*labels))

    def render(self) -> bytes:
        return generate_latest(self.registry)
