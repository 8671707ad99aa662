"""The dashboard's page logic as plain functions: catalog / MLflow / store reads -> tables and arrays.

Pages only render what these return, so AppTest and unit tests exercise the logic without a browser,
and the Streamlit layer (``dashboard/cache.py``) only adds caching. Everything here reads; nothing
writes (see ``sources.py`` for why a fresh home stays untouched).

Expert-load shapes: N log windows, L router rows (layers), E experts.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import numpy as np

from moeflow.platform import artifacts as A
from moeflow.platform.stages import STAGES
from moeflow.platform.train.expert_load import NPZ_NAME, load_expert_load, relative_load_NLE

# the metric a stage is judged by, first match wins (catalog run metrics)
HEADLINE_METRICS = ("val_loss", "eval/val_loss", "final/val_loss", "eval_loss", "bits_per_byte", "reward_accuracy",
                    "heldout_accuracy", "exact_match", "loss", "docs_out", "num_tokens")
# curves the Run page draws when MLflow has them (substring match on the metric key)
CURVE_GROUPS = {
    "loss": ("loss",),
    "learning rate": ("lr",),
    "grad norm": ("grad_norm",),
    "throughput": ("tokens_per_s", "tokens/s", "mfu"),
}
DEAD_BELOW = 0.1      # relative load (share × E) under which an expert counts as dead
OVERLOADED_ABOVE = 2.0  # relative load over which an expert counts as overloaded


# ------------------------------------------------------------------ runs
def duration_s(run: dict) -> float | None:
    start, end = run.get("started_at"), run.get("ended_at")
    if not start:
        return None
    t1 = datetime.fromisoformat(end) if end else None
    if t1 is None:
        return None
    return (t1 - datetime.fromisoformat(start)).total_seconds()


def headline(run: dict) -> tuple[str, float] | None:
    """(metric, value) that sums a run up: the first of ``HEADLINE_METRICS`` it has, else None."""
    metrics = run.get("metrics") or {}
    for key in HEADLINE_METRICS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return key, float(value)
    return None


def stage_order(stage: str) -> int:
    names = list(STAGES)
    return names.index(stage) if stage in names else len(names)


def pipeline_overview(catalog, limit: int = 50) -> list[dict]:
    """Top-level runs (pipelines and stand-alone stage runs), newest first, each with its stage rows."""
    runs = catalog.list_runs(limit=limit * 20)
    children: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("pipeline_run_id"):
            children.setdefault(run["pipeline_run_id"], []).append(run)
    out = []
    for run in runs:
        if run.get("pipeline_run_id"):
            continue
        stages = sorted(children.get(run["id"], []), key=lambda r: (stage_order(r["stage"]), r["started_at"] or ""))
        out.append({"run": run, "stages": stages if stages else ([run] if run["stage"] != "pipeline" else [])})
        if len(out) >= limit:
            break
    return out


def stage_rows(stages: list[dict], links) -> list[dict]:
    """One table row per stage run: state, duration, headline metric, links, error."""
    rows = []
    for run in stages:
        head = headline(run)
        rows.append({
            "stage": run["stage"],
            "status": run["status"],
            "started": (run.get("started_at") or "")[:19].replace("T", " "),
            "duration_s": duration_s(run),
            "metric": f"{head[0]} = {head[1]:.4g}" if head else "",
            "run": links.run_page(run["id"]),
            "artefacts": links.artefacts(run),
            "mlflow": links.mlflow_run(run.get("mlflow_run_id")),
            "prefect": links.prefect_flow_run(run.get("prefect_flow_run_id")),
            "error": (run.get("error") or "")[:300],
        })
    return rows


class Links:
    """URLs of a run in the dashboard, MLflow and Prefect (None when the id is unknown).

    MLflow's UI resolves ``#/runs/<run id>`` to the run's page in its experiment itself, so the
    links need no MLflow read (the Overview, the first page anyone opens, then never imports MLflow).
    """

    def __init__(self, settings):
        self.settings = settings

    def run_page(self, run_id: str) -> str:
        return f"/run?id={run_id}"

    def artefacts(self, run: dict) -> str:
        """The run's node on the Lineage page: its inputs and outputs, each a node to click through."""
        return f"/lineage?pipeline={run.get('pipeline_run_id') or 'all'}&node={run['id']}"

    def mlflow_run(self, mlflow_run_id: str | None) -> str | None:
        if not mlflow_run_id:
            return None
        return f"{self.settings.mlflow_server_url}/#/runs/{mlflow_run_id}"

    def prefect_flow_run(self, flow_run_id: str | None) -> str | None:
        if not flow_run_id:
            return None
        from moeflow.platform.tracking import prefect_flow_run_url

        api = self.settings.prefect_api_url or f"http://{self.settings.host}:{self.settings.prefect_port}/api"
        return prefect_flow_run_url(api, flow_run_id)


def metric_history(mlflow, mlflow_run_id: str, keys: list[str] | None = None) -> list[dict]:
    """Long-form rows {metric, step, value} of a run's MLflow metrics (all keys unless given)."""
    if mlflow is None or not mlflow_run_id:
        return []
    run = mlflow.get_run(mlflow_run_id)
    keys = sorted(run.data.metrics) if keys is None else keys
    rows = []
    for key in keys:
        for m in mlflow.get_metric_history(mlflow_run_id, key):
            rows.append({"metric": key, "step": int(m.step), "value": float(m.value)})
    return rows


def curve_keys(metric_names: list[str]) -> dict[str, list[str]]:
    """{chart: metric keys} for the Run page; expert-load keys have their own page."""
    out: dict[str, list[str]] = {}
    for name in sorted(metric_names):
        if name.startswith("expert_load/") or name.startswith("system/"):
            continue
        for group, needles in CURVE_GROUPS.items():
            if group == "loss" and name.endswith("lr"):
                continue
            last = name.rsplit("/", 1)[-1]
            if any(n == last or (len(n) > 3 and n in last) or (n == "lr" and last.startswith("lr")) for n in needles):
                out.setdefault(group, []).append(name)
                break
    return out


# ------------------------------------------------------------------ experts
def expert_load_runs(catalog) -> list[dict]:
    """Runs of any training stage that wrote an expert-load artefact, newest first."""
    found = []
    for run in catalog.list_runs(limit=500):
        uri = next((u for u in run.get("outputs", []) if A.is_expert_load_uri(u)), None)
        if uri:
            found.append({**run, "expert_load_uri": uri})
    return found


def read_expert_load(uri: str, settings) -> dict[str, np.ndarray]:
    from moeflow.platform.store import read_artifact

    return load_expert_load(read_artifact(uri, settings).get_bytes(NPZ_NAME))


def maxvio_NL(counts_NLE) -> np.ndarray:
    """MaxVio of each window and layer: max_i load_i / mean load - 1 (0 = perfectly balanced)."""
    counts = np.asarray(counts_NLE, dtype=np.float64)
    mean_NL = counts.mean(axis=-1)
    return counts.max(axis=-1) / np.maximum(mean_NL, 1e-12) - 1.0


def global_maxvio_NL(counts_NLE) -> np.ndarray:
    """MaxVio of the load accumulated from the first window to each window (Loss-Free Balancing's
    MaxVio_global): transient imbalance averages out, a persistently favoured expert does not."""
    return maxvio_NL(np.cumsum(np.asarray(counts_NLE, dtype=np.float64), axis=0))


def expert_alerts(counts_NLE, last_windows: int = 3, dead_below: float = DEAD_BELOW,
                  overloaded_above: float = OVERLOADED_ABOVE) -> list[dict]:
    """Dead and overloaded experts over the last ``last_windows`` windows (relative load = share × E)."""
    counts = np.asarray(counts_NLE, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[0] == 0:
        return []
    rel_LE = relative_load_NLE(counts[-last_windows:].sum(axis=0, keepdims=True))[0]
    alerts = []
    for layer, expert in zip(*np.nonzero(rel_LE < dead_below)):
        alerts.append({"layer": int(layer), "expert": int(expert), "alert": "dead", "relative_load": float(rel_LE[layer, expert])})
    for layer, expert in zip(*np.nonzero(rel_LE > overloaded_above)):
        alerts.append({"layer": int(layer), "expert": int(expert), "alert": "overloaded",
                       "relative_load": float(rel_LE[layer, expert])})
    return sorted(alerts, key=lambda a: (a["layer"], a["expert"]))


def heatmap_rows(arrays: dict[str, np.ndarray], layer: int) -> list[dict]:
    """Long-form {step, expert, relative_load} of one layer (one heatmap cell per row)."""
    steps_N = np.asarray(arrays["steps"])
    rel_NE = relative_load_NLE(arrays["counts"])[:, layer, :]
    return [{"step": int(steps_N[n]), "expert": int(e), "relative_load": float(rel_NE[n, e])}
            for n in range(rel_NE.shape[0]) for e in range(rel_NE.shape[1])]


def layer_series_rows(steps_N, values_NL, name: str) -> list[dict]:
    """Long-form {step, layer, <name>} of an (N, L) array, plus the layer mean as layer 'mean'."""
    values_NL = np.asarray(values_NL, dtype=np.float64)
    rows = []
    for n, step in enumerate(np.asarray(steps_N)):
        for layer in range(values_NL.shape[1]):
            rows.append({"step": int(step), "layer": str(layer), name: float(values_NL[n, layer])})
        rows.append({"step": int(step), "layer": "mean", name: float(values_NL[n].mean())})
    return rows


def bias_rows(arrays: dict[str, np.ndarray], layer: int) -> list[dict]:
    """Long-form {step, expert, bias} of one layer's router balancing bias."""
    steps_N, bias_NE = np.asarray(arrays["steps"]), np.asarray(arrays["bias"])[:, layer, :]
    return [{"step": int(steps_N[n]), "expert": str(e), "bias": float(bias_NE[n, e])}
            for n in range(bias_NE.shape[0]) for e in range(bias_NE.shape[1])]


# RL (align: grpo / ppo) logs, per step, the MaxVio of the rollout's routing and of the update's own
# routing (the trainer's last-batch MaxVio), and the share of top-k choices the update kept from the
# rollout (1 by construction with routing replay on).
RL_ROUTING_KEYS = {"rollout/maxvio_layer": ("maxvio", "rollout"), "maxvio_batch/layer": ("maxvio", "update"),
                   "routing/agreement_layer": ("agreement", None)}


def rl_routing_keys(metric_names) -> list[str]:
    """The metric keys ``rl_routing`` reads, out of a run's keys (none: not an RL run)."""
    return sorted(k for k in metric_names
                  if any(k.startswith(p) and k[len(p):].isdigit() for p in RL_ROUTING_KEYS)
                  or k == "routing/agreement_mean")


def rl_routing(history: list[dict]) -> dict[str, list[dict]]:
    """Long-form rows of an RL run's routing curves from {metric, step, value} history rows:
    ``maxvio`` {step, layer, phase (rollout | update), maxvio} — shown only when the run logged rollout
    MaxVio, so a pretraining run's ``maxvio_batch`` alone is not called an update — and ``agreement``
    {step, layer (or "mean"), agreement}."""
    out: dict[str, list[dict]] = {"maxvio": [], "agreement": []}
    for row in history:
        key = row["metric"]
        if key == "routing/agreement_mean":
            out["agreement"].append({"step": row["step"], "layer": "mean", "agreement": row["value"]})
            continue
        for prefix, (kind, phase) in RL_ROUTING_KEYS.items():
            if key.startswith(prefix) and key[len(prefix):].isdigit():
                rec = {"step": row["step"], "layer": key[len(prefix):], kind: row["value"]}
                out[kind].append({**rec, "phase": phase} if phase else rec)
    if not any(r["phase"] == "rollout" for r in out["maxvio"]):
        out["maxvio"] = []
    for rows in out.values():
        rows.sort(key=lambda r: (r["step"], r.get("phase", ""), r["layer"]))
    return out


def specialisation_reports(catalog, settings) -> list[dict]:
    """The evaluation stage's expert-specialisation-by-domain reports, newest first."""
    from moeflow.platform.store import read_artifact

    out = []
    for ds in catalog.list_datasets(kind=A.EVAL_RESULTS, limit=20):
        try:
            art = read_artifact(ds["uri"], settings)
        except Exception:  # a deleted or unreadable artefact: skip it, the catalog still lists it
            continue
        if "specialisation.json" in art.names():
            out.append({"dataset": ds, "report": art.get_json("specialisation.json")})
    return out


# ------------------------------------------------------------------ data
def curated_datasets(catalog) -> list[dict]:
    return catalog.list_datasets(kind=A.CURATED, limit=50)


def curation_report(uri: str, settings) -> dict[str, Any]:
    """stats (with the funnel), excluded samples per step and the quarantine of a curated artefact."""
    from moeflow.platform.store import read_artifact

    art = read_artifact(uri, settings)
    names = art.names()
    stats = art.get_json("stats.json") if "stats.json" in names else {}
    excluded = {n[len("excluded/"):-len(".jsonl")]: _jsonl(art.get_bytes(n))
                for n in names if n.startswith("excluded/") and n.endswith(".jsonl")}
    quarantine = _jsonl(art.get_bytes("quarantine.jsonl")) if "quarantine.jsonl" in names else []
    return {"stats": stats, "funnel": stats.get("funnel", []), "excluded": excluded, "quarantine": quarantine}


def funnel_table(funnel: list[dict]) -> list[dict]:
    """The curation funnel with % of the input's documents and bytes kept after each step."""
    if not funnel:
        return []
    docs0, bytes0 = funnel[0].get("docs") or 0, funnel[0].get("bytes") or 0
    return [{**row, "% docs kept": 100.0 * row.get("docs", 0) / docs0 if docs0 else None,
             "% bytes kept": 100.0 * row.get("bytes", 0) / bytes0 if bytes0 else None} for row in funnel]


def _jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def token_datasets(catalog) -> list[dict]:
    return catalog.list_datasets(kind=A.TOKENS, limit=50)


# ------------------------------------------------------------------ lineage
def lineage_graph(catalog, pipeline_run_id: str | None = None) -> dict[str, list[dict]]:
    """Nodes (runs and artefacts) and edges of the catalog, or of one pipeline's stage runs."""
    runs = catalog.list_runs(limit=500, pipeline_run_id=pipeline_run_id)
    if pipeline_run_id is not None:
        runs = runs + _upstream_runs(catalog.list_runs(limit=2000), runs)
    known: dict[str, dict] = {}
    for ds in catalog.list_datasets(limit=1000):
        known[ds["uri"]] = ds
    for mv in catalog.list_models(limit=1000):
        known[mv["uri"]] = mv
    nodes: dict[str, dict] = {}
    edges = []
    for run in runs:
        if run["stage"] == "pipeline":
            continue
        nodes[run["id"]] = {"id": run["id"], "type": "run", "label": f"{run['stage']}\n{run['id'][:8]}",
                            "status": run["status"]}
        for uri in run.get("inputs", []):
            edges.append((uri, run["id"]))
        for uri in run.get("outputs", []):
            edges.append((run["id"], uri))
    for a, b in edges:
        for end in (a, b):
            if end not in nodes:
                entry = known.get(end)
                kind = entry["kind"] if entry else "raw"
                label = f"{entry['name']} v{entry['version']}" if entry else end.rsplit("/", 1)[-1]
                nodes[end] = {"id": end, "type": kind, "label": f"{kind}\n{label}", "entry": entry}
    return {"nodes": list(nodes.values()), "edges": [{"source": a, "target": b} for a, b in dict.fromkeys(edges)]}


def _upstream_runs(all_runs: list[dict], runs: list[dict]) -> list[dict]:
    """The runs (of earlier pipelines) that produced what ``runs`` consumed, transitively: a stage a
    pipeline took from Prefect's cache has no run of its own there, but its artefact has a producer."""
    producer: dict[str, dict] = {}
    for run in reversed(all_runs):  # newest producer of a URI wins
        if run["stage"] != "pipeline" and run["status"] == "succeeded":
            for uri in run.get("outputs", []):
                producer[uri] = run
    have = {r["id"] for r in runs}
    todo = [u for r in runs for u in r.get("inputs", [])]
    extra = []
    while todo:
        run = producer.get(todo.pop())
        if run is not None and run["id"] not in have:
            have.add(run["id"])
            extra.append(run)
            todo.extend(run.get("inputs", []))
    return extra


_NODE_STYLE = {"run": ("box", "#c6dbef"), "model": ("ellipse", "#fdd0a2"), "deploy_decision": ("octagon", "#fcbba1"),
               "raw": ("note", "#eeeeee")}


def lineage_dot(graph: dict[str, list[dict]], selected: str | None = None, pipeline: str = "all") -> str:
    """Graphviz DOT, left to right; every node links to ``/lineage?pipeline=<pipeline>&node=<id>``
    (click-through that keeps the graph being looked at)."""
    from urllib.parse import quote

    ids = {n["id"]: f"n{i}" for i, n in enumerate(graph["nodes"])}
    lines = ["digraph lineage {", "rankdir=LR;", 'node [style=filled, fontname="sans-serif", fontsize=10];']
    for n in graph["nodes"]:
        shape, colour = _NODE_STYLE.get(n["type"], ("folder", "#c7e9c0"))
        label = n["label"].replace('"', "'").replace("\n", "\\n")
        pen = ", penwidth=3" if n["id"] == selected else ""
        lines.append(f'{ids[n["id"]]} [id="{ids[n["id"]]}", label="{label}", shape={shape}, fillcolor="{colour}", '
                     f'URL="/lineage?pipeline={quote(pipeline, safe="")}&node={quote(n["id"], safe="")}", target="_self", tooltip="{n["id"]}"{pen}];')
    for e in graph["edges"]:
        lines.append(f'{ids[e["source"]]} -> {ids[e["target"]]};')
    lines.append("}")
    return "\n".join(lines)


# ------------------------------------------------------------------ models
def registered_models(mlflow) -> list[dict]:
    """Registered models with their versions, aliases and tags (MLflow's registry)."""
    if mlflow is None:
        return []
    out = []
    for rm in mlflow.search_registered_models(max_results=200):
        aliases = dict(getattr(rm, "aliases", {}) or {})
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        versions = []
        for mv in mlflow.search_model_versions(f"name='{rm.name}'", max_results=200):
            versions.append({"version": int(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
                             "run_id": mv.run_id, "source": mv.source, "tags": dict(mv.tags or {}),
                             "created": datetime.fromtimestamp(mv.creation_timestamp / 1000).isoformat(" ", "seconds"),
                             "description": mv.description or ""})
        out.append({"name": rm.name, "description": rm.description or "", "tags": dict(rm.tags or {}),
                    "versions": sorted(versions, key=lambda v: -v["version"])})
    return out


def eval_tags(tags: dict[str, str]) -> dict[str, str]:
    """The per-task evaluation results the evaluation stage attached to a model version."""
    return {k: v for k, v in tags.items() if k.startswith("eval.") or k.startswith("eval/")}


def deploy_decisions(catalog, settings) -> list[dict]:
    """The promotion decisions of the deploy stage (catalog kind ``deploy_decision``), newest first."""
    from moeflow.platform.store import read_artifact

    out = []
    for ds in catalog.list_datasets(kind=A.DEPLOY_DECISION, limit=50):
        try:
            doc = read_artifact(ds["uri"], settings).get_json("decision.json")
        except Exception:  # listed but unreadable: show the catalog row alone
            doc = {}
        out.append({"created_at": ds["created_at"], "uri": ds["uri"], **doc})
    return out


def compare_versions(a: dict, b: dict) -> list[dict]:
    """Tag-by-tag comparison of two model versions (numbers get a difference b - a)."""
    rows = []
    for key in sorted(set(a["tags"]) | set(b["tags"])):
        va, vb = a["tags"].get(key), b["tags"].get(key)
        row = {"tag": key, "a": va, "b": vb, "b - a": None}
        try:
            row["b - a"] = float(vb) - float(va)
        except (TypeError, ValueError):
            pass
        rows.append(row)
    return rows


# ------------------------------------------------------------------ compare
def final_metrics_table(runs: list[dict], histories: dict[str, list[dict]]) -> list[dict]:
    """One row per metric: the last value of each run and its difference to the first run (the baseline)."""
    last: dict[str, dict[str, float]] = {}
    for run in runs:
        for row in histories.get(run["id"], []):
            if row["metric"].startswith("system/"):
                continue
            prev = last.setdefault(row["metric"], {}).get(run["id"])
            if prev is None or row["step"] >= prev[0]:
                last[row["metric"]][run["id"]] = (row["step"], row["value"])
    base = runs[0]["id"]
    out = []
    for metric in sorted(last):
        row: dict[str, Any] = {"metric": metric}
        for run in runs:
            got = last[metric].get(run["id"])
            row[run["id"][:8]] = got[1] if got else None
            if run["id"] != base:
                b = last[metric].get(base)
                row[f"{run['id'][:8]} - {base[:8]}"] = (got[1] - b[1]) if got and b else None
        out.append(row)
    return out
