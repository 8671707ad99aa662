"""What an MLflow user expects to see, spelled once: experiment kind, run names, descriptions, dataset names.

* The experiment carries ``mlflow.experimentKind = custom_model_development``: MLflow 3's UI
  then opens it on the training-runs table, not on the GenAI traces view it guesses for a
  fresh experiment.
* A stage run nested under a pipeline run is named ``<pipeline run name>/<stage>``, so the runs
  table reads ``pipeline-tiny-brave-fox/pretrain`` instead of five runs called ``pretrain``.
* A run's description (``mlflow.note.content``, the Markdown box on the run page) links the
  Prefect flow run and lists the artefacts it read and wrote.
* A dataset input is named after the catalog entry (``stdlib-curated v3``) or, without one,
  after the store key (``stdlib-curated@3f9a1c2e``), never after a bare hash.

Pure functions: the stage glue (``platform/stage.py``) feeds them what it knows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by MLflow 3's experiment page
EXPERIMENT_KIND_TRAINING = "custom_model_development"  # the UI's "Machine learning" kind
NOTE_TAG = "mlflow.note.content"  # the run page's description (Markdown)

_HASHY = re.compile(r"^[0-9a-f]{8,}$")
_STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfss", "http", "https", "hdfs")


def stage_run_name(stage: str, *, parent_run_name: str | None = None, flow_run_name: str | None = None) -> str:
    """``<parent>/<stage>`` under a pipeline run; a top-level run takes its Prefect flow run's name."""
    if parent_run_name:
        return f"{parent_run_name}/{stage}"
    if flow_run_name:
        return flow_run_name if flow_run_name.startswith(stage) else f"{stage}/{flow_run_name}"
    return stage


def prefect_flow_run_url(prefect_api_url: str, flow_run_id: str) -> str:
    """The Prefect UI page of a flow run (the UI is served where the API is, without ``/api``)."""
    base = prefect_api_url.rstrip("/")
    base = base[: -len("/api")] if base.endswith("/api") else base
    return f"{base}/runs/flow-run/{flow_run_id}"


def dataset_display_name(uri: str, catalog_entry: Mapping | None = None) -> str:
    """A readable name for a dataset input: ``<name> v<version>`` from the catalog, else from the key.

    Store keys end in config hashes (``datasets/stdlib/curated/3f9a1c2e77d0``) or step folders
    (``runs/moe/ab12.../checkpoints/step-00000300``); the name keeps the meaningful segments
    and shortens the hash.
    """
    if catalog_entry and catalog_entry.get("name"):
        version = catalog_entry.get("version")
        return f"{catalog_entry['name']} v{version}" if version is not None else str(catalog_entry["name"])
    scheme, _, path = uri.rpartition("://")
    path = path.rstrip("/")
    parts = [p for p in path.split("/") if p]
    if "datasets" in parts:
        parts = parts[parts.index("datasets") + 1:]
    elif "runs" in parts:
        parts = parts[parts.index("runs") + 1:]
    else:
        parts = parts[-2:]
    words = [p for p in parts if not _HASHY.match(p)]
    hashes = [p[:8] for p in parts if _HASHY.match(p)]
    name = "-".join(words) or (parts[-1] if parts else uri)
    if scheme and scheme not in _STORAGE_SCHEMES:  # a source such as python-stdlib://3.11 names itself
        name = f"{scheme}:{name}"
    return f"{name}@{hashes[-1]}" if hashes else name


def run_description(stage: str, *, prefect_url: str | None = None, inputs: Iterable[tuple[str, str]] = (),
                    outputs: Iterable[str] = (), model_version: str | None = None,
                    status: str | None = None) -> str:
    """The Markdown of a stage run's description: Prefect link, inputs, outputs, registered model."""
    lines = [f"**{stage}**" + (f" · {status}" if status else "")]
    if prefect_url:
        lines.append(f"Prefect flow run: [{prefect_url.rsplit('/', 1)[-1]}]({prefect_url})")
    inputs, outputs = list(inputs), list(outputs)
    if inputs:
        lines += ["", "Inputs:"] + [f"- {name}: `{uri}`" for name, uri in inputs]
    if outputs:
        lines += ["", "Artefacts:"] + [f"- `{uri}`" for uri in outputs]
    if model_version:
        lines += ["", f"Registered model version: `{model_version}`"]
    return "\n".join(lines)
