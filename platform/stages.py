"""The stage registry: the one list of stages, read by the CLI, the Prefect deployments and the dashboard.

Each entry names the stage's flow and its config class by entrypoint string (``module:attr``, as
Prefect does), so ``platform`` never imports ``flows`` (imports go one way), listing the stages
imports nothing heavy, and loading a flow or a config is the registry's job. ``consumes`` /
``produces`` are artefact kinds (``moeflow.platform.artifacts``); ``inputs`` say where a stage
finds its input when no URI is given (the newest catalog entry of a kind and name) and which
stage produces it, so a missing input is named before anything starts. The order of ``STAGES``
is the pipeline order.

A recipe (``configs/*.yaml``) has one section per stage config (named like the stage) plus the
run options of ``RunOptions``; ``validate_recipe`` checks both before Prefect or Ray is touched.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pydantic import BaseModel, Field, field_validator

from . import artifacts as A
from .config import StageConfig, closest


def _load(entrypoint: str):
    module_name, attr = entrypoint.split(":")
    return getattr(importlib.import_module(module_name), attr)


def load_entrypoint(entrypoint: str):
    """Import ``module:attr`` by name: the one place that does (flows, configs, post-training builders)."""
    return _load(entrypoint)


@dataclass(frozen=True)
class StageInput:
    """An input a stage looks up in the catalog unless its URI parameter is given."""

    param: str                      # the flow parameter / recipe key that passes a URI
    kind: str                       # artefact kind in the catalog
    name: Callable[[dict], str]     # catalog name from the run options (dataset, run_name)
    produced_by: str                # the stage whose run produces it
    what: str                       # how a person calls it


@dataclass(frozen=True)
class StageSpec:
    name: str
    flow: str                        # "moeflow.flows.<stage>:<stage>"
    config: str | None = None        # "module:ConfigClass" of the recipe section named like the stage
    consumes: tuple[str, ...] = ()   # artefact kinds read
    produces: tuple[str, ...] = ()   # artefact kinds written
    description: str = ""
    inputs: tuple[StageInput, ...] = ()

    def load_flow(self):
        return _load(self.flow)

    def load_config(self) -> type[BaseModel] | None:
        return _load(self.config) if self.config else None

    @property
    def deployment(self) -> str:
        """The Prefect deployment of this stage: ``<flow name>/<DEPLOYMENT_NAME>``."""
        return f"{self.name}/{DEPLOYMENT_NAME}"


DEPLOYMENT_NAME = "local"
WORK_POOL = "moeflow-local"

_CURATED = StageInput("curated_uri", A.CURATED, lambda o: A.curated_name(o["dataset"]), "curate", "curated dataset")
_TOKENS = StageInput("tokens_uri", A.TOKENS, lambda o: A.tokens_name(o["dataset"]), "tokenize", "token shards")
_MODEL = StageInput("checkpoint_uri", A.MODEL, lambda o: o["run_name"], "pretrain", "trained model")
_PRETRAINED = StageInput("model", A.MODEL, lambda o: A.stage_model_name(o["run_name"], "pretrain"), "pretrain",
                         "pretrained model")

_SFT = StageInput("model", A.MODEL, lambda o: A.stage_model_name(o["run_name"], "sft"), "sft", "fine-tuned model")

_SPECS = (
    StageSpec("smoke", "moeflow.flows.smoke:smoke", "moeflow.platform.smoke:SmokeConfig", (), (A.CURATED,),
              "store + catalog + MLflow + Prefect check"),
    StageSpec("curate", "moeflow.flows.curate:curate", "moeflow.platform.data.curate_config:CurateConfig", (),
              (A.CURATED,), "raw sources -> curated dataset"),
    StageSpec("tokenize", "moeflow.flows.tokenize:tokenize", "moeflow.platform.data.tokenize:TokenizeConfig",
              (A.CURATED,), (A.TOKENIZER, A.TOKENS), "curated dataset -> tokenizer + token shards", (_CURATED,)),
    StageSpec("pretrain", "moeflow.flows.pretrain:pretrain", "moeflow.platform.train.config:PretrainConfig",
              (A.TOKENS,), (A.MODEL, A.EXPERT_LOAD), "token shards -> MoE checkpoint + HF export", (_TOKENS,)),
    StageSpec("posttrain_data", "moeflow.flows.posttrain_data:posttrain_data",
              "moeflow.platform.posttrain.generated:GeneratedDataConfig", (A.CURATED,),
              (A.CHAT_DATA, A.PREFERENCE_DATA, A.PROMPT_DATA),
              "built-in post-training sets: stdlib instructions, arithmetic with exact answers, corrupted pairs"),
    StageSpec("sft", "moeflow.flows.sft:sft", "moeflow.platform.posttrain.sft:SFTConfig", (A.MODEL, A.CHAT_DATA),
              (A.MODEL, A.EXPERT_LOAD), "model version + chat data -> supervised fine-tuned model (full, last-k, LoRA)",
              (_PRETRAINED,)),
    StageSpec("reward", "moeflow.flows.reward:reward", "moeflow.platform.posttrain.reward:RewardConfig",
              (A.MODEL, A.PREFERENCE_DATA), (A.MODEL, A.EXPERT_LOAD),
              "model version + preference pairs -> Bradley-Terry reward model (alias 'reward')", (_SFT,)),
    StageSpec("align", "moeflow.flows.align:align", "moeflow.platform.posttrain.align:AlignConfig",
              (A.MODEL, A.PREFERENCE_DATA, A.PROMPT_DATA), (A.MODEL, A.EXPERT_LOAD),
              "model version + preference pairs (dpo/ipo/cDPO) or prompts with answers (online RL: grpo/ppo) "
              "-> aligned model", (_SFT,)),
    StageSpec("distill", "moeflow.flows.distill:distill", "moeflow.platform.posttrain.distill:DistillConfig",
              (A.MODEL, A.TOKENS), (A.MODEL, A.EXPERT_LOAD),
              "teacher model version + token shards -> smaller student (top-k KD / JSD)", (_PRETRAINED, _TOKENS)),
    StageSpec("evaluate", "moeflow.flows.evaluate:evaluate", "moeflow.platform.eval.config:EvaluateConfig",
              (A.MODEL, A.TOKENS), (A.EVAL_RESULTS,),
              "model versions -> benchmarks (MC, generation, bits/byte, code pass@k), val loss, reports", (_MODEL, _TOKENS)),
    StageSpec("deploy", "moeflow.flows.deploy:deploy", "moeflow.platform.serve.deploy:DeployConfig",
              (A.MODEL, A.EVAL_RESULTS), (A.DEPLOY_DECISION,),
              "evaluated model version -> promotion gate -> serving alias (champion)"),
    StageSpec("pipeline", "moeflow.flows.pipeline:pipeline", None, (), (), "every stage in order"),
)
STAGES: dict[str, StageSpec] = {s.name: s for s in _SPECS}


class UnknownStage(ValueError):
    """A stage name the registry does not hold (the message suggests the closest)."""


def get_stage(name: str) -> StageSpec:
    if name not in STAGES:
        near = closest(name, STAGES)
        hint = f" (did you mean {near!r}?)" if near else ""
        raise UnknownStage(f"unknown stage {name!r}{hint}; choose from {', '.join(STAGES)}")
    return STAGES[name]


class MissingInput(LookupError):
    """A stage's input is not in the catalog yet (the message says how to make or pass it)."""


def find_input(inp: StageInput, options: dict, *, stage: str, catalog=None) -> str:
    """The newest catalog entry ``inp`` names for ``options``; ``MissingInput`` when there is none."""
    name = inp.name(options)
    rows, key = [], "uri"
    if catalog is not None or _catalog_may_exist():
        from .catalog import Catalog

        owns = catalog is None
        catalog = catalog if catalog is not None else Catalog.from_settings()
        try:
            if inp.kind == A.MODEL:
                rows, key = catalog.list_models(name=name, limit=1), "checkpoint_uri"
            else:
                rows = catalog.list_datasets(kind=inp.kind, name=name, limit=1)
        finally:
            if owns:
                catalog.close()
    if not rows:
        raise MissingInput(f"{stage}: no {inp.what} {name!r} yet: run `moeflow run {inp.produced_by}` first, "
                           f"or pass one with --set {inp.param}=<uri>")
    return rows[0][key]


def flow_kwargs(flow_obj, recipe: dict) -> dict:
    """Recipe sections and options named like the flow's parameters become its arguments."""
    import inspect

    params = inspect.signature(getattr(flow_obj, "fn", flow_obj)).parameters
    return {name: recipe[name] for name in params if name in recipe}


def _catalog_may_exist() -> bool:
    """False only for the embedded SQLite catalog whose file is not there yet (a fresh home):
    nothing to find, and no reason to create the database just to look."""
    from pathlib import Path

    from .settings import get_settings

    url = get_settings().catalog_db_url
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):]).is_file()
    return True


def config_sections() -> dict[str, str]:
    """{recipe section: config entrypoint} for every stage that has a config."""
    return {s.name: s.config for s in _SPECS if s.config}


# ------------------------------------------------------------------ run options (recipe top level)
class RunOptions(StageConfig):
    """The recipe's top-level keys: the flows' parameters that are not a stage's config section."""

    name: str = Field("recipe", description="the recipe's name (set from the file name)")
    dataset: str = Field("tiny", min_length=1, description="curated dataset name; single-stage flows find inputs by it")
    run_name: str = Field("moe", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                          description="name of the training run and of its registered model")
    num_workers: Optional[int] = Field(None, ge=1, le=4096, description="Ray tasks for curation and tokenization "
                                                                        "(default: one per CPU)")
    train_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers (1 trains in-process)")
    use_gpu: bool = Field(False, description="train on GPUs (NCCL) instead of CPUs (gloo)")
    curated_uri: Optional[str] = Field(None, description="tokenize this curated artefact instead of the newest one")
    tokens_uri: Optional[str] = Field(None, description="train/evaluate on these token shards instead of the newest")
    checkpoint_uri: Optional[str] = Field(None, description="evaluate this checkpoint instead of the newest model")
    model: Optional[str] = Field(None, description="post-train this model version (catalog id, name@alias or HF-export "
                                                   "URI) instead of the newest of the previous stage")
    data_uri: Optional[str] = Field(None, description="post-training data (JSONL file or artefact) instead of the "
                                                      "built-in generated sets")
    prompts_uri: Optional[str] = Field(None, description="held-out prompts with exact answers ({prompt, answer} JSONL) "
                                                         "for the exact-match figure")
    skip: list[str] = Field(default_factory=list, description="stages the pipeline does not run (e.g. [reward, align]); "
                                                              "later stages start from the last stage that ran")

    @field_validator("skip")
    @classmethod
    def _known_stages(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in STAGES or name in ("pipeline", "smoke"):
                near = closest(name, STAGES)
                hint = f" (did you mean {near!r}?)" if near else ""
                raise ValueError(f"skip: unknown stage {name!r}{hint}")
        return names


def validate_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe with every section validated; raises ``RecipeInvalid`` naming the key.

    Unknown keys are refused at every depth (also in configs that do not forbid extras
    themselves), with the closest valid name.
    """
    sections = config_sections()
    top = {k: v for k, v in recipe.items() if k not in sections}
    known_top = set(RunOptions.model_fields)
    for key in top:
        if key not in known_top:
            near = closest(key, known_top | set(sections))
            hint = f" (did you mean {near!r}?)" if near else ""
            raise RecipeInvalid(f"unknown recipe section or option {key!r}{hint}; sections: {', '.join(sections)}")
    out = {"options": _validate(RunOptions, top, "")}
    for section, entrypoint in sections.items():
        if section in recipe:
            data = recipe[section]
            if data is None:
                data = {}
            if not isinstance(data, dict):
                raise RecipeInvalid(f"{section}: expected a mapping of fields, got {data!r}")
            out[section] = _validate(_load(entrypoint), data, section)
    return out


class RecipeInvalid(ValueError):
    """A recipe or ``--set`` value that no stage config accepts (the message names the key)."""


def _validate(cls: type[BaseModel], data: dict, path: str) -> BaseModel:
    from pydantic import ValidationError

    check_unknown_keys(cls, data, path)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise RecipeInvalid(format_validation_error(err, path)) from None


def check_unknown_keys(cls: type[BaseModel], data: Any, path: str) -> None:
    """Refuse keys ``cls`` has no field for, recursing into nested models and lists of them."""
    if not isinstance(data, dict):
        return
    fields = cls.model_fields
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            near = closest(str(key), fields)
            if near:
                hint = f" (did you mean {(path + '.' if path else '') + near!r}?)"
            else:
                names = list(fields)
                hint = f"; {cls.__name__} has {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}"
            raise RecipeInvalid(f"{where}: unknown field{hint}")
        sub = _model_of(fields[key].annotation)
        if sub is None:
            continue
        if isinstance(value, dict):
            check_unknown_keys(sub, value, where)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                check_unknown_keys(sub, item, f"{where}[{i}]")


def _model_of(annotation) -> type[BaseModel] | None:
    """The pydantic model inside ``Model``, ``Optional[Model]`` or ``list[Model]``, if any."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err, path: str = "", limit: int = 2) -> str:
    """One line per problem (at most ``limit``): ``section.field: message (got value)``."""
    lines = []
    for e in err.errors()[:limit]:
        loc = ".".join(str(p) for p in (path, *e["loc"]) if p != "")
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or e["type"] == "value_error" else f" (got {got!r})"
        lines.append(f"{loc or path or 'config'}: {msg}{shown}")
    more = len(err.errors()) - limit
    if more > 0:
        lines[-1] += f" (and {more} more)"
    return "\n".join(lines)
