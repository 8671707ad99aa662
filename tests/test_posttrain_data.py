"""Post-training data: TRL formats validated with line numbers, bad records quarantined; the generated sets."""

from __future__ import annotations

import json

import pytest

from moeflow.platform.catalog import Catalog
from moeflow.platform.posttrain.data import PostTrainDataError, load_data, parse_jsonl
from moeflow.platform.posttrain.generated import (GeneratedDataConfig, build_sets, split_of, stdlib_texts,
                                                  write_generated_sets)
from moeflow.platform.store.local import LocalStore


def _jsonl(*rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode() + b"\n"


GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_chat_lines_are_validated_and_bad_ones_quarantined_by_line():
    data = _jsonl(GOOD_CHAT, "{not json", {"messages": [{"role": "user", "content": "only a question"}]},
                  {"messages": [{"role": "robot", "content": "x"}]}, [1, 2], "", GOOD_CHAT)
    out = parse_jsonl(data, "chat", "mem://chat.jsonl")
    assert [r.line for r in out.records] == [1, 7]
    got = {(q.location, q.reason) for q in out.quarantined}
    assert got == {("mem://chat.jsonl:2", "malformed_json"), ("mem://chat.jsonl:3", "no_assistant_turn"),
                   ("mem://chat.jsonl:4", "bad_messages"), ("mem://chat.jsonl:5", "not_an_object")}
    assert "robot" in next(q.detail for q in out.quarantined if q.reason == "bad_messages")
    assert out.stats["quarantined"] == 4


def test_preference_formats_of_trl():
    data = _jsonl({"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                  {"messages": [{"role": "user", "content": "2+3?"}], "chosen": [{"role": "assistant", "content": "5"}],
                   "rejected": [{"role": "assistant", "content": "6"}]},
                  {"prompt": "x", "chosen": "same", "rejected": "same"},
                  {"prompt": "x", "chosen": "a"},
                  {"prompt": "x", "messages": [], "chosen": "a", "rejected": "b"})
    out = parse_jsonl(data, "preference", "p.jsonl")
    assert [(r.prompt[-1]["content"], r.chosen, r.rejected) for r in out.records] == [("2+2?", "4", "5"), ("2+3?", "5", "6")]
    assert [q.reason for q in out.quarantined] == ["identical_pair", "missing_reply", "ambiguous_prompt"]


def test_unusable_files_fail_in_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_jsonl("{", "[]"))
    with pytest.raises(PostTrainDataError) as err:
        load_data(str(bad), "chat")
    message = str(err.value)
    assert "\n" not in message and "no valid chat records" in message and "bad.jsonl:1" in message
    with pytest.raises(PostTrainDataError, match="no such file"):
        load_data(f"file://{tmp_path}/missing.jsonl", "chat")


def test_data_from_a_store_artifact_split(tmp_path):
    store = LocalStore(tmp_path / "store")
    with store.write_artifact("sets/chat") as w:
        w.put_bytes("train.jsonl", _jsonl(GOOD_CHAT, GOOD_CHAT))
        w.put_bytes("heldout.jsonl", _jsonl(GOOD_CHAT))
    uri = store.uri("sets/chat")
    assert len(load_data(uri, "chat").records) == 2
    assert len(load_data(uri, "chat", split="heldout").records) == 1
    with pytest.raises(PostTrainDataError, match="no dev.jsonl"):
        load_data(uri, "chat", split="dev")


SMALL = GeneratedDataConfig(max_functions=60, num_arithmetic=300, max_files=25, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def texts():
    return list(stdlib_texts(SMALL.max_files))


def test_generated_sets_are_deterministic_and_heldout_shares_no_source(texts):
    a, b = build_sets(SMALL, texts), build_sets(SMALL, texts)
    assert a == b
    c = build_sets(SMALL.model_copy(update={"seed": 1}), texts)
    assert c["prompt"]["train"] != a["prompt"]["train"]
    prompts = {s: {r["prompt"] for r in a["prompt"][s]} for s in ("train", "heldout")}
    assert prompts["heldout"] and not prompts["train"] & prompts["heldout"]
    def fn_names(split):
        return {m["content"] for r in a["chat"][split] for m in r["messages"] if m["content"].startswith("What does")}
    assert fn_names("heldout") and not fn_names("train") & fn_names("heldout")
    for record in a["prompt"]["heldout"][:50]:  # exact answers
        task, text = record["task"], record["prompt"]
        if task == "add":
            x, y = [int(t) for t in text.removeprefix("What is ").rstrip("?").split(" + ")]
            assert record["answer"] == str(x + y)
    for pair in a["preference"]["train"]:
        assert pair["chosen"] != pair["rejected"]
    kinds = {("What is" in p["prompt"], p["rejected"].lstrip("-").isdigit()) for p in a["preference"]["train"]}
    assert (True, True) in kinds  # wrong numbers
    assert 0.1 < sum(split_of(str(i), 0.2, 0) == "heldout" for i in range(2000)) / 2000 < 0.3


def test_write_generated_sets_registers_three_kinds(tmp_path, texts, monkeypatch):
    store = LocalStore(tmp_path / "store")
    monkeypatch.setattr("moeflow.platform.posttrain.generated.stdlib_texts", lambda n: iter(texts))
    with Catalog(f"sqlite:///{tmp_path / 'catalog.db'}") as catalog:
        out = write_generated_sets(store, SMALL, catalog=catalog, dataset="tiny")
        again = write_generated_sets(store, SMALL, catalog=catalog, dataset="tiny")
        assert again.chat_uri == out.chat_uri
        kinds = {d["kind"] for d in catalog.list_datasets()}
        assert kinds == {"chat_data", "preference_data", "prompt_data"}
    assert len(load_data(out.chat_uri, "chat", "heldout").records) == out.stats["chat"]["heldout"]
    assert len(load_data(out.preference_uri, "preference").records) == out.stats["preference"]["train"]
    assert all(r.answer for r in load_data(out.prompt_uri, "prompt").records)
