"""What fp32 routing costs under bf16 autocast (issue 9): train-step tokens/s, router fp32 vs bf16.

The router is documented fp32 (DeepSeek-V3 computes routing in fp32), but under autocast
``F.linear`` ran its logits in bf16; ``Router.forward`` now turns autocast off around them. This
measures the price in the mode where it matters: fp32 master weights + bf16 autocast (with bf16
parameters and no autocast the router was already fp32, so that mode is the control: the two
variants must tie there). The "bf16" variant is the router logits as they were before the change,
patched in for the measurement only. Both variants run in one process, interleaved (A B A B ...),
on the same weights and batches; it also reports how many top-k choices the two variants disagree
on for the same input (what the bf16 rounding changed).

    python3 benchmarks/bench_router_precision.py                 # GPU: bench_ref, B 8 × 2048
    python3 benchmarks/bench_router_precision.py --smoke         # CPU: tiny, a few steps (checks it runs)

Prints one JSON line per (mode, variant) and a table; ``--out`` appends the JSON lines to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.moe import Router
from moeflow.models.train.optim import build_adamw

FP32_LOGITS = Router.logits


def bf16_autocast_logits(self, x_TD):
    """The router logits before the change: the linear follows autocast (bf16 logits)."""
    dt = torch.promote_types(x_TD.dtype, torch.float32)
    return F.linear(x_TD.to(dt), self.weight.to(dt))


VARIANTS = {"router_fp32": FP32_LOGITS, "router_bf16_autocast": bf16_autocast_logits}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(mode: str, cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int, device) -> list[dict]:
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(device)
    autocast = mode == "fp32_params+autocast"
    if not autocast:
        model = model.to(torch.bfloat16)
    opt = build_adamw(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(device) for _ in range(4)]
    times = {name: [] for name in VARIANTS}

    def step(i: int) -> None:
        rows = batches[i % len(batches)]
        with (torch.autocast(device.type, dtype=torch.bfloat16) if autocast else _Null()):
            out = model(rows[:, :-1], targets=rows[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup + steps):
        for name, logits in VARIANTS.items():
            Router.logits = logits
            _sync(device)
            t0 = time.perf_counter()
            step(i)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    Router.logits = FP32_LOGITS
    disagree = _choice_disagreement(model, batches[0], autocast)
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        rows.append({"mode": mode, "variant": name, "step_s": median, "tokens_per_s": batch * seq_len / median,
                     "steps": steps, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "topk_choice_disagreement": disagree})
    return rows


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def _choice_disagreement(model, rows, autocast: bool) -> float:
    """Fraction of (token, layer) top-k sets that differ between the two router variants, same input."""
    choices = {}
    for name, logits in VARIANTS.items():
        Router.logits = logits
        with (torch.autocast(rows.device.type, dtype=torch.bfloat16) if autocast else _Null()):
            out = model(rows[:, :-1], return_router_choices=True)
        choices[name] = out.aux["router_choices"].sort(dim=-1).values
    Router.logits = FP32_LOGITS
    a, b = choices.values()
    return float((a != b).any(dim=-1).double().mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 3 steps: checks the script runs")
    p.add_argument("--preset", default="bench_ref")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.seq_len, args.steps, args.warmup = "tiny", 2, 64, 3, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cfg = ModelConfig.preset(args.preset)
    rows = []
    for mode in ("fp32_params+autocast", "bf16_params"):
        rows += measure(mode, cfg, args.batch, args.seq_len, args.steps, args.warmup, device)
    for row in rows:
        print(json.dumps(row))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\n{'mode':24} {'variant':22} {'tok/s':>12} {'step ms':>9} {'top-k differ':>13}")
    for row in rows:
        print(f"{row['mode']:24} {row['variant']:22} {row['tokens_per_s']:12,.0f} {row['step_s'] * 1e3:9.1f} "
              f"{row['topk_choice_disagreement']:13.4f}")
    for mode in ("fp32_params+autocast", "bf16_params"):
        a, b = (r for r in rows if r["mode"] == mode)
        print(f"{mode}: router fp32 / bf16 tokens/s = {a['tokens_per_s'] / b['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
