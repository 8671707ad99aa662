"""The serving engine's host (Python) cost per generated token, with a model that costs ~nothing.

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    # this tree vs an older checkout (a package root holding ``moeflow``), batches 32 and 128, same run
    PYTHONPATH=/tmp/pkg OMP_NUM_THREADS=1 python3 benchmarks/bench_engine_host.py \
        --old-pythonpath /tmp/pkg-old --batch 32 128 --profile

On a GPU the decode step is a CUDA-graph replay: the device works while the host runs
``Engine.step``'s Python (cancellations, per-row sampling, stop checks, log-probs, detokenisation,
``TokenOutput``s). At large batch that Python is what bounds the server. Here the model is
``TableModel``: the next-token logits are a row of a fixed random (V, V) table indexed by the last
token (one indexing op per call), so process time is the engine's own work. Everything else is the
real engine: ``SlotCache``, the bucketed static decode step (``decode_mode="static"``, the code a
CUDA graph replays, run eagerly), prefill batching, sampling, stop strings through ``TextStream``
with a real byte-level BPE tokenizer's ``decode`` (as ``ModelServer`` passes it), log-probs.

Load: ``--waves`` × B requests added at once into B slots (so B streams run and finished ones are
replaced), ``--prompt`` random prompt tokens, ``--new`` max tokens, a fixed mix of sampling
settings (``MIX``: greedy; seeded temperature with top-p / top-k; unseeded sampling; stop strings;
log-probs), or with ``--mix greedy`` greedy requests only (the HTTP benchmark's load).

Reported: host CPU µs per generated token = process time of the drain ÷ tokens generated (prefill
included), steps, and ATen ops dispatched per token (``TorchDispatchMode``, one extra drain): on a GPU
each is a kernel launch or a host read, so it tells what a CPU run cannot. Each package runs in its
own subprocess, old and new alternating for ``--rounds``; the best repeat per package is reported.

``--preset bench_ref --device cuda`` runs a real random model in graph mode instead (for the GPU
machine): there, process time per token beside wall time per token shows how much of the server's CPU
is the engine's Python and how much is the host waiting on the device (a CUDA sync spin-waits by
default, and that counts as process time); ``--profile`` (wall-clock cProfile) shows where.

The vocabulary is small (``--vocab``) on purpose: on a GPU the tensor work is device time, here it
would be CPU time, and a small V keeps it a small share of what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GREEDY = [dict(temperature=0.0)]  # what bench_serve.py's HTTP load sends
MIX = [  # SamplingParams keyword sets, cycled over requests
    dict(temperature=0.0),
    dict(temperature=0.0, stop=("\n\n", "def ")),
    dict(temperature=0.8, top_p=0.9, seed=1),
    dict(temperature=1.0, top_k=20, seed=2),
    dict(temperature=0.7, top_k=50, top_p=0.95),
    dict(temperature=0.0, logprobs=5),
    dict(temperature=1.0, seed=3, logprobs=2, stop=("return",)),
    dict(temperature=0.9),
]


def _tokenizer(vocab: int, path: Path):
    from moeflow.models.tokenizer import Tokenizer, train_bpe

    if path.exists():
        return Tokenizer.from_file(str(path))
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    tok = train_bpe((f.read_text(errors="ignore") for f in files), vocab_size=vocab, min_frequency=1,
                    max_train_bytes=1_000_000)
    tok.save(str(path))
    return tok


class _Out:
    def __init__(self, logits):
        self.logits = logits


class TableModel:
    """Looks like a ``MoETransformer`` to the engine; logits = ``table_VV[last token]``."""

    def __init__(self, vocab: int, max_seq_len: int) -> None:
        import torch

        from moeflow.models import ModelConfig, MoETransformer

        cfg = ModelConfig.preset("tiny").replace(vocab_size=vocab, hidden_size=16, num_layers=1, first_k_dense=1,
                                                 max_seq_len=max_seq_len)
        self._real = MoETransformer(cfg)  # only for its cache layout
        self.cfg, self.lm_head = cfg, self._real.lm_head
        g = torch.Generator().manual_seed(0)
        self.table_VV = torch.randn(vocab, vocab, generator=g) * 3.0

    def eval(self):
        return self

    def new_cache(self, *args, **kwargs):
        return self._real.new_cache(*args, **kwargs)

    def __call__(self, ids_BT, *, last_logits_only: bool = False, **kwargs):
        return _Out(self.table_VV[ids_BT[:, -1:] if last_logits_only else ids_BT])


def worker(args) -> None:
    import cProfile
    import pstats

    import torch

    torch.set_num_threads(1)
    import moeflow
    from moeflow.models.serving import Engine, SamplingParams

    tok = _tokenizer(args.vocab, Path(args.tokenizer))
    if args.preset:  # the real model on a GPU: wall time per token beside the process time
        from moeflow.models import ModelConfig, MoETransformer

        torch.manual_seed(0)
        cfg = ModelConfig.preset(args.preset).replace(max_seq_len=args.prompt + args.new + 8)
        model = MoETransformer(cfg).to(args.device, getattr(torch, args.dtype)).eval()
    else:
        model = TableModel(args.vocab, args.prompt + args.new + 8)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    num_ids = tok.vocab_size

    def decode(ids):  # what ModelServer passes; a random real model's ids beyond the tokenizer's are left out
        return tok.decode([i for i in ids if i < num_ids] if args.preset else ids, skip_special=True)

    rows = []
    for batch in args.batch:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(1, args.vocab, (args.prompt,), generator=g).tolist()
                   for _ in range(args.waves * batch)]
        best = None

        def engine_for(prompts):
            engine = Engine(model, max_batch=batch, prefill_chunk=args.prompt * batch, max_waiting=len(prompts),
                            decode=decode, default_stop_token_ids=(tok.eos_id,),
                            decode_mode="graph" if args.preset and args.device.startswith("cuda") else "static")
            engine.warmup()
            torch.manual_seed(0)
            mix = MIX if args.mix == "mixed" else GREEDY
            for i, p in enumerate(prompts):
                kw = dict(mix[i % len(mix)])
                if "seed" in kw:
                    kw["seed"] += 10 * i
                engine.add(str(i), p, SamplingParams(max_tokens=max(1, args.new - (i % 5) * 4), **kw))
            return engine

        num_reps = args.repeats + 1 + args.profile  # the first one warms up, the last one is profiled
        for rep in range(num_reps):
            engine = engine_for(prompts)
            prof = cProfile.Profile() if (args.profile and rep == num_reps - 1) else None
            made = steps = 0
            sync()
            t0, w0 = time.process_time(), time.perf_counter()
            if prof:
                prof.enable()
            while engine.has_work():
                made += sum(ev.token_id is not None for ev in engine.step())
                steps += 1
            if prof:
                prof.disable()
            sync()
            cpu, wall = time.process_time() - t0, time.perf_counter() - w0
            if rep and not prof and (best is None or cpu < best[0]):
                best = (cpu, wall)
            if prof:
                print(f"--- cProfile, {moeflow.__file__}, batch {batch} (tottime) ---", file=sys.stderr)
                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(args.top)
        rows.append({"batch": batch, "tokens": made, "steps": steps, "cpu_s": round(best[0], 4),
                     "us_per_token": round(1e6 * best[0] / made, 2),
                     "wall_us_per_token": round(1e6 * best[1] / made, 2),
                     "aten_ops_per_token": round(_count_ops(engine_for, prompts, args) / made, 2)})
    print(json.dumps({"package": os.path.dirname(os.path.dirname(moeflow.__file__)), "rows": rows}))


def _count_ops(engine_for, prompts, args) -> int:
    """ATen ops the engine dispatches over one drain: on a GPU each is a kernel launch (or a host read)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        num = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.num += 1
            return func(*args, **(kwargs or {}))

    engine = engine_for(prompts)
    with Count():
        while engine.has_work():
            engine.step()
    return Count.num


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--mix", choices=["mixed", "greedy"], default="mixed", help="MIX, or greedy requests only")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="old/new alternations")
    ap.add_argument("--profile", action="store_true", help="print a cProfile top list per package and batch")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--old-pythonpath", default=None, help="also run the engine from this package root")
    ap.add_argument("--tokenizer", default="/tmp/bench_engine_host_tok.json")
    ap.add_argument("--preset", default=None, help="a real random model of this preset instead of the table (GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", help="with --preset")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    cmd = [sys.executable, __file__, "--worker"] + [a for a in (argv or sys.argv[1:]) if a != "--worker"]
    paths = [("new", os.environ.get("PYTHONPATH", ""))]
    if args.old_pythonpath:
        paths.insert(0, ("old", args.old_pythonpath))
    results: dict[str, list] = {}
    for rnd in range(args.rounds):
        for name, pp in paths:
            env = dict(os.environ, PYTHONPATH=pp, OMP_NUM_THREADS="1")
            worker_cmd = [c for c in cmd if c != "--profile"] if rnd else cmd
            out = subprocess.run(worker_cmd, env=env, check=True, capture_output=True, text=True)
            if out.stderr.strip():
                print(out.stderr, file=sys.stderr)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            for row in got["rows"]:
                prev = results.setdefault(name, [None] * len(args.batch))
                i = args.batch.index(row["batch"])
                if prev[i] is None or row["us_per_token"] < prev[i]["us_per_token"]:
                    prev[i] = dict(row, package=got["package"])
    for name, rows in results.items():
        for row in rows:
            print(json.dumps({"tree": name, **row}))
    if "old" in results:
        for o, n in zip(results["old"], results["new"]):
            print(f"batch {o['batch']:4d}: old {o['us_per_token']:7.2f} us/token, new {n['us_per_token']:7.2f} "
                  f"us/token, {o['us_per_token'] / n['us_per_token']:.2f}x")


if __name__ == "__main__":
    main()
