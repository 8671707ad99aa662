"""The stage registry: the one list of stages, read by the CLI, the Prefect deployments and the dashboard.

Each entry names the stage's flow by entrypoint string (``module:function``, as Prefect does),
so ``platform`` never imports ``flows`` (imports go one way) and loading a flow is the
registry's job. ``consumes`` / ``produces`` are artefact kinds (``moeflow.platform.artifacts``).
The order of ``STAGES`` is the pipeline order.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from . import artifacts as A


@dataclass(frozen=True)
class StageSpec:
    name: str
    flow: str                        # "moeflow.flows.<stage>:<stage>"
    consumes: tuple[str, ...] = ()   # artefact kinds read
    produces: tuple[str, ...] = ()   # artefact kinds written
    description: str = ""

    def load_flow(self):
        module_name, attr = self.flow.split(":")
        return getattr(importlib.import_module(module_name), attr)


_SPECS = (
    StageSpec("smoke", "moeflow.flows.smoke:smoke", (), (A.CURATED,), "store + catalog + MLflow + Prefect check"),
    StageSpec("curate", "moeflow.flows.curate:curate", (), (A.CURATED,), "raw sources -> curated dataset"),
    StageSpec("tokenize", "moeflow.flows.tokenize:tokenize", (A.CURATED,), (A.TOKENIZER, A.TOKENS),
              "curated dataset -> tokenizer + token shards"),
    StageSpec("pretrain", "moeflow.flows.pretrain:pretrain", (A.TOKENS,), (A.MODEL, A.EXPERT_LOAD),
              "token shards -> MoE checkpoint + HF export"),
    StageSpec("sft", "moeflow.flows.sft:sft", (A.MODEL, A.CHAT_DATA), (A.MODEL, A.EXPERT_LOAD),
              "model version + chat data -> supervised fine-tuned model (full, last-k layers or LoRA)"),
    StageSpec("evaluate", "moeflow.flows.evaluate:evaluate", (A.MODEL, A.TOKENS), (A.EVAL_RESULTS,),
              "model -> validation loss, bits per byte"),
    StageSpec("pipeline", "moeflow.flows.pipeline:pipeline", (), (), "every stage in order"),
)
STAGES: dict[str, StageSpec] = {s.name: s for s in _SPECS}


def get_stage(name: str) -> StageSpec:
    if name not in STAGES:
        import difflib

        close = difflib.get_close_matches(name, list(STAGES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown stage {name!r}{hint}; choose from {', '.join(STAGES)}")
    return STAGES[name]
