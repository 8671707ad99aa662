"""Score one task's items with a ``ModelLM``: one runner per task type, each returning metrics + per-item rows.

| type | metrics |
| --- | --- |
| multiple_choice | ``acc`` (summed log-likelihood), ``acc_norm`` (per character) |
| generate | ``exact_match`` (extracted answer vs reference, normalised) |
| loglik | ``bpb`` (bits per UTF-8 byte), ``perplexity`` (per token), ``nats_per_token`` |
| code | ``pass@k`` for each k (unbiased estimator, ``num_samples`` per problem, sandboxed) |

Every result also carries ``num_items`` and ``items_per_s`` (wall clock of scoring, the
throughput figure of the evaluation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from moeflow.models.eval.extract import exact_match, extract_answer
from moeflow.models.eval.lm import ModelLM
from moeflow.models.eval.loglik import bits_per_byte
from moeflow.models.eval.prompts import choice_strings, context_ids, mc_predictions, mc_requests

from .code import STOP_STRINGS, check_completions, pass_at_k_report, truncate_completion
from .sandbox import SandboxLimits
from .tasks import TaskData, fewshot_pairs


@dataclass
class TaskResult:
    name: str
    type: str
    metrics: dict[str, float]
    items: list[dict] = field(default_factory=list)   # per item: id + its scores

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "metrics": self.metrics, "items": self.items}


def _multiple_choice(data: TaskData, lm: ModelLM) -> tuple[dict, list[dict]]:
    fmt = data.spec.prompt_format(fewshot_pairs(data))
    requests, spans = [], []
    for item in data.items:
        reqs = mc_requests(lm.tokenizer, item, fmt)
        spans.append((len(requests), len(reqs)))
        requests += reqs
    scores = lm.score_ids(requests)
    rows, acc, acc_norm = [], 0, 0
    for item_id, item, (start, n) in zip(data.ids, data.items, spans):
        lps = [s.logprob for s in scores[start:start + n]]
        pred, pred_norm = mc_predictions(lps, choice_strings(item, fmt))
        acc += pred == item.answer
        acc_norm += pred_norm == item.answer
        rows.append({"id": item_id, "acc": float(pred == item.answer), "acc_norm": float(pred_norm == item.answer),
                     "logprobs": lps})
    return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows)}, rows


def _generate(data: TaskData, lm: ModelLM, seed: int) -> tuple[dict, list[dict]]:
    spec = data.spec
    fmt = spec.prompt_format(fewshot_pairs(data))
    prompts = [context_ids(lm.tokenizer, item["prompt"], fmt) for item in data.items]
    completions = lm.generate(prompts, max_new_tokens=spec.max_new_tokens, stop=spec.stop,
                              temperature=spec.temperature, top_p=spec.top_p, seed=seed)
    rows = []
    for item_id, item, completion in zip(data.ids, data.items, completions):
        pred = extract_answer(completion, spec.regex, spec.pick)
        rows.append({"id": item_id, "completion": completion, "prediction": pred,
                     "exact_match": float(exact_match(pred, item["answer"], spec.lowercase))})
    return {"exact_match": sum(r["exact_match"] for r in rows) / len(rows)}, rows


def _loglik(data: TaskData, lm: ModelLM) -> tuple[dict, list[dict]]:
    texts = [item["text"] for item in data.items]
    totals = lm.loglikelihood_rolling(texts, stride=data.spec.stride)
    num_bytes = [len(t.encode("utf-8")) for t in texts]
    num_tokens = [len(lm.tokenizer.encode(t, add_bos=False)) for t in texts]
    rows = [{"id": i, "logprob": lp, "bytes": b, "tokens": n, "bpb": bits_per_byte(lp, b)}
            for i, lp, b, n in zip(data.ids, totals, num_bytes, num_tokens)]
    nats_per_token = -sum(totals) / sum(num_tokens)
    return {"bpb": bits_per_byte(sum(totals), sum(num_bytes)), "nats_per_token": nats_per_token,
            "perplexity": math.exp(min(nats_per_token, 50.0))}, rows


def _code(data: TaskData, lm: ModelLM, seed: int, max_workers: int | None) -> tuple[dict, list[dict]]:
    spec = data.spec
    n = spec.num_samples
    prompts = [lm.tokenizer.encode(p.prompt, add_bos=True) for p in data.items for _ in range(n)]
    raw = lm.generate(prompts, max_new_tokens=spec.max_new_tokens, stop=STOP_STRINGS,
                      temperature=spec.temperature, top_p=spec.top_p, seed=seed)
    completions = [[truncate_completion(c) for c in raw[i * n:(i + 1) * n]] for i in range(len(data.items))]
    passed = check_completions(data.items, completions, limits=SandboxLimits(timeout_s=spec.timeout_s,
                               memory_mb=spec.memory_mb), max_workers=max_workers)
    rows = [{"id": i, "num_samples": len(p), "num_correct": int(sum(p)), "completion": c[0]}
            for i, p, c in zip(data.ids, passed, completions)]
    return pass_at_k_report(passed, spec.ks), rows


def run_task(data: TaskData, lm: ModelLM, *, seed: int = 0, max_workers: int | None = None) -> TaskResult:
    """Score every item of ``data`` with ``lm``."""
    start = time.perf_counter()
    kind = data.spec.type
    if kind == "multiple_choice":
        metrics, rows = _multiple_choice(data, lm)
    elif kind == "generate":
        metrics, rows = _generate(data, lm, seed)
    elif kind == "loglik":
        metrics, rows = _loglik(data, lm)
    else:
        metrics, rows = _code(data, lm, seed, max_workers)
    elapsed = time.perf_counter() - start
    metrics = {**metrics, "num_items": float(len(rows)), "items_per_s": len(rows) / max(elapsed, 1e-9)}
    return TaskResult(data.spec.name, kind, metrics, rows)
