"""Serving metrics from the gateway's Prometheus endpoint (``moeflow_serve_*``, vLLM-style names).

``parse`` turns one scrape into samples; ``summary`` turns it (and an earlier scrape, for rates) into
the Serving page's per-(model, version) table: requests and how they were routed (``via``: an alias,
or ``split:<arm>`` for the A/B split), each version's share of its model's requests, requests/s and
tokens/s, time to first token and end-to-end latency percentiles (from histogram buckets, linear
within a bucket as Prometheus' ``histogram_quantile`` does), finished and cancelled choices.

The gateway's series and labels are those of ``platform/serve/metrics.py``; the fast test holds this
module to a scrape captured from a real gateway (``tests/dashboard_gateway_metrics.prom``). Refused
requests (4xx/5xx) are counted by the gateway per route and status (``error_rows``, gateway-wide: a
refusal may come before a version is chosen), and the errors after a version was chosen per version,
status and code (``moeflow_serve_version_errors_total``: ``version_error_rows`` and the summary's
``errors`` / ``error rate`` columns, so the A/B split's arms compare on errors too).
"""

from __future__ import annotations

import math
import urllib.request

PREFIX = "moeflow_serve_"


def scrape(url: str, timeout_s: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (a configured http URL)
        return resp.read().decode("utf-8")


def parse(text: str) -> list[dict]:
    """Samples as {name, labels, value} (Prometheus text format, via prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [{"name": s.name, "labels": dict(s.labels), "value": float(s.value)}
            for family in text_string_to_metric_families(text) for s in family.samples]


def _key(labels: dict) -> tuple[str, str]:
    return labels.get("model", ""), labels.get("version", "")


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile``: q-th quantile from cumulative (upper bound, count) buckets."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width > 0 else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


def summary(samples: list[dict], previous: list[dict] | None = None, interval_s: float | None = None) -> list[dict]:
    """One row per (model, version): totals, rates over ``interval_s`` since ``previous``, latency percentiles."""
    def totals(rows: list[dict]) -> dict[tuple, dict[str, float]]:
        out: dict[tuple, dict[str, float]] = {}
        for s in rows:
            name, key = s["name"].removeprefix(PREFIX), _key(s["labels"])
            if not key[0]:
                continue
            acc = out.setdefault(key, {})
            if name in ("routed_requests_total", "prompt_tokens_total", "generation_tokens_total",
                        "version_errors_total"):
                acc[name] = acc.get(name, 0.0) + s["value"]
            elif name == "request_finished_total":
                # the engine's reasons: "stop" | "length" (finished) and "cancelled" (client went away)
                field = "cancelled" if s["labels"].get("finish_reason") == "cancelled" else "finished"
                acc[field] = acc.get(field, 0.0) + s["value"]
        return out

    now, before = totals(samples), totals(previous or [])
    hist: dict[tuple, dict[str, dict[float, float]]] = {}
    for s in samples:
        name = s["name"].removeprefix(PREFIX)
        if name.endswith("_bucket"):
            le = float(s["labels"]["le"])
            per = hist.setdefault(_key(s["labels"]), {}).setdefault(name[: -len("_bucket")], {})
            per[le] = per.get(le, 0.0) + s["value"]  # summed over replicas
    via: dict[tuple, set[str]] = {}
    for s in samples:
        if s["name"] == PREFIX + "routed_requests_total" and s["value"] > 0:
            via.setdefault(_key(s["labels"]), set()).add(s["labels"].get("via", ""))
    rows = []
    for key in sorted(set(now) | set(hist)):
        acc, old = now.get(key, {}), before.get(key, {})
        row = {"model": key[0], "version": key[1], "via": ", ".join(sorted(via.get(key, ()))),
               "requests": acc.get("routed_requests_total", 0.0),
               "generated tokens": acc.get("generation_tokens_total", 0.0),
               "finished": acc.get("finished", 0.0), "cancelled": acc.get("cancelled", 0.0),
               "errors": acc.get("version_errors_total", 0.0)}
        row["error rate"] = row["errors"] / row["requests"] if row["requests"] else None
        if previous is not None and interval_s:
            row["requests/s"] = (row["requests"] - old.get("routed_requests_total", 0.0)) / interval_s
            row["tokens/s"] = (row["generated tokens"] - old.get("generation_tokens_total", 0.0)) / interval_s
        for metric, short in (("time_to_first_token_seconds", "ttft"), ("e2e_request_latency_seconds", "e2e")):
            buckets = list(hist.get(key, {}).get(metric, {}).items())
            for q in (0.5, 0.95, 0.99):
                row[f"{short} p{int(q * 100)} (s)"] = quantile(q, buckets)
        rows.append(row)
    per_model: dict[str, float] = {}
    for r in rows:
        per_model[r["model"]] = per_model.get(r["model"], 0.0) + r["requests"]
    for r in rows:  # the A/B split's realised share: of this model's requests, not of all models'
        r["share"] = r["requests"] / (per_model[r["model"]] or 1.0)
    return rows


def error_rows(samples: list[dict]) -> list[dict]:
    """Refused requests (HTTP status >= 400) per route and status, over the gateway's lifetime."""
    return [{"route": s["labels"].get("route", ""), "status": s["labels"].get("status", ""), "requests": s["value"]}
            for s in samples
            if s["name"] == PREFIX + "http_requests_total" and s["labels"].get("status", "0").isdigit()
            and int(s["labels"]["status"]) >= 400 and s["value"] > 0]


def version_error_rows(samples: list[dict]) -> list[dict]:
    """Errors after a version was chosen, per (model, version, HTTP status, code), over the gateway's lifetime."""
    return [{"model": s["labels"].get("model", ""), "version": s["labels"].get("version", ""),
             "status": s["labels"].get("status", ""), "code": s["labels"].get("code", ""), "requests": s["value"]}
            for s in samples if s["name"] == PREFIX + "version_errors_total" and s["value"] > 0]


def replica_rows(samples: list[dict]) -> list[dict]:
    """Generated tokens and finished choices per replica."""
    out: dict[tuple, dict] = {}
    for s in samples:
        replica = s["labels"].get("replica")
        if replica is None:
            continue
        name = s["name"].removeprefix(PREFIX)
        key = (*_key(s["labels"]), replica)
        row = out.setdefault(key, {"model": key[0], "version": key[1], "replica": replica})
        if name in ("generation_tokens_total", "prompt_tokens_total", "request_finished_total"):
            row[name.removesuffix("_total")] = row.get(name.removesuffix("_total"), 0.0) + s["value"]
    return list(out.values())
