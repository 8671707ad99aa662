"""The AdamW step alone on ``bench_ref``'s parameters (issue 16): torch's fused, torch's for-each, inductor's
compiled for-each and moeflow's Triton kernel (models/kernels/adamw.py), same run, same tensors.

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_adamw.py --out results/adamw.jsonl
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_adamw.py --graph     # each step replayed as a CUDA graph

The model is built on the device in bf16 (819 M parameters; AdamW states bf16 like the parameters, as
``bench_model.py``'s train step), the gradients are fixed random tensors (the kernels only read them).
Implementations (``--impls``, each optionally with ``+key=value`` options):
  - ``fused``         torch.optim.AdamW(fused=True) — what bench_model.py's train step uses;
  - ``foreach``       torch.optim.AdamW(foreach=True);
  - ``compiled``      the for-each AdamW with its ``step`` under ``torch.compile`` (inductor's compiled optimiser);
  - ``triton``        TritonAdamW (fp32 arithmetic); ``triton_exact``: its ``exact=True`` (torch's double
                      sub-expressions, bit for bit); options ``+block=4096+warps=8`` set its block size and warps.
``+clip`` on any of them adds gradient clipping's scaling by a device coefficient (1.0 here): a
``torch._foreach_mul_`` pass over the gradients before the step (as ``clip_grads_with_norm_``), or for the
Triton ones the step's ``grad_scale`` (folded into the kernel, as the training loop does).
Reported: median and min ms per step over ``--steps`` (CUDA events, after ``--warmup``) and the bandwidth
GB/s = bytes per step / median time, bytes = Σ numel × (2·|p| + |g| + 2·|m| + 2·|v|) (read p, g, m, v; write
p, m, v; |x| = bytes per element): 11.5 GB for bench_ref in bf16 (the ``+clip`` pass's 2·|g| is not counted:
compare those rows by time). H100 HBM3 peak ≈ 3.35 TB/s.

``--smoke`` runs the tiny preset on the CPU (the Triton kernels in Triton's interpreter) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def make_adamw(params, impl: str, *, lr: float = 1e-4, weight_decay: float = 0.1, capturable: bool = False,
               opts: dict | None = None) -> torch.optim.Optimizer:
    """One of the AdamW implementations above over ``params`` (one group; bench_model.py uses it too)."""
    opts = opts or {}
    cuda = all(p.is_cuda for p in params)
    if impl == "fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=cuda or None,
                                 capturable=capturable and cuda)
    if impl == "foreach":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True, capturable=capturable and cuda)
    if impl == "compiled":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True, capturable=capturable and cuda)
        eager_step = opt.step

        @torch.compile(fullgraph=False)
        def compiled_step():
            eager_step()

        opt.step = lambda closure=None: compiled_step()  # the instance's step: callers keep calling opt.step()
        return opt
    if impl in ("triton", "triton_exact"):
        from moeflow.models.kernels.adamw import BLOCK_SIZE, NUM_WARPS, TritonAdamW

        return TritonAdamW(params, lr=lr, weight_decay=weight_decay, capturable=capturable,
                           exact=impl == "triton_exact", block_size=int(opts.get("block", BLOCK_SIZE)),
                           num_warps=int(opts.get("warps", NUM_WARPS)))
    raise ValueError(f"unknown AdamW implementation {impl!r} (fused, foreach, compiled, triton, triton_exact)")


def bytes_per_step(params, opt) -> int:
    total = 0
    for p in params:
        state = opt.state.get(p, {})
        m = state.get("exp_avg", p)
        total += p.numel() * (3 * p.element_size() + 4 * m.element_size())
    return total


def time_steps(step, steps: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            out.append(time.perf_counter() - t0)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def graphed(body, device):
    """``body()`` (one optimiser step) captured once in a CUDA graph after 3 warm-up calls; returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench_ref")
    p.add_argument("--impls", default="fused,foreach,compiled,triton,triton_exact")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--graph", action="store_true", help="time CUDA-graph replays of each step (capturable)")
    p.add_argument("--out", default="", help="append JSON lines here")
    p.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, Triton interpreted")
    args = p.parse_args(argv)
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by the first triton impl)
        args.preset, args.steps, args.warmup = "tiny", 2, 1
        args.impls = ",".join(i for i in args.impls.split(",") if not i.startswith("compiled"))  # no C++ compile
    from moeflow.models import ModelConfig, MoETransformer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset(args.preset)).to(device=device, dtype=dtype)
    params = [q for q in model.parameters() if q.requires_grad]
    for q in params:
        q.grad = torch.randn_like(q).mul_(1e-3)
    n = sum(q.numel() for q in params)
    print(f"# {args.preset}: {len(params)} tensors, {n / 1e6:.1f} M parameters, {dtype}, {device}"
          + (f" ({torch.cuda.get_device_name()}, torch {torch.__version__})" if device.type == "cuda" else ""),
          flush=True)
    rows = []
    for spec in args.impls.split(","):
        impl, *extra = spec.split("+")
        opts = dict((o.split("=", 1) + ["1"])[:2] for o in extra)
        opt = None
        try:
            opt = make_adamw(params, impl, capturable=args.graph, opts=opts)
            body = opt.step
            if "clip" in opts:
                coef, grads = torch.ones((), device=device), [q.grad for q in params]
                body = (lambda: opt.step(grad_scale=coef)) if impl.startswith("triton") else \
                    (lambda: (torch._foreach_mul_(grads, coef), opt.step()))
            step = graphed(body, device) if args.graph and device.type == "cuda" else body
            times = time_steps(step, args.steps, args.warmup, device)
        except Exception as exc:  # one failing implementation must not hide the others
            print(f"!! {spec} failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"bench": "adamw", "impl": spec, "error": f"{type(exc).__name__}: {exc}"})
            del opt
            continue
        med = statistics.median(times)
        gb = bytes_per_step(params, opt) / 1e9
        row = {"bench": "adamw", "impl": spec, "graph": args.graph, "preset": args.preset, "num_tensors": len(params),
               "num_params": n, "gb_per_step": gb, "ms_median": med * 1e3, "ms_min": min(times) * 1e3,
               "gb_per_s": gb / med}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del opt, step, body
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print("\n| impl | median ms | min ms | GB/s |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['impl']} | ERROR {r['error'][:80]} | | |" if "error" in r else
              f"| {r['impl']}{' (graph)' if r['graph'] else ''} | {r['ms_median']:.3f} | {r['ms_min']:.3f} | "
              f"{r['gb_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
