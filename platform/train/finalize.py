"""After training, on the driver: export the final checkpoint in Hugging Face format and log what
pretraining reports.

Pretraining reports the final train loss and the last validation loss/bpb that training itself
measured (the loop validates on the last step); it does not evaluate the checkpoint again: the
``evaluate`` stage does that (against the unigram baseline), once.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeflow.models.model_card import ModelCardInfo
from moeflow.models.train import state as train_state
from moeflow.platform import artifacts as A
from moeflow.platform.config import config_hash

from .checkpoint import CheckpointManager
from .config import PretrainConfig
from .expert_load import NPZ_NAME, log_expert_load_heatmap
from .train_log import TrainLog, checkpoint_log
from .worker import LaunchConfig

log = logging.getLogger(__name__)

HF_DIR = "hf"


@dataclass
class PretrainResult:
    checkpoint_uri: str
    hf_uri: str | None
    expert_load_uri: str | None
    metrics: dict = field(default_factory=dict)
    steps: int = 0


def final_metrics(history: list[dict]) -> dict[str, float]:
    """The last logged train loss and the last validation the loop ran (its last step validates)."""
    out: dict[str, float] = {}
    for row in reversed(history):
        if "loss" in row and "train_loss" not in out:
            out["train_loss"] = float(row["loss"])
        for key in ("val_loss", "val_bpb"):
            if key in row and key not in out:
                out[key] = float(row[key])
    return out


def finalize_run(launch: LaunchConfig, store, *, tracker=None, replay_history: bool = False,
                 device: str = "cpu") -> PretrainResult:
    """Export HF and log the final metrics of a finished run.

    The final model is recorded in the catalog by the stage (``StageRun.add_output`` in
    ``tasks/pretrain.py``), the one place a stage's outputs are registered; this returns the URIs.
    """
    from moeflow.platform.data.shards import TokenDataset

    from .evaluate import load_model

    pcfg = PretrainConfig.from_dict(launch.pretrain)
    manager = CheckpointManager(store, launch.output_prefix, keep_last=pcfg.keep_checkpoints)
    ref = manager.latest()
    if ref is None or ref.step < pcfg.max_steps:
        raise RuntimeError(f"training did not finish: latest checkpoint under {manager.prefix} is "
                           f"{'none' if ref is None else ref.step} of {pcfg.max_steps} steps")
    with tempfile.TemporaryDirectory(prefix="moeflow-final-") as tmp:
        local = manager.download(ref, Path(tmp) / "ckpt")
        t_state = torch.load(local / train_state.TRAINER_FILE, map_location="cpu", weights_only=False)
        history, recorder, _ = checkpoint_log(local, t_state, TrainLog(store, launch.output_prefix), ref.step)
        metrics = final_metrics(history)
        model = load_model(local, device)
        train_ds = TokenDataset.open(launch.tokens_uri, "train", cache_dir=launch.cache_dir)
        hf_uri = export_hf(model, store, launch.output_prefix, Path(tmp) / "hf", ref, metrics, train_ds,
                           launch=launch, expert_load_npz=recorder.save(Path(tmp) / NPZ_NAME))
    expert_prefix = A.expert_load_key(launch.output_prefix)
    expert_uri = store.uri(expert_prefix) if store.artifact_exists(expert_prefix) else None
    if tracker is not None:
        with (tracker.start_run(launch.run_name) if tracker.active_run_id is None else contextlib.nullcontext()):
            if replay_history:  # Ray workers logged nowhere the caller can see: replay the curves
                for row in history:
                    tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
            tracker.log_summary({f"final/{k}": v for k, v in metrics.items()})  # single values, not series
            log_expert_load_heatmap(tracker, store, expert_uri)
            tracker.set_tags({"moeflow.checkpoint_uri": ref.uri, "moeflow.hf_uri": hf_uri or "",
                              "moeflow.expert_load_uri": expert_uri or ""})
    return PretrainResult(checkpoint_uri=ref.uri, hf_uri=hf_uri, expert_load_uri=expert_uri, metrics=metrics,
                          steps=ref.step)


def export_hf(model, store, output_prefix: str, local_dir: Path, ref, metrics: dict, train_ds, *,
              launch: LaunchConfig | None = None, expert_load_npz: Path | None = None) -> str | None:
    """HF DeepseekV3 directory (tokenizer files, chat template, model card included) as an artefact ``<prefix>/hf``.

    None, with a warning, when the config has no HF form (``export_hf`` refuses e.g. softmax routing).
    """
    from moeflow.models import hf

    meta = train_ds.meta
    refusals = tuple(c for c in (getattr(hf, "HFConversionError", None), ValueError) if c is not None)
    tokenizer = Path(getattr(train_ds, "local_dir", "")) / "tokenizer.json"
    try:
        hf.export_hf(model, str(local_dir), bos_token_id=meta.get("bos_id"), eos_token_id=meta.get("eos_id"),
                     pad_token_id=meta.get("pad_id"), tokenizer=tokenizer if tokenizer.is_file() else None,
                     card=ModelCardInfo.for_training_run(
                         launch.model_name if launch else "moe", metrics=metrics, tokens_uri=train_ds.uri,
                         tokens_meta=meta, checkpoint_uri=ref.uri, step=ref.step,
                         config_hash=config_hash(launch.pretrain) if launch else None, expert_load_npz=expert_load_npz))
    except refusals as err:  # a config without an HF form (softmax routing, uneven dense twin)
        log.warning("HF export skipped: %s", err)
        return None
    prefix = f"{output_prefix.strip('/')}/{HF_DIR}"
    with store.write_artifact(prefix, metadata={"kind": "hf-model", "format": "DeepseekV3ForCausalLM",
                                                "checkpoint_uri": ref.uri, "step": ref.step,
                                                "metrics": metrics}, overwrite=True) as w:
        for path in sorted(local_dir.rglob("*")):
            if path.is_file():
                w.put_file(path.relative_to(local_dir).as_posix(), path)
    return store.uri(prefix)
