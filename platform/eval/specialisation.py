"""The expert-specialisation report of a model: per layer, which experts each domain's tokens use.

Domains (code / prose / maths / chat) come from texts the repository ships: the labelled seed set
of the curation domain classifier (``platform/data/seed/domain_seed.jsonl``) plus, per domain, the
evaluation sets (HumanEval prompts are code, the arithmetic prompts maths, stdlib docstrings prose,
python_mc rendered with the chat template chat). The maths is in ``models/eval/specialisation``;
this module collects the texts, runs the model, and draws the figure (one heatmap per MoE layer:
rows = domains, columns = experts, colour = share of the domain's routed slots) and the table
(per layer: mutual information, normalised MI, MaxVio, each domain's top expert).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from moeflow.models.chat import render_ids
from moeflow.models.eval.specialisation import route_counts, specialisation_report

DOMAINS = ("code", "prose", "maths", "chat")
_SEED_LABEL = {"code": "code", "prose": "prose", "math": "maths", "dialogue": "chat"}


def domain_texts(max_per_domain: int = 64) -> dict[str, list]:
    """{domain: [text or chat messages]} from the shipped seed set and evaluation files."""
    from moeflow.platform.data.domain import SEED_PATH

    from .code import humaneval_problems
    from .tasks import CONFIG_DIR

    out: dict[str, list] = {d: [] for d in DOMAINS}
    for line in SEED_PATH.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        out[_SEED_LABEL[rec["label"]]].append(rec["text"])
    out["code"] += [p.prompt for p in humaneval_problems(limit=32)]
    out["maths"] += [json.loads(x)["prompt"] for x in (CONFIG_DIR / "arith.jsonl").read_text().splitlines()]
    out["prose"] += [json.loads(x)["text"] for x in (CONFIG_DIR / "stdlib_docs.jsonl").read_text().splitlines()]
    for x in (CONFIG_DIR / "python_mc.jsonl").read_text().splitlines():
        r = json.loads(x)
        out["chat"].append([{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}])
    return {d: v[:max_per_domain] for d, v in out.items()}


def encode_domains(tokenizer, texts: Mapping[str, Sequence]) -> dict[str, list[list[int]]]:
    """Token ids per domain (chat conversations through the one chat template)."""
    return {d: [render_ids(tokenizer, t).ids if isinstance(t, list) else tokenizer.encode(t) for t in items]
            for d, items in texts.items()}


def expert_specialisation(model, tokenizer, texts: Mapping[str, Sequence] | None = None, *,
                          max_len: int | None = None, batch_size: int = 8) -> tuple[dict, np.ndarray]:
    """(report dict, counts_LDE) for ``texts`` (default: ``domain_texts()``)."""
    ids = encode_domains(tokenizer, texts or domain_texts())
    domains, counts = route_counts(model, ids, max_len=max_len, batch_size=batch_size, pad_id=tokenizer.pad_id)
    report = specialisation_report(counts, domains)
    report["num_tokens"] = {d: int(counts[0, i].sum() // max(1, model.cfg.num_experts_per_tok))
                            for i, d in enumerate(domains)}
    return report, counts


def table_rows(report: dict) -> list[dict]:
    """One row per MoE layer: MI, normalised MI, MaxVio, top expert (share) per domain."""
    rows = []
    for layer in report["layers"]:
        row = {"layer": layer["layer"], "mi_bits": round(layer["mutual_information_bits"], 4),
               "normalized_mi": round(layer["normalized_mi"], 4), "maxvio": round(layer["maxvio"], 4)}
        for d, top in layer["top_expert"].items():
            row[f"top_{d}"] = f"e{top['expert']} ({top['share']:.2f})"
        rows.append(row)
    return rows


def plot(report: dict, path: str | Path) -> Path:
    """Heatmaps of each layer's domain × expert shares, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = np.asarray(report["share"])  # (L, D, E)
    L = share.shape[0]
    fig, axes = plt.subplots(L, 1, figsize=(max(6, share.shape[2] * 0.35), 1.2 + 1.1 * L * max(1, len(report["domains"]) / 4)),
                             squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        im = ax.imshow(share[layer], aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, share.max()))
        mi = report["layers"][layer]["mutual_information_bits"]
        ax.set_title(f"MoE layer {layer}: I(domain; expert) = {mi:.3f} bits, "
                     f"MaxVio = {report['layers'][layer]['maxvio']:.2f}", fontsize=9)
        ax.set_yticks(range(len(report["domains"])), report["domains"], fontsize=8)
        ax.set_xticks(range(share.shape[2]), [str(e) for e in range(share.shape[2])], fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
