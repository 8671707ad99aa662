"""CPU training step of the tiny recipe: 1 intra-op thread (what a CPU training worker now uses) vs
torch's default (one per core, what an in-process run used before), on an idle and on a loaded machine.

The tiny recipe's shapes: ``tiny`` preset, vocab 2,048, 16 rows x 128 tokens, AdamW. Settings alternate
in blocks of ``--steps`` steps, ``--reps`` times, so load that changes over time hits both alike;
``--busy N`` starts N spinning processes first (a loaded machine, reproducibly).

    python benchmarks/bench_cpu_threads.py --busy 0
    python benchmarks/bench_cpu_threads.py --busy 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--busy", type=int, default=0, help="spinning processes loading the machine")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import torch

    from moeflow.models import ModelConfig, MoETransformer
    from moeflow.models.train.optim import build_adamw

    default_threads = torch.get_num_threads()
    cfg = ModelConfig.preset("tiny").replace(vocab_size=2048)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, decay_embeddings=True)
    batch = torch.randint(0, 2048, (16, 129))

    def step() -> None:
        out = model(batch[:, :-1], targets=batch[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        step()  # warm-up
        seconds: dict[int, list[float]] = {1: [], default_threads: []}
        for _ in range(args.reps):
            for n in seconds:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                seconds[n].append((time.perf_counter() - t0) / args.steps)
    finally:
        stop.set()
        for p in spinners:
            p.join()
    tokens = 16 * 128
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "busy": args.busy,
                      "date": time.strftime("%Y-%m-%d %H:%M"),
                      **{f"threads={n}": {"median_s_per_step": round(statistics.median(v), 3),
                                          "tokens_per_s": round(tokens / statistics.median(v))}
                         for n, v in seconds.items()}}, indent=2))


if __name__ == "__main__":
    main()
