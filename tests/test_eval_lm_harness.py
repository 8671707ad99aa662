"""lm-eval-harness runs offline with the `moeflow` model on local-file tasks, and agrees with moeflow's own runners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from moeflow.models import ModelConfig, MoETransformer  # noqa: E402
from moeflow.models.eval.lm import ModelLM  # noqa: E402
from moeflow.models.hf import export_hf  # noqa: E402
from moeflow.models.tokenizer import train_bpe  # noqa: E402
from moeflow.platform import model_refs as model_ref  # noqa: E402
from moeflow.platform.eval import lm_harness  # noqa: E402
from moeflow.platform.eval.runners import run_task  # noqa: E402
from moeflow.platform.eval.tasks import CONFIG_DIR, load_task, load_task_data  # noqa: E402

MC_YAML = """
task: moeflow_arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{choices.index(answer)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
BPB_YAML = """
task: moeflow_stdlib_bpb
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""
GEN_YAML = """
task: moeflow_arith_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_cpu_thread) -> Path:
    texts = [line for line in (CONFIG_DIR / "arith.jsonl").read_text().splitlines()] * 2
    tok = train_bpe(texts, vocab_size=400)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, max_seq_len=128))
    out = tmp_path_factory.mktemp("hf")
    export_hf(model, out, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    tok.save(out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    (d / "mc.yaml").write_text(MC_YAML.format(data=CONFIG_DIR / "arith_mc.jsonl"))
    (d / "bpb.yaml").write_text(BPB_YAML.format(data=CONFIG_DIR / "stdlib_docs.jsonl"))
    (d / "gen.yaml").write_text(GEN_YAML.format(data=CONFIG_DIR / "arith.jsonl"))
    return d


@pytest.mark.slow
def test_lm_eval_scores_local_tasks_like_moeflow_does(model_dir, task_dir):
    res = lm_harness.evaluate(str(model_dir), ["moeflow_arith_mc", "moeflow_stdlib_bpb", "moeflow_arith_gen"],
                              include_path=str(task_dir), batch_size=4, log_samples=True, limit=12)
    r = res["results"]
    loaded = model_ref.load(str(model_dir))
    lm = ModelLM(loaded.model, loaded.tokenizer, batch_size=4)

    ours_mc = run_task(load_task_data(load_task("arith_mc").model_copy(update={"fewshot": 0, "limit": 12})), lm)
    assert r["moeflow_arith_mc"]["acc,none"] == pytest.approx(ours_mc.metrics["acc"])
    assert r["moeflow_arith_mc"]["acc_norm,none"] == pytest.approx(ours_mc.metrics["acc_norm"])

    ours_bpb = run_task(load_task_data(load_task("stdlib_bpb").model_copy(update={"limit": 12})), lm)
    assert r["moeflow_stdlib_bpb"]["bits_per_byte,none"] == pytest.approx(ours_bpb.metrics["bpb"], rel=1e-6)

    samples = res["samples"]["moeflow_arith_gen"]
    prompts = [loaded.tokenizer.encode(s["doc"]["prompt"] + "\nAnswer:") for s in samples]
    expected = lm.generate(prompts, max_new_tokens=6, stop=["\n"], stop_at_end_of_turn=False)
    assert [s["resps"][0][0] for s in samples] == expected
    assert 0.0 <= r["moeflow_arith_gen"]["exact_match,none"] <= 1.0


@pytest.mark.slow
def test_the_command_line_runs_offline(model_dir, task_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "moeflow.platform.eval.lm_harness", "--model", "moeflow",
                           "--model_args", f"model={model_dir}", "--batch_size", "4", "--tasks", "moeflow_arith_mc",
                           "--include_path", str(task_dir), "--limit", "4", "--output_path", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moeflow_arith_mc" in proc.stdout and "acc" in proc.stdout
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert 0.0 <= results["results"]["moeflow_arith_mc"]["acc,none"] <= 1.0


def test_adapter_answers_the_three_request_types_like_model_lm(model_dir):
    """Fast: the registered class, fed lm-eval Instances directly (no task machinery)."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    lm_harness.register()
    lm = get_model("moeflow").create_from_arg_string(f"model={model_dir}", {"batch_size": 3, "device": "cuda"})
    ref = ModelLM(lm.loaded.model, lm.loaded.tokenizer, batch_size=1)

    def inst(kind, args, i):
        return Instance(request_type=kind, doc={}, arguments=args, idx=i)

    pairs = [("12 + 30 =", " 42"), ("", "hello"), ("What is 1 + 1?\nAnswer:", " 2")]
    got = lm.loglikelihood([inst("loglikelihood", p, i) for i, p in enumerate(pairs)])
    assert [g[0] for g in got] == pytest.approx([r[0] for r in ref.loglikelihood(pairs)], abs=2e-4)
    texts = ["What is 12 + 30? 42", "a longer text " * 30]
    rolled = lm.loglikelihood_rolling([inst("loglikelihood_rolling", (t,), i) for i, t in enumerate(texts)])
    assert rolled == pytest.approx(ref.loglikelihood_rolling(texts), abs=2e-3)
    reqs = [inst("generate_until", ("What is", {"until": ["\n"], "max_gen_toks": 5}), 0),
            inst("generate_until", ("12 +", {"until": "3", "max_gen_toks": 4}), 1)]
    outs = lm.generate_until(reqs)
    tok = lm.loaded.tokenizer
    assert outs[0] == ref.generate([tok.encode("What is")], max_new_tokens=5, stop=["\n"], stop_at_end_of_turn=False)[0]
    assert outs[1] == ref.generate([tok.encode("12 +")], max_new_tokens=4, stop=["3"], stop_at_end_of_turn=False)[0]
    assert lm.loaded.model.lm_head.weight.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_unknown_model_reference_is_one_line(tmp_path):
    with pytest.raises(model_ref.ModelRefError, match="cannot resolve model"):
        model_ref.resolve("no such thing here")
    with pytest.raises(model_ref.ModelRefError, match="neither an HF export"):
        model_ref.load(str(tmp_path))
