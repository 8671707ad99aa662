"""Checkpoint resume on the CPU: what each rank fetches from the store, FSDP2 on 2 gloo ranks.

    python benchmarks/bench_checkpoint_resume.py [--overrides '{...}'] [--world 2]

Every rank saves its shards into one checkpoint in a local-directory store (the worker's
``save_checkpoint``), then resumes it into a fresh model twice: "full" = the old path (every rank
downloads the whole checkpoint, verified, then ``state.restore``), "lazy" = ``resume_from_latest``
(the small files, then only the shard files its DCP load reads). Prints one JSON line per way:
seconds (slowest rank), bytes and files each rank fetched, the checkpoint's total.
One machine, one disk: the seconds are the local copy + verify + load, not a cluster's network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# the save benchmark's model (~50 M parameters, ~0.6 GB with AdamW's two moments)
DEFAULT_OVERRIDES = {"vocab_size": 8192, "hidden_size": 512, "num_layers": 6, "num_routed_experts": 16,
                     "moe_intermediate_size": 512, "dense_intermediate_size": 1536}


def _trainer(overrides: dict, world: int):
    from moeflow.models import MoETransformer
    from moeflow.models.train.loop import Trainer
    from moeflow.platform.train.config import PretrainConfig
    from moeflow.platform.train.distributed import wrap_model

    cfg = PretrainConfig(model_overrides=overrides, seq_len=16, micro_batch_size=1, max_steps=10, val_every=0)
    torch.manual_seed(0)
    model = MoETransformer(cfg.build_model_config())
    wrapped = wrap_model(model, "fsdp", "fp32", world, torch.device("cpu"))
    trainer = Trainer(cfg, model, iter(()), wrapped=wrapped)
    for p in model.parameters():  # one step: AdamW has its two moments, as in a real checkpoint
        p.grad = torch.randn_like(p) * 1e-3
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return trainer


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _run(rank: int, world: int, init: str, overrides: dict, out: str) -> None:
    import torch.distributed as dist

    from moeflow.models.train import state as train_state
    from moeflow.platform.store import LocalStore
    from moeflow.platform.train.checkpoint import CheckpointManager
    from moeflow.platform.train.distributed import WorkerContext
    from moeflow.platform.train.worker import resume_from_latest, save_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    out = Path(out)

    def ctx(name: str) -> WorkerContext:
        return WorkerContext(rank, world, rank, torch.device("cpu"), None, out / f"{name}{rank}")

    manager = CheckpointManager(LocalStore(out / "store"), "runs/bench")
    save_checkpoint(_trainer(overrides, world), None, manager, ctx("save"))
    rows = []
    for way in ("full", "lazy"):
        trainer = _trainer(overrides, world)
        dist.barrier()
        start = time.perf_counter()
        if way == "full":  # what every rank did before
            local = manager.download(manager.latest(), out / f"full{rank}" / "ckpt")
            train_state.restore(trainer, local)
        else:
            _, local = resume_from_latest(manager, trainer, None, ctx("lazy"))
        seconds = time.perf_counter() - start
        fetched = _files(local)
        rows.append({"way": way, "rank": rank, "seconds": seconds, "bytes": sum(fetched.values()),
                     "files": len(fetched), "distcp": sorted(n for n in fetched if n.endswith(".distcp"))})
    total = manager.store.read_artifact(manager.latest().prefix)
    Path(out, f"rows{rank}.json").write_text(json.dumps({"rows": rows, "total_bytes": total.total_size,
                                                        "total_files": len(total.files)}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overrides", type=json.loads, default=DEFAULT_OVERRIDES, help="ModelConfig fields (JSON)")
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run, args=(args.world, os.path.join(tmp, "init"), args.overrides, tmp), nprocs=args.world)
        ranks = [json.loads(Path(tmp, f"rows{r}.json").read_text()) for r in range(args.world)]
    for i, row in enumerate(ranks[0]["rows"]):
        print(json.dumps({"way": row["way"], "world_size": args.world,
                          "seconds": round(max(r["rows"][i]["seconds"] for r in ranks), 3),
                          "bytes_per_rank": [r["rows"][i]["bytes"] for r in ranks],
                          "files_per_rank": [r["rows"][i]["files"] for r in ranks],
                          "shard_files_per_rank": [r["rows"][i]["distcp"] for r in ranks],
                          "checkpoint_bytes": ranks[0]["total_bytes"], "checkpoint_files": ranks[0]["total_files"],
                          "torch": torch.__version__}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
