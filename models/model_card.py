"""The ``README.md`` of an exported model: what it is, what it was trained on, how well, how balanced.

A Hugging Face model card is Markdown with a YAML header that the Hub (and ``huggingface_hub``'s
``ModelCard``) reads: ``library_name``, ``pipeline_tag``, ``tags``. Below it: the architecture
(from the exported ``config.json``, so the card describes the file next to it, not the recipe),
the data lineage (store URIs of the curated data, tokenizer, token shards and checkpoint), the
final metrics, and an expert-load summary per MoE layer from the run's ``expert_load.npz``:

    MaxVio (last window) = (max_e load_e - mean load) / mean load   over the last logged interval
    MaxVio (whole run)   = the same over the counts of all windows summed
    busiest / idlest     = largest / smallest share of routed slots in the last window

MaxVio is the balance statistic of DeepSeek-V3's auxiliary-loss-free balancing paper; 0 is
perfect balance, 1 means the busiest expert got twice its fair share.

Pure: numpy and strings. Shape suffixes: N windows, L MoE layers, E routed experts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ModelCardInfo:
    """What the card says beyond ``config.json``; every field optional except the name."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)  # role -> URI: curated, tokenizer, tokens, checkpoint
    training: dict[str, Any] = field(default_factory=dict)  # steps, tokens seen, config hash ...
    expert_counts_NLE: Any = None  # routed slots per window (expert_load.npz "counts")
    expert_steps_N: Any = None  # the step that closed each window

    @classmethod
    def for_training_run(cls, name: str, *, metrics: dict, tokens_uri: str, tokens_meta: dict, checkpoint_uri: str,
                         step: int, config_hash: str | None = None,
                         expert_load_npz: str | os.PathLike | None = None) -> "ModelCardInfo":
        """The card of a pretraining run: lineage from the token shards' meta (curated data, tokenizer),
        expert load from the run's ``expert_load.npz`` (skipped when the file is absent)."""
        lineage = {"curated": tokens_meta.get("curated_uri"), "tokenizer": tokens_meta.get("tokenizer_uri"),
                   "tokens": tokens_uri, "checkpoint": checkpoint_uri}
        training = {"steps": int(step), "config_hash": config_hash,
                    "train_tokens": tokens_meta.get("num_tokens"), "vocab_size": tokens_meta.get("vocab_size")}
        counts = steps = None
        if expert_load_npz is not None and Path(expert_load_npz).is_file():
            with np.load(expert_load_npz) as arrays:
                counts, steps = arrays["counts"], arrays["steps"]
        return cls(name=name, metrics=dict(metrics), lineage={k: v for k, v in lineage.items() if v},
                   training={k: v for k, v in training.items() if v is not None},
                   expert_counts_NLE=counts, expert_steps_N=steps)


def maxvio_L(counts_LE: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts_LE, dtype=np.float64)
    mean_L = counts.mean(axis=-1)
    return (counts.max(axis=-1) - mean_L) / np.maximum(mean_L, 1e-12)


def expert_load_summary(counts_NLE, steps_N=None) -> list[dict]:
    """One row per MoE layer: MaxVio of the last window and of the whole run, busiest and idlest share."""
    counts = np.asarray(counts_NLE, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[0] == 0 or counts.shape[2] == 0:
        return []
    last_LE, total_LE = counts[-1], counts.sum(axis=0)
    share_LE = last_LE / np.maximum(last_LE.sum(axis=-1, keepdims=True), 1e-12)
    last_vio, run_vio = maxvio_L(last_LE), maxvio_L(total_LE)
    step = int(np.asarray(steps_N)[-1]) if steps_N is not None and len(steps_N) else None
    return [{"layer": layer, "maxvio_last": float(last_vio[layer]), "maxvio_run": float(run_vio[layer]),
             "busiest_share": float(share_LE[layer].max()), "idlest_share": float(share_LE[layer].min()),
             "num_experts": int(counts.shape[2]), "last_step": step}
            for layer in range(counts.shape[1])]


def _architecture_rows(hf_config: dict) -> list[tuple[str, Any]]:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "first_k_dense_replace", "n_routed_experts",
            "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size", "kv_lora_rank", "q_lora_rank",
            "qk_rope_head_dim", "num_nextn_predict_layers", "vocab_size", "max_position_embeddings", "dtype")
    return [(k, hf_config.get(k)) for k in keys if k in hf_config]


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_model_card(info: ModelCardInfo, hf_config: dict) -> str:
    """The card's Markdown (YAML header + sections); deterministic for the same inputs."""
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["moeflow", "deepseek_v3", "mixture-of-experts"]}
    lines = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in front.items()] + ["---", "", f"# {info.name}", ""]
    routed = hf_config.get("n_routed_experts") or 0
    lines += [f"A DeepSeek-V3-style {'Mixture-of-Experts' if routed else 'dense'} language model trained with "
              "moeflow, exported as `DeepseekV3ForCausalLM`. It loads with `transformers.AutoModelForCausalLM` "
              "and `AutoTokenizer` from this folder; `tokenizer.apply_chat_template` uses moeflow's chat format.", ""]
    lines += ["## Architecture", ""] + _table(["field", "value"], [[k, v] for k, v in _architecture_rows(hf_config)])
    if info.lineage:
        lines += ["", "## Data lineage", ""] + _table(["role", "URI"], [[k, f"`{v}`"] for k, v in info.lineage.items()])
    if info.training:
        lines += ["", "## Training", ""] + _table(["field", "value"], [[k, v] for k, v in info.training.items()])
    if info.metrics:
        lines += ["", "## Metrics", ""] + _table(["metric", "value"],
                                                  [[k, f"{float(v):.4g}"] for k, v in sorted(info.metrics.items())])
    summary = expert_load_summary(info.expert_counts_NLE, info.expert_steps_N) if info.expert_counts_NLE is not None else []
    if summary:
        step = summary[0]["last_step"]
        lines += ["", "## Expert load", "",
                  f"Per MoE layer, {summary[0]['num_experts']} routed experts; the last window ends at step {step}. "
                  "MaxVio = (max load - mean load) / mean load (0 = perfectly balanced).", ""]
        lines += _table(["layer", "MaxVio (last window)", "MaxVio (whole run)", "busiest expert share", "idlest expert share"],
                        [[r["layer"], f"{r['maxvio_last']:.3f}", f"{r['maxvio_run']:.3f}", f"{r['busiest_share']:.3f}",
                          f"{r['idlest_share']:.3f}"] for r in summary])
    return "\n".join(lines) + "\n"
