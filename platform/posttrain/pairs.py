"""Preference pairs for the stages that read them (reward, align with ``method: dpo``): which pairs, and how
they are split and rendered. Held-out pairs come from the data's ``heldout`` split or, for a single file, from a
hash of the prompt, so no prompt is on both sides.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydantic import Field

from moeflow.models.align import pairs as P
from moeflow.platform.config import StageConfig

from . import data as D


class PairDataConfig(StageConfig):
    """Which preference pairs a stage reads (shared by reward and align)."""

    max_pairs: int = Field(0, ge=0, le=100_000_000, description="training pairs used (0 = all)")
    heldout_pairs: int = Field(256, ge=1, le=1_000_000, description="held-out pairs scored before and after")
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share held out by prompt hash when the "
                                                                        "data has no heldout split")
    eval_batch_size: int = Field(16, ge=1, le=4096, description="pairs per forward when scoring")


@dataclass
class PairData:
    train: P.PairSet
    heldout: P.PairSet
    stats: dict


def _prompt_split(record, fraction: float) -> str:
    key = repr([(m["role"], m["content"]) for m in record.prompt]).encode()
    return "heldout" if int(hashlib.sha256(key).hexdigest()[:8], 16) / 16**8 < fraction else "train"


def load_pairs(uri: str, tokenizer, cfg: PairDataConfig, max_len: int) -> PairData:
    """Train and held-out pairs of a preference dataset, rendered; pairs longer than ``max_len`` tokens are
    dropped and counted. Held-out pairs come from the data's ``heldout`` split, or (a single JSONL file)
    from a hash of the prompt, so a prompt is never on both sides."""
    train_data = D.load_data(uri, D.PREFERENCE, split="train")
    train_records, heldout_records = list(train_data.records), []
    quarantined = len(train_data.quarantined)
    try:
        heldout_data = D.load_data(uri, D.PREFERENCE, split="heldout")
    except D.PostTrainDataError:
        heldout_data = None
    if heldout_data is not None and heldout_data.location.endswith("heldout.jsonl"):
        heldout_records, quarantined = heldout_data.records, quarantined + len(heldout_data.quarantined)
    else:  # one file: split it by prompt
        heldout_records = [r for r in train_records if _prompt_split(r, cfg.heldout_fraction) == "heldout"]
        train_records = [r for r in train_records if _prompt_split(r, cfg.heldout_fraction) == "train"]
    if cfg.max_pairs:
        train_records = train_records[:cfg.max_pairs]
    heldout_records = heldout_records[:cfg.heldout_pairs]
    too_long = 0

    def render(records):
        nonlocal too_long
        out = []
        for r in records:
            rendered = P.render_pair(tokenizer, P.Pair(tuple(r.prompt), r.chosen, r.rejected))
            if rendered.max_len > max_len:
                too_long += 1
            else:
                out.append(rendered)
        return out

    train, heldout = render(train_records), render(heldout_records)
    if not train or not heldout:
        raise D.PostTrainDataError(f"{uri}: {len(train)} training and {len(heldout)} held-out pairs fit in "
                                   f"{max_len} tokens ({too_long} longer dropped): need at least one of each")
    stats = {"train_pairs": len(train), "heldout_pairs": len(heldout), "pairs_too_long": too_long,
             "quarantined": quarantined}
    return PairData(P.PairSet(train, tokenizer.pad_id), P.PairSet(heldout, tokenizer.pad_id), stats)
