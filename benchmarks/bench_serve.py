"""Serving engine throughput: continuous batching (``models/serving``) beside ``generate`` on the same model.

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_serve.py --preset tiny --device cpu
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_serve.py --preset bench_ref --device cuda --dtype bfloat16

Rows (greedy, random weights, ``--prompt`` token random prompts, ``--new`` new tokens each):
- ``generate batch B``: one ``generate()`` call over B prompts (all start together; the peer);
- ``engine batch B``: the same B requests through ``Engine`` (all added at once), stepped to the end;
- ``engine staggered``: 4·B requests arriving ``--stagger`` steps apart into B slots (continuous
  batching's case: requests join and leave between steps; ``generate`` would wait for whole batches).
tokens/s = generated tokens ÷ wall time (prefill included). ``--quantize int8`` runs the engine on
the INT8 weight-only model too (``models/quant.py``), with the weight bytes beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.generation import generate
from moeflow.models.quant import model_bytes, quantize_int8
from moeflow.models.serving import Engine, SamplingParams


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_generate(model, prompts, new: int, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    out = generate(model, prompts, new)
    _sync(device)
    return sum(len(x) for x in out.tokens) / (time.perf_counter() - t)


def bench_engine(model, prompts, new: int, device: str, max_batch: int, stagger: int = 0) -> float:
    engine = Engine(model, max_batch=max_batch, prefill_chunk=512)
    pending = list(enumerate(prompts))
    made = step = 0
    _sync(device)
    t = time.perf_counter()
    while pending or engine.has_work():
        while pending and (stagger == 0 or step % stagger == 0):
            i, p = pending.pop(0)
            engine.add(str(i), p, SamplingParams(max_tokens=new, temperature=0.0))
            if stagger:
                break
        made += sum(ev.token_id is not None for ev in engine.step())
        step += 1
    _sync(device)
    return made / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--stagger", type=int, default=4)
    ap.add_argument("--quantize", default="none", choices=["none", "int8"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset).replace(max_seq_len=max(256, args.prompt + args.new + 8))
    dtype = getattr(torch, args.dtype)
    model = MoETransformer(cfg).to(args.device, dtype).eval()
    models = {"bf16/fp32": model}
    if args.quantize == "int8":
        q = copy.deepcopy(model)
        quantize_int8(q)
        models["int8"] = q
    rows = []
    for label, m in models.items():
        for b in (int(x) for x in args.batches.split(",")):
            g = torch.Generator().manual_seed(b)
            prompts = [torch.randint(1, cfg.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(b)]
            bench_engine(m, prompts[:1], 4, args.device, b)  # warm-up
            row = {"weights": label, "batch": b, "weight_bytes": model_bytes(m),
                   "generate_tok_s": round(bench_generate(m, prompts, args.new, args.device), 1),
                   "engine_tok_s": round(bench_engine(m, prompts, args.new, args.device, b), 1),
                   "engine_staggered_tok_s": round(bench_engine(m, prompts * 4, args.new, args.device, b,
                                                                args.stagger), 1)}
            rows.append(row)
            print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as fh:
            for row in rows:
                fh.write(json.dumps({**vars(args), **row}) + "\n")


if __name__ == "__main__":
    main()
