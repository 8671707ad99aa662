"""``EvaluateConfig``: the evaluate stage's config (pydantic, ``extra="forbid"``, bounds, descriptions).

The first three fields are the validation-split measurement every model gets when token shards
are given (validation loss, bits per byte, unigram baseline; ``platform/train/evaluate.py``); the
rest choose the model versions, the benchmark tasks and the reports.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from moeflow.platform.config import StageConfig

DEFAULT_TASKS = ["arith_mc", "python_mc", "arith", "stdlib_bpb", "stdlib_doctests"]


class EvaluateConfig(StageConfig):
    """What the evaluate stage measures for each model version."""

    num_batches: int = Field(16, ge=1, le=100_000, description="validation batches (loss / bits per byte)")
    batch_size: int = Field(8, ge=1, le=65_536, description="rows per batch, validation and task scoring")
    seq_len: Optional[int] = Field(None, ge=1, le=1_048_576,
                                   description="validation tokens per row (default: the training sequence length)")
    models: list[str] = Field(default_factory=list,
                              description="model versions to compare (name@alias, name/version, catalog:<id>, URI); "
                                          "empty: the newest model of the run")
    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS),
                             description="task names (configs/eval/<name>.yaml) or task YAML paths")
    limit: Optional[int] = Field(None, ge=1, le=1_000_000, description="score at most N items per task")
    max_len: Optional[int] = Field(None, ge=8, le=1_048_576, description="context length (default: the model's)")
    decontaminate: bool = Field(True, description="flag items whose 13-grams occur in the training data")
    exclude_contaminated: bool = Field(True, description="score without the flagged items (they stay in the report)")
    ngram: int = Field(13, ge=5, le=50, description="n of the n-gram overlap")
    specialisation: bool = Field(True, description="expert share by domain, mutual information, MaxVio")
    specialisation_texts: int = Field(32, ge=1, le=10_000, description="texts per domain for the specialisation report")
    code_workers: Optional[int] = Field(None, ge=1, le=512, description="parallel sandboxes (default: CPU count)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="sampling seed (tasks with temperature > 0)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs")
