"""Artefact kinds and names: the one place that spells them.

A *kind* is what the catalog records (``dataset``, ``tokens``, ``model`` ...); a *name* is how a
stage finds its input when none is given (the newest catalog entry of that kind and name).
"""

from __future__ import annotations

# kinds the catalog records (catalog.register_dataset(kind=...) / register_model)
CURATED = "dataset"
TOKENIZER = "tokenizer"
TOKENS = "tokens"
MODEL = "model"
EXPERT_LOAD = "expert_load"
CHAT_DATA = "chat_data"
PREFERENCE_DATA = "preference_data"
PROMPT_DATA = "prompt_data"
EVAL_RESULTS = "eval_results"
DEPLOY_DECISION = "deploy_decision"


def curated_name(dataset: str) -> str:
    return f"{dataset}-curated"


def tokenizer_name(dataset: str) -> str:
    return f"{dataset}-tokenizer"


def tokens_name(dataset: str) -> str:
    return f"{dataset}-tokens"


EXPERT_LOAD_DIR = "expert_load"  # under a training run's output prefix


def expert_load_key(output_prefix: str) -> str:
    """Where a training run keeps its expert-load log."""
    return f"{output_prefix.strip('/')}/{EXPERT_LOAD_DIR}"


def is_expert_load_uri(uri: str) -> bool:
    return uri.rstrip("/").endswith(f"/{EXPERT_LOAD_DIR}")


def stage_model_name(run_name: str, stage: str) -> str:
    """The registered model a stage writes: ``run_name`` for pretraining, ``<run_name>-<stage>`` after it."""
    return run_name if stage == "pretrain" else f"{run_name}-{stage}"


def posttrain_data_name(dataset: str, kind: str) -> str:
    """Catalog name of a generated post-training set: ``<dataset>-chat`` / ``-preference`` / ``-prompt``."""
    return f"{dataset}-{kind}"
