"""Checkpoint save on the CPU: the old full format (full state dicts gathered to rank 0's CPU, one
``torch.save`` of model.pt + optimizer.pt by rank 0) beside the sharded DCP format (every rank writes
its own files; DDP's replicated tensors de-duplicated over the ranks), 1 and 2 gloo ranks, DDP.

    python benchmarks/bench_checkpoint_save.py [--preset tiny --overrides '{...}'] [--repeats 3]

Prints one JSON line per (format, world size): median seconds of the save (capture + write to a local
folder; the store upload is the same bytes either way), bytes written in all, the largest one rank wrote.
Single machine, local disk: it measures the write path, not a cluster's parallel file system.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


# ~50 M parameters (~0.6 GB with AdamW's two moments): big enough that the write dominates, small
# enough for a shared 2-core CPU machine
DEFAULT_OVERRIDES = {"vocab_size": 8192, "hidden_size": 512, "num_layers": 6, "num_routed_experts": 16,
                     "moe_intermediate_size": 512, "dense_intermediate_size": 1536}


def _model_and_optimizer(preset: str, overrides: dict):
    from moeflow.models import MoETransformer
    from moeflow.models.config import ModelConfig
    from moeflow.models.train.optim import build_adamw

    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset(preset).replace(**overrides))
    optimizer = build_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, decay_embeddings=True)
    for p in model.parameters():  # one step: AdamW has its two moments, as in a real checkpoint
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    return model, optimizer


def _save_full(model, optimizer, directory: Path, rank: int) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(model_sd, directory / "model.pt")
        torch.save(optim_sd, directory / "optimizer.pt")


def _save_sharded(model, optimizer, directory: Path, rank: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    no_dist = not dist.is_initialized()
    dcp.save(model_sd, checkpoint_id=directory / "model", no_dist=no_dist)
    dcp.save(optim_sd, checkpoint_id=directory / "optim", no_dist=no_dist)


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.exists() else 0


def _run(rank: int, world: int, init: str, preset: str, overrides: dict, repeats: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model, optimizer = _model_and_optimizer(preset, overrides)
    rows = []
    for name, save in (("full", _save_full), ("sharded", _save_sharded)):
        times, sizes = [], []
        for i in range(repeats + 1):  # the first is a warm-up
            directory = Path(out) / f"{name}-{i}-r{rank}"
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            save(model, optimizer, directory, rank)
            if world > 1:
                dist.barrier()
            if i:
                times.append(time.perf_counter() - start)
                sizes.append(_size(directory))
        rows.append({"format": name, "rank": rank, "seconds": statistics.median(times), "bytes": sizes[-1],
                     "params": sum(p.numel() for p in model.parameters())})
    Path(out, f"rows{rank}.json").write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--overrides", type=json.loads, default=DEFAULT_OVERRIDES, help="ModelConfig fields (JSON)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            if world == 1:
                _run(0, 1, "", args.preset, args.overrides, args.repeats, tmp)
            else:
                mp.spawn(_run, args=(world, os.path.join(tmp, "init"), args.preset, args.overrides, args.repeats, tmp),
                         nprocs=world)
            ranks = [json.loads(Path(tmp, f"rows{r}.json").read_text()) for r in range(world)]
        for i, row in enumerate(ranks[0]):
            per_rank = [r[i]["bytes"] for r in ranks]
            print(json.dumps({"format": row["format"], "world_size": world, "preset": args.preset,
                              "seconds": round(max(r[i]["seconds"] for r in ranks), 3),
                              "params": ranks[0][i].get("params"),
                              "bytes_total": sum(per_rank), "bytes_max_rank": max(per_rank),
                              "torch": torch.__version__}))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
