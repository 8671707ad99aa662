"""Tasks as data: YAML + JSONL loading (paths, file:// URIs, shipped tasks), quarantine, runners on a tiny model."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.eval.lm import ModelLM
from moeflow.models.tokenizer import train_bpe
from moeflow.platform.eval.runners import run_task
from moeflow.platform.eval.tasks import CONFIG_DIR, TaskError, TaskSpec, load_task, load_task_data

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def lm_parts(one_cpu_thread):
    texts = [json.loads(line).get("prompt", "") + " " + json.loads(line).get("answer", "")
             for line in (CONFIG_DIR / "arith.jsonl").read_text().splitlines()] * 3
    tok = train_bpe(texts + ["def f(x):\n    return x\n"] * 10, vocab_size=400)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, max_seq_len=256)).eval()
    return model, tok


def _write(tmp_path, name: str, spec: dict, records: list) -> str:
    (tmp_path / f"{name}.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    (tmp_path / f"{name}.yaml").write_text(json.dumps({"name": name, "data": f"{name}.jsonl", **spec}))
    return str(tmp_path / f"{name}.yaml")


def test_every_shipped_task_loads_with_records():
    assert {"arith", "arith_mc", "python_mc", "stdlib_bpb", "humaneval", "stdlib_doctests"} <= set(SHIPPED)
    for name in SHIPPED:
        data = load_task_data(load_task(name))
        assert data.items and not data.quarantined, name
    assert len(load_task_data(load_task("humaneval")).items) == 164


def test_malformed_records_are_quarantined_with_their_line(tmp_path):
    path = _write(tmp_path, "mc", {"type": "multiple_choice"}, [
        {"question": "q1", "choices": ["a", "b"], "answer": 1},
        "{not json",
        {"question": "q2", "choices": ["a", "b"], "answer": "c"},
        {"question": "q3", "choices": ["a", "b"]},
        [1, 2],
        {"question": "q4", "choices": ["a", "b"], "answer": "a"},
    ])
    data = load_task_data(load_task(path))
    assert [i.answer for i in data.items] == [1, 0] and data.ids == ["1", "6"]
    assert [q.line for q in data.quarantined] == [2, 3, 4, 5]
    assert "not one of the choices" in data.quarantined[1].reason and "answer" in data.quarantined[2].reason


def test_bad_task_files_fail_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntype: generate\ndata: x.jsonl\nmax_new_token: 3\n")
    with pytest.raises(TaskError, match="bad.yaml: unknown field 'max_new_token' .*did you mean 'max_new_tokens'"):
        load_task(bad)
    with pytest.raises(TaskError, match="shipped tasks: .*arith"):
        load_task("no_such_task")
    with pytest.raises(TaskError, match="not found"):
        load_task_data(TaskSpec(name="x", type="loglik", data="missing.jsonl", base_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="num_samples"):
        TaskSpec(name="c", type="code", data="humaneval", ks=[5], num_samples=2)


def test_data_from_a_file_uri_of_the_store(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    spec = TaskSpec(name="t", type="loglik", data=(tmp_path / "t.jsonl").as_uri())
    assert load_task_data(spec).items == [{"text": "hello world"}]


def test_fewshot_records_are_not_scored(tmp_path):
    recs = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]
    data = load_task_data(load_task(_write(tmp_path, "g", {"type": "generate", "fewshot": 2}, recs)))
    assert len(data.fewshot) == 2 and len(data.items) == 4 and data.ids[0] == "3"


def test_multiple_choice_runner_is_batch_invariant_and_acc_follows_the_scores(lm_parts):
    model, tok = lm_parts
    data = load_task_data(load_task("arith_mc"))
    results = [run_task(data, ModelLM(model, tok, batch_size=bs)) for bs in (1, 3, 8)]
    for r in results[1:]:
        for a, b in zip(results[0].items, r.items):
            assert a["logprobs"] == pytest.approx(b["logprobs"], abs=2e-4)
            assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])
    r = results[0]
    assert 0.0 <= r.metrics["acc"] <= 1.0 and r.metrics["num_items"] == 37
    assert r.metrics["acc"] == pytest.approx(sum(row["acc"] for row in r.items) / 37)


def test_generate_runner_scores_exact_match_of_the_last_number(lm_parts, tmp_path):
    model, tok = lm_parts
    data = load_task_data(load_task("arith"))
    r = run_task(data, ModelLM(model, tok, batch_size=4))
    assert r.metrics["num_items"] == 37 and 0.0 <= r.metrics["exact_match"] <= 1.0
    assert all("completion" in row for row in r.items)
    chat = run_task(load_task_data(load_task("arith_chat")), ModelLM(model, tok, batch_size=4))
    assert chat.metrics["num_items"] == 37


def test_loglik_runner_reports_bpb_consistent_with_perplexity(lm_parts):
    model, tok = lm_parts
    r = run_task(load_task_data(load_task("stdlib_bpb")), ModelLM(model, tok, batch_size=4))
    m = r.metrics
    total_lp = sum(row["logprob"] for row in r.items)
    assert m["bpb"] == pytest.approx(-total_lp / math.log(2) / sum(row["bytes"] for row in r.items))
    assert m["perplexity"] == pytest.approx(math.exp(m["nats_per_token"]))
    # an untrained model is near-uniform: about log(V) nats per token
    assert m["nats_per_token"] == pytest.approx(math.log(tok.vocab_size), rel=0.15)


@pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")
def test_code_runner_generates_and_runs_in_the_sandbox(lm_parts):
    model, tok = lm_parts
    spec = load_task("stdlib_doctests").model_copy(update={"limit": 3, "max_new_tokens": 8, "num_samples": 2,
                                                             "temperature": 1.0, "ks": [1, 2]})
    r = run_task(load_task_data(spec), ModelLM(model, tok, batch_size=6), max_workers=2)
    assert r.metrics["pass_at_1"] == 0.0 and r.metrics["pass_at_2"] == 0.0  # an untrained model writes no working code
    assert [row["num_samples"] for row in r.items] == [2, 2, 2]


@pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")
def test_code_runner_pairs_each_completion_with_its_problem(lm_parts):
    """An LM that answers each prompt with that problem's canonical body scores pass_at_1 = 1."""
    model, tok = lm_parts
    data = load_task_data(load_task("humaneval").model_copy(update={"limit": 4}))
    by_prompt = {tuple(tok.encode(p.prompt, add_bos=True)): p.canonical_solution for p in data.items}

    class Oracle(ModelLM):
        def generate(self, prompts, **kw):
            return [by_prompt[tuple(p)] + "\ndef junk():\n    raise SystemExit(1)\n" for p in prompts]

    r = run_task(data, Oracle(model, tok), max_workers=2)
    assert r.metrics["pass_at_1"] == 1.0
    shifted = {k: v for k, v in zip(by_prompt, list(by_prompt.values())[1:] + list(by_prompt.values())[:1])}
    by_prompt.clear()
    by_prompt.update(shifted)
    assert run_task(data, Oracle(model, tok), max_workers=2).metrics["pass_at_1"] == 0.0
