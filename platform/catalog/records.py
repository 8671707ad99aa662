"""Catalog rows as plain dicts: what the ``Catalog`` API returns.

JSON-ready on purpose (timestamps as ISO 8601 UTC strings, ids as hex strings) so Prefect
tasks can return them and the dashboard can show them without touching the ORM.
"""

from __future__ import annotations

from datetime import datetime, timezone

from .models import DatasetVersion, ModelVersion, Run


def iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    if ts.tzinfo is None:  # SQLite returns naive datetimes; we only ever store UTC
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc).isoformat()


def run_dict(run: Run, edges: dict[str, list[str]] | None = None) -> dict:
    data = {
        "id": run.id,
        "stage": run.stage,
        "status": run.status,
        "config": run.config or {},
        "config_hash": run.config_hash,
        "code_version": run.code_version,
        "started_at": iso(run.started_at),
        "ended_at": iso(run.ended_at),
        "pipeline_run_id": run.pipeline_run_id,
        "prefect_flow_run_id": run.prefect_flow_run_id,
        "mlflow_run_id": run.mlflow_run_id,
        "error": run.error,
        "metrics": run.metrics or {},
        "owner": run.owner,
    }
    if edges is not None:
        data["inputs"] = edges.get("inputs", [])
        data["outputs"] = edges.get("outputs", [])
    return data


def dataset_dict(dv: DatasetVersion, name: str) -> dict:
    return {
        "id": dv.id,
        "name": name,
        "version": dv.version,
        "uri": dv.uri,
        "kind": dv.kind,
        "content_hash": dv.content_hash,
        "stats": dv.stats or {},
        "created_at": iso(dv.created_at),
    }


def model_dict(mv: ModelVersion) -> dict:
    return {
        "id": mv.id,
        "name": mv.name,
        "version": mv.version,
        "uri": mv.checkpoint_uri,
        "checkpoint_uri": mv.checkpoint_uri,
        "kind": "model",
        "config_hash": mv.config_hash,
        "parent_model_id": mv.parent_id,
        "metrics": mv.metrics or {},
        "created_at": iso(mv.created_at),
    }


def artifact_node(uri: str, registered: dict | None, depth: int) -> dict:
    """An artefact in a lineage result; unregistered URIs (raw inputs) get ``kind=None``."""
    base = {"type": "artifact", "uri": uri, "depth": depth, "registered": registered is not None}
    if registered is None:
        return {**base, "kind": None, "name": None, "id": None}
    return {**registered, **base}


def edge(uri: str, run_id: str, *, uri_is_source: bool) -> dict:
    if uri_is_source:
        return {"source": uri, "target": run_id, "direction": "input"}
    return {"source": run_id, "target": uri, "direction": "output"}
