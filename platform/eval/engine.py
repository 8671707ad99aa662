"""The evaluate stage's engine: model versions × tasks -> metrics, reports, a comparison table.

``run_evaluate(config, store, *, model_uris, tokens_uri=None, training_data_uris=(), tracker, catalog)``
for each model reference (``platform/model_refs``: directory, store URI, ``catalog:<id>``, ``name@alias``,
``name/version``):

1. loads the model and its tokenizer (a bare checkpoint takes the tokenizer of ``tokens_uri``);
2. with ``tokens_uri``: the validation loss / bits per byte beside the unigram baseline
   (``platform/train/evaluate.py``, unchanged);
3. loads every task (``tasks``), decontaminates it against ``training_data_uris`` (curated
   dataset, post-training sets; one 13-gram index for all models) and scores it
   (``runners.run_task``);
4. the expert-specialisation report (MoE models);
5. writes everything as one atomic artefact ``<output_prefix>/<model>`` (results.json, per-task
   items JSONL, contamination.json, specialisation.json + .png).

Results go three places: MLflow metrics of the evaluate run (``eval/<task>/<metric>``, with a
``<model>/`` level when several models are compared) plus the comparison table and figure as
run artefacts; catalog metrics of the model version (merged into its row); and tags
``eval.<task>.<metric>`` on the MLflow model version — what the deployment gate reads.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from moeflow.models.eval.lm import ModelLM

from .. import model_refs
from .config import EvaluateConfig
from .decontaminate import decontaminate, index_training_data
from .runners import TaskResult, run_task
from .tasks import load_task, load_task_data

_BOOKKEEPING = ("num_items", "items_per_s", "num_quarantined", "num_contaminated", "val_targets", "seconds")
MAIN_METRIC = {"multiple_choice": "acc_norm", "generate": "exact_match", "loglik": "bpb", "code": "pass_at_1"}


@dataclass
class ModelEvaluation:
    ref: model_refs.ModelRef
    metrics: dict[str, float] = field(default_factory=dict)        # "<task>/<metric>" and "val_*"
    tasks: list[TaskResult] = field(default_factory=list)
    contamination: list[dict] = field(default_factory=list)
    specialisation: dict | None = None
    results_uri: str | None = None


@dataclass
class EvaluateResult:
    models: list[ModelEvaluation]
    comparison: list[dict]                                         # one row per model
    metrics: dict[str, float] = field(default_factory=dict)        # what the run logged

    @property
    def results_uris(self) -> list[str]:
        return [m.results_uri for m in self.models if m.results_uri]


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("evaluate: device 'cuda' asked for but no CUDA device is visible")
    return choice


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", label).strip("-") or "model"


def _tokenizer_uri(tokens_uri: str | None) -> str | None:
    return f"{tokens_uri.rstrip('/')}/tokenizer.json" if tokens_uri else None


def _validation(loaded, tokens_uri: str, config: EvaluateConfig, device: str) -> dict[str, float]:
    from moeflow.platform.data.shards import TokenDataset
    from moeflow.platform.train.evaluate import evaluate_model

    train_ds, val_ds = TokenDataset.open(tokens_uri, "train"), TokenDataset.open(tokens_uri, "val")
    seq_len = config.seq_len or min(loaded.model.cfg.max_seq_len, 2048)
    if config.seq_len is None and loaded.meta:
        seq_len = int(loaded.meta.get("pretrain_config", {}).get("seq_len", seq_len))
    return evaluate_model(loaded.model, train_ds, val_ds, seq_len=seq_len, batch_size=config.batch_size,
                          num_batches=config.num_batches, device=device)


def _main_row(ev: ModelEvaluation) -> dict:
    row: dict = {"model": ev.ref.label}
    if "val_bpb" in ev.metrics:
        row["val_bpb"] = round(ev.metrics["val_bpb"], 4)
    for t in ev.tasks:
        key = MAIN_METRIC[t.type]
        if key in t.metrics:
            row[f"{t.name}/{key}"] = round(t.metrics[key], 4)
    return row


def _write_results(store, prefix: str, ev: ModelEvaluation, png: Path | None) -> str:
    summary = {"model": ev.ref.label, "model_uri": ev.ref.uri, "mlflow_model": ev.ref.mlflow_name,
               "mlflow_version": ev.ref.mlflow_version, "metrics": ev.metrics,
               "tasks": {t.name: {"type": t.type, "metrics": t.metrics} for t in ev.tasks}}
    with store.write_artifact(prefix, metadata={"kind": "eval_results", "model": ev.ref.label,
                                                "model_uri": ev.ref.uri}, overwrite=True) as w:
        w.put_bytes("results.json", json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
        for t in ev.tasks:
            w.put_bytes(f"items/{t.name}.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in t.items).encode())
        w.put_bytes("contamination.json", json.dumps(ev.contamination, indent=2).encode())
        if ev.specialisation is not None:
            w.put_bytes("specialisation.json", json.dumps(ev.specialisation, indent=2).encode())
        if png is not None:
            w.put_file("specialisation.png", png)
    return store.uri(prefix)


def _record_on_model(ev: ModelEvaluation, tracker, catalog, flat: dict[str, float]) -> None:
    """Evaluation metrics onto the model version: MLflow tags and the catalog row's metrics."""
    tags = {f"eval.{k.replace('/', '.')}": f"{v:.6g}" for k, v in flat.items() if not k.endswith(_BOOKKEEPING)}
    if tracker is not None and ev.ref.mlflow_name and ev.ref.mlflow_version:
        tracker.set_model_version_tags(ev.ref.mlflow_name, ev.ref.mlflow_version, tags)
    if catalog is not None and ev.ref.catalog_id:
        row = catalog.get_model(ev.ref.catalog_id)
        catalog.register_model(row["name"], row["checkpoint_uri"], row["config_hash"],
                               metrics={f"eval/{k}": v for k, v in flat.items()})


def evaluate_one(loaded, config: EvaluateConfig, *, tokens_uri: str | None, index, device: str,
                 work_dir: Path) -> tuple[ModelEvaluation, Path | None]:
    ev = ModelEvaluation(loaded.ref)
    if tokens_uri:
        ev.metrics.update(_validation(loaded, tokens_uri, config, device))
    lm = ModelLM(loaded.model, loaded.tokenizer, batch_size=config.batch_size, max_len=config.max_len)
    for task in config.tasks:
        spec = load_task(task)
        if config.limit:
            spec = spec.model_copy(update={"limit": min(spec.limit or config.limit, config.limit)})
        data = load_task_data(spec)
        if index is not None:
            data, report = decontaminate(data, index, exclude=config.exclude_contaminated)
            ev.contamination.append(report.to_dict())
            ev.metrics[f"{spec.name}/num_contaminated"] = float(len(report.contaminated))
        if not data.items:
            continue
        result = run_task(data, lm, seed=config.seed, max_workers=config.code_workers)
        result.metrics["num_quarantined"] = float(len(data.quarantined))
        ev.tasks.append(result)
        ev.metrics.update({f"{spec.name}/{k}": v for k, v in result.metrics.items()})
    png = None
    if config.specialisation and loaded.model.cfg.num_moe_layers > 0:
        from .specialisation import domain_texts, expert_specialisation, plot

        ev.specialisation, _ = expert_specialisation(loaded.model, loaded.tokenizer,
                                                     domain_texts(config.specialisation_texts),
                                                     max_len=config.max_len, batch_size=config.batch_size)
        layers = ev.specialisation["layers"]
        ev.metrics["specialisation/mean_mi_bits"] = sum(x["mutual_information_bits"] for x in layers) / len(layers)
        ev.metrics["specialisation/mean_normalized_mi"] = sum(x["normalized_mi"] for x in layers) / len(layers)
        ev.metrics["specialisation/max_maxvio"] = max(x["maxvio"] for x in layers)
        png = plot(ev.specialisation, work_dir / f"{_slug(loaded.ref.label)}-specialisation.png")
    return ev, png


def run_evaluate(config: EvaluateConfig, store, *, model_uris: Sequence[str], tokens_uri: str | None = None,
                 training_data_uris: Sequence[str] = (), tokenizer_uri: str | None = None,
                 output_prefix: str | None = None, tracker=None, catalog=None) -> EvaluateResult:
    """Evaluate every model reference in ``model_uris`` on the config's tasks (see the module docstring)."""
    if not model_uris:
        raise ValueError("evaluate: no model given (a model version alias, catalog id or URI)")
    for task in config.tasks:  # fail on a bad task name before any model loads
        load_task(task)
    device = _device(config.device)
    output_prefix = (output_prefix or f"evals/{config.config_hash()}").strip("/")
    index = None
    if config.decontaminate and training_data_uris:
        index = index_training_data(training_data_uris, n=config.ngram)
    evaluations, figures = [], []
    with tempfile.TemporaryDirectory(prefix="moeflow-eval-") as tmp:
        for ref in model_uris:
            start = time.perf_counter()
            mref = model_refs.resolve(ref, catalog=catalog, tracker=tracker)
            loaded = model_refs.load(mref, device=device, tokenizer=tokenizer_uri or _tokenizer_uri(tokens_uri),
                                    cache_dir=str(Path(tmp) / "models" / _slug(ref)))
            ev, png = evaluate_one(loaded, config, tokens_uri=tokens_uri, index=index, device=device, work_dir=Path(tmp))
            ev.metrics["seconds"] = time.perf_counter() - start
            ev.results_uri = _write_results(store, f"{output_prefix}/{_slug(ev.ref.label)}", ev, png)
            evaluations.append(ev)
            figures.append(png)
            del loaded
        comparison = [_main_row(ev) for ev in evaluations]
        logged: dict[str, float] = {}
        for ev in evaluations:
            level = "" if len(evaluations) == 1 else f"{_slug(ev.ref.label)}/"
            logged.update({f"eval/{level}{k}": v for k, v in ev.metrics.items()})
        if tracker is not None:
            tracker.log_metrics(logged)
            tracker.log_table(comparison, artifact_file="eval_comparison.json")
            tracker.log_dict({ev.ref.label: ev.contamination for ev in evaluations}, "eval_contamination.json")
            for ev, png in zip(evaluations, figures):
                if ev.specialisation is not None:
                    tracker.log_dict(ev.specialisation, f"eval_specialisation/{_slug(ev.ref.label)}.json")
                if png is not None:
                    tracker.log_artifact(png, "eval_specialisation")
        for ev in evaluations:
            _record_on_model(ev, tracker, catalog, {k: v for k, v in ev.metrics.items() if k != "seconds"})
    return EvaluateResult(evaluations, comparison, logged)


def comparison_markdown(comparison: list[dict]) -> str:
    """The comparison table as markdown (models × tasks' main metric)."""
    cols = []
    for row in comparison:
        cols += [c for c in row if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in comparison]
    return "\n".join(lines)
