"""Pretraining experiments through the real training path (``train_worker``), for the GPU box.

Every run goes through ``moeflow.platform.train.launcher.train_worker`` — the function Ray Train
runs per worker — with a local-directory store and an in-memory tracker, so the figures are
those of the training loop (loader, loss assembly, bias update, logging), not of the model alone.

    python3 benchmarks/bench_train.py throughput --tokens-uri URI            # bench_ref, tokens/s + MFU
    python3 benchmarks/bench_train.py compare --tokens-uri URI --steps 400   # MoE vs dense twin, balancing modes
    torchrun --nproc_per_node 2 benchmarks/bench_train.py scaling --tokens-uri URI   # data-parallel tokens/s
    python3 benchmarks/bench_train.py speed --tokens-uri URI --variants bf16,graph,fp8   # speed options, bench_ref
    python3 benchmarks/bench_train.py compare --tokens-uri URI --variants bf16,fp8 --steps 1000   # FP8 convergence

Speed-option variants (``PretrainConfig`` fields, issue 16): ``bf16`` (none), ``graph`` (cuda_graph),
``fp8`` (fp8 = ``--fp8-groups``), ``graph_fp8``, ``ac_selective`` / ``ac_full`` (activation_checkpointing),
``triton_adamw`` / ``graph_triton_adamw`` (adamw_impl="triton": models/kernels/adamw.py, clipping folded in).

Results are JSON lines (``--out``) and a table on stdout. MFU = (6 × active non-embedding params +
causal attention FLOPs) × tokens/s ÷ 798 TFLOP/s (BENCHMARKS.md), per GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("MOEFLOW_TRACKING", "noop")


def run(name: str, pretrain: dict, tokens_uri: str, store_uri: str, out_prefix: str) -> dict:
    """One training run; returns its metric history (rank 0) and a summary."""
    import torch
    from moeflow.platform.tracking import NoopTracker
    from moeflow.platform.train.launcher import train_worker

    tracker = NoopTracker()
    t0 = time.perf_counter()
    train_worker({"pretrain": pretrain, "tokens_uri": tokens_uri, "output_prefix": f"{out_prefix}/{name}",
                  "store_uri": store_uri, "tracking": "noop", "run_name": name}, tracker=tracker)
    wall = time.perf_counter() - t0

    def hist(key):
        return [(s, v) for s, v in tracker.metric_history(key)]

    tps = [v for _, v in hist("tokens_per_s")]
    steady = tps[2:] if len(tps) > 4 else tps  # skip compile / warm-up intervals
    summary = {
        "name": name, "wall_s": round(wall, 1),
        "tokens_per_s": statistics.median(steady) if steady else None,
        "mfu": statistics.median([v for _, v in hist("mfu")][2:] or [v for _, v in hist("mfu")] or [float("nan")]),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "loss": hist("loss"), "val_loss": hist("val_loss"),
        "maxvio_global": hist("maxvio_global/mean"), "maxvio_batch": hist("maxvio_batch/mean"),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return summary


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def write_row(args, row: dict) -> None:
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "a") as fh:
            fh.write(json.dumps({**row, "mode": args.mode, "preset": args.preset, "seq_len": args.seq_len,
                                 "batch": args.batch, "steps": args.steps}) + "\n")


def base_pretrain(args, **over) -> dict:
    cfg = dict(model_preset=args.preset, seq_len=args.seq_len, micro_batch_size=args.batch, grad_accum_steps=1,
               max_steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 20), log_every=args.log_every,
               val_every=args.val_every, val_batches=8, checkpoint_every=0, keep_checkpoints=1,
               compile=not args.eager, dtype="auto", seed=0,
               # default bf16 weights + AdamW state on GPU (what bench_model times); fp32 = master
               # weights with bf16 autocast
               param_dtype=args.param_dtype if _cuda() else "fp32")
    cfg.update(over)
    return cfg


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["throughput", "compare", "scaling", "speed"])
    p.add_argument("--tokens-uri", required=True)
    p.add_argument("--store-uri", default=None, help="default: the tokens artefact's store root")
    p.add_argument("--out", default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--val-every", type=int, default=0)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--param-dtype", choices=["bf16", "fp32"], default="bf16",
                   help="GPU weights/optimiser dtype; fp32 = master weights + bf16 autocast")
    p.add_argument("--variants", default=None, help="compare: moe,dense,seq_aux,none (default); speed: bf16,graph,fp8")
    p.add_argument("--fp8-groups", default="attn,dense,shared,experts", help="the fp8 variants' layer groups")
    p.add_argument("--no-doc-mask", action="store_true", help="plain causal attention (as bench_model times)")
    args = p.parse_args(argv)
    store_uri = args.store_uri or args.tokens_uri.split("/datasets/")[0]
    out_prefix = f"bench/{args.mode}/{int(time.time())}"
    rows = []
    fp8_groups = args.fp8_groups.split(",")
    speed_variants = {
        "bf16": {}, "graph": {"cuda_graph": True}, "fp8": {"fp8": fp8_groups},
        "graph_fp8": {"cuda_graph": True, "fp8": fp8_groups},
        "ac_selective": {"activation_checkpointing": "selective"}, "ac_full": {"activation_checkpointing": "full"},
        "triton_adamw": {"adamw_impl": "triton"}, "graph_triton_adamw": {"cuda_graph": True, "adamw_impl": "triton"},
    }
    doc = {"document_masking": False} if args.no_doc_mask else {}
    if args.mode == "speed":
        args.preset = args.preset or "bench_ref"
        args.steps = args.steps or 30
        over = {"model_overrides": {"vocab_size": 32768}} if args.preset == "bench_ref" else {}
        for name in (args.variants or "bf16,graph,fp8").split(","):
            rows.append(run(f"speed-{name}-b{args.batch}", base_pretrain(args, **over, **doc, **speed_variants[name]),
                            args.tokens_uri, store_uri, out_prefix))
            write_row(args, rows[-1])
            print(json.dumps({k: rows[-1][k] for k in ("name", "wall_s", "tokens_per_s", "mfu", "peak_mem_gib")}),
                  flush=True)
    elif args.mode in ("throughput", "scaling"):
        args.preset = args.preset or "bench_ref"
        args.steps = args.steps or 30
        over = {"model_overrides": {"vocab_size": 32768}} if args.preset == "bench_ref" else {}
        rows.append(run(f"{args.mode}-{args.preset}-{args.param_dtype}", base_pretrain(args, **over), args.tokens_uri, store_uri, out_prefix))
        write_row(args, rows[-1])
    else:
        args.preset = args.preset or "small"
        args.steps = args.steps or 400
        args.val_every = args.val_every or max(1, args.steps // 8)
        args.log_every = max(args.log_every, 10)
        variants = {
            "moe": {},  # aux-loss-free bias + the small sequence-wise aux loss (DeepSeek-V3 default)
            "dense": {"dense_twin": True},
            "seq_aux": {"model_overrides": {"balancing": "none", "seq_aux_alpha": 1e-3}},
            "none": {"model_overrides": {"balancing": "none", "seq_aux_alpha": 0.0}},
            **speed_variants,
        }
        for name in (args.variants or "moe,dense,seq_aux,none").split(","):
            rows.append(run(name, base_pretrain(args, **doc, **variants[name]), args.tokens_uri, store_uri, out_prefix))
            write_row(args, rows[-1])
            print(json.dumps({k: rows[-1][k] for k in ("name", "wall_s", "tokens_per_s", "mfu")}), flush=True)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"\n{'run':12s} {'ws':>3s} {'tok/s':>10s} {'MFU':>6s} {'final loss':>10s} {'final val':>9s} {'MaxVio glob':>11s}")
    for r in rows:
        fl = r["loss"][-1][1] if r["loss"] else float("nan")
        fv = r["val_loss"][-1][1] if r["val_loss"] else float("nan")
        mv = r["maxvio_global"][-1][1] if r["maxvio_global"] else float("nan")
        print(f"{r['name']:12s} {r['world_size']:3d} {r['tokens_per_s'] or 0:10.0f} {r['mfu'] * 100:5.1f}% "
              f"{fl:10.4f} {fv:9.4f} {mv:11.3f}")


if __name__ == "__main__":
    sys.exit(main())
