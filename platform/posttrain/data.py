"""Post-training data in the formats users already have (TRL's), validated line by line.

* chat JSONL: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` with at
  least one assistant turn (an example without one has nothing to learn);
* preference JSONL: ``{"prompt": str | messages, "chosen": ..., "rejected": ...}`` or
  ``{"messages": [...], "chosen": ..., "rejected": ...}``; ``chosen``/``rejected`` are a string or
  TRL's conversational form, a list holding one assistant message;
* prompt JSONL (RL, evaluation): ``{"prompt": str | messages, "answer": str}`` (or ``"tests"``).

A data URI is a local ``.jsonl`` file, a store key/URI of a ``.jsonl`` file, or a store artefact
(a folder with a manifest) holding ``<split>.jsonl`` (``train.jsonl``, ``heldout.jsonl``). A malformed
line never stops a run: it is counted by reason and kept as a ``QuarantineRecord`` (location
``<uri>:<line>``, reason, detail), as curation's reader does; ``write_quarantine`` puts them in the
stage's output artefact. A file where every line is bad, or that does not exist, raises
``PostTrainDataError`` with one line that says so.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from moeflow.models.chat import ChatFormatError, validate_messages
from moeflow.platform.data.schema import QuarantineRecord

CHAT, PREFERENCE, PROMPT = "chat", "preference", "prompt"
QUARANTINE_FILE = "quarantine.jsonl"


class PostTrainDataError(ValueError):
    """Unusable post-training data (missing, empty, every record malformed); the message is one line."""


class _BadRecord(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class ChatRecord:
    messages: list[dict]
    line: int = 0


@dataclass
class PreferenceRecord:
    prompt: list[dict]  # messages ending with a user (or system) turn
    chosen: str
    rejected: str
    line: int = 0


@dataclass
class PromptRecord:
    prompt: list[dict]
    answer: str | None = None
    tests: Any = None
    line: int = 0


@dataclass
class LoadedData:
    kind: str
    location: str
    records: list = field(default_factory=list)
    quarantined: list[QuarantineRecord] = field(default_factory=list)

    @property
    def stats(self) -> dict:
        return {"records": len(self.records), "quarantined": len(self.quarantined),
                "quarantined_by_reason": dict(Counter(q.reason for q in self.quarantined))}


# ------------------------------------------------------------------ record validation
def _messages(value: Any, what: str) -> list[dict]:
    try:
        return validate_messages(value)
    except ChatFormatError as err:
        raise _BadRecord("bad_messages", f"{what}: {err}") from None


def _prompt(record: dict) -> list[dict]:
    if "prompt" in record and "messages" in record:
        raise _BadRecord("ambiguous_prompt", "has both 'prompt' and 'messages': give one")
    if "messages" in record:
        return _messages(record["messages"], "messages")
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _BadRecord("empty_prompt", "'prompt' is empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return _messages(prompt, "prompt")
    raise _BadRecord("missing_prompt", "needs 'prompt' (string or messages) or 'messages'")


def _reply(record: dict, key: str) -> str:
    value = record.get(key)
    if isinstance(value, list):  # TRL conversational: [{"role": "assistant", "content": ...}]
        msgs = _messages(value, key)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise _BadRecord("bad_reply", f"'{key}' as a list must hold exactly one assistant message")
        value = msgs[0]["content"]
    if not isinstance(value, str):
        raise _BadRecord("missing_reply", f"needs '{key}' (a string or one assistant message)")
    return value


def parse_chat(record: dict, line: int) -> ChatRecord:
    messages = _messages(record.get("messages"), "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRecord("no_assistant_turn", "no assistant message: nothing to learn")
    return ChatRecord(messages, line)


def parse_preference(record: dict, line: int) -> PreferenceRecord:
    prompt = _prompt(record)
    chosen, rejected = _reply(record, "chosen"), _reply(record, "rejected")
    if chosen == rejected:
        raise _BadRecord("identical_pair", "'chosen' and 'rejected' are identical")
    return PreferenceRecord(prompt, chosen, rejected, line)


def parse_prompt(record: dict, line: int) -> PromptRecord:
    prompt = _prompt(record)
    answer, tests = record.get("answer"), record.get("tests")
    if answer is None and tests is None:
        raise _BadRecord("missing_answer", "needs 'answer' (or 'tests') for its reward")
    if answer is not None and not isinstance(answer, str):
        raise _BadRecord("bad_answer", f"'answer' must be a string, got {type(answer).__name__}")
    return PromptRecord(prompt, answer, tests, line)


PARSERS: dict[str, Callable[[dict, int], Any]] = {CHAT: parse_chat, PREFERENCE: parse_preference, PROMPT: parse_prompt}


def parse_jsonl(data: bytes, kind: str, location: str) -> LoadedData:
    """Every line of ``data`` as a record of ``kind``, or a quarantine entry naming its line and problem."""
    if kind not in PARSERS:
        raise ValueError(f"unknown post-training data kind {kind!r}: choose from {', '.join(PARSERS)}")
    parse = PARSERS[kind]
    out = LoadedData(kind, location)
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{location}:{number}"
        try:
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise _BadRecord("malformed_json", f"not JSON ({err.msg if hasattr(err, 'msg') else err})") from None
            if not isinstance(record, dict):
                raise _BadRecord("not_an_object", f"a JSON {type(record).__name__}, expected an object")
            out.records.append(parse(record, number))
        except _BadRecord as bad:
            out.quarantined.append(QuarantineRecord(where, bad.reason, str(bad), source=location, num_bytes=len(raw)))
    if not out.records:
        reasons = ", ".join(f"{r} ×{n}" for r, n in Counter(q.reason for q in out.quarantined).most_common(3))
        first = out.quarantined[0] if out.quarantined else None
        detail = f"; first: {first.location}: {first.detail}" if first else ""
        raise PostTrainDataError(f"{location}: no valid {kind} records ({reasons or 'empty file'}){detail}")
    return out


# ------------------------------------------------------------------ where the bytes come from
def read_bytes(uri: str, split: str = "train") -> tuple[bytes, str]:
    """The JSONL bytes of ``uri`` (a local file, a store file, or ``<split>.jsonl`` of an artefact) and its location."""
    path = Path(uri.removeprefix("file://")) if not uri.startswith("s3://") else None
    if path is not None and path.is_file():
        return path.read_bytes(), str(path)
    if path is not None and path.is_dir() and (path / f"{split}.jsonl").is_file():
        return (path / f"{split}.jsonl").read_bytes(), str(path / f"{split}.jsonl")
    from moeflow.platform.store import store_for_uri

    try:
        store, key = store_for_uri(uri)
    except Exception as err:  # not a URI any store understands
        raise PostTrainDataError(f"{uri}: not a local file nor a store URI ({err})") from None
    if store.artifact_exists(key):
        art = store.read_artifact(key)
        name = f"{split}.jsonl"
        if name not in art.names():
            raise PostTrainDataError(f"{uri}: artefact has no {name} (has {', '.join(art.names()[:8])})")
        return art.get_bytes(name), f"{store.uri(key).rstrip('/')}/{name}"
    if store.exists(key):
        return store.get_bytes(key), store.uri(key)
    raise PostTrainDataError(f"{uri}: no such file or artefact")


def load_data(uri: str, kind: str, split: str = "train") -> LoadedData:
    data, location = read_bytes(uri, split)
    return parse_jsonl(data, kind, location)


def write_quarantine(writer, *loaded: LoadedData) -> int:
    """Add ``quarantine.jsonl`` (every bad record of ``loaded``) to an open ArtifactWriter; returns the count."""
    rows = [q.to_dict() for data in loaded for q in data.quarantined]
    writer.put_bytes(QUARANTINE_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    return len(rows)


def to_jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
