"""Training throughput of FSDP2-only vs expert parallelism × FSDP2 (and the all-to-all's time share).

Each variant builds the model (same seed), wraps it, and times ``Trainer.train_step`` on random token
rows (the loop's real step: token weighting, clipping, AdamW, router-bias update with global counts),
``--warmup`` steps then ``--steps`` timed ones, synchronised (CUDA) and barriered on each step's end.
Then a second, instrumented pass times every ``all_to_all_single`` of the EP layers (device-synchronised
before and after, so it includes waiting for the slowest rank of the EP group) and reports its share of
the step; the throughput figures come from the uninstrumented pass.

    # N GPUs of one host (bench_ref, bf16 weights, batch per GPU 8 x 2048):
    torchrun --nproc_per_node 8 benchmarks/bench_parallel.py --preset bench_ref --out $OUT/parallel8.jsonl
    torchrun --nproc_per_node 1 benchmarks/bench_parallel.py --preset bench_ref --variants fsdp   # 1-GPU baseline
    # CPU smoke test (gloo, 2 processes, tiny config):
    python3 benchmarks/bench_parallel.py --spawn 2 --preset tiny --seq-len 32 --batch 2 --steps 2 --warmup 1

Scaling efficiency at N GPUs = (tokens/s per GPU at N) ÷ (tokens/s of the 1-GPU baseline), per variant.
``--ep`` defaults to the world size (each GPU holds E/N experts; DP runs over the rest of the mesh).
Output: one JSON line per variant (rank 0) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _sync(device) -> None:
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


class _A2ATimer:
    """Wraps ``dist.all_to_all_single`` as the EP module calls it; sums synchronised wall time."""

    def __init__(self, module, device) -> None:
        self.module, self.device, self.seconds, self.calls = module, device, 0.0, 0
        self.original = module.dist.all_to_all_single

    def __enter__(self):
        import torch

        def timed(*args, **kwargs):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = self.original(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        self.module.dist.all_to_all_single = timed
        return self

    def __exit__(self, *exc):
        self.module.dist.all_to_all_single = self.original


def run_variant(name: str, args, rank: int, world: int, device) -> dict:
    import torch

    from moeflow.models import MoETransformer
    from moeflow.models.train.loop import Trainer
    from moeflow.platform.train import expert_parallel
    from moeflow.platform.train.config import PretrainConfig
    from moeflow.platform.train.distributed import wrap_model

    ep = (args.ep or world) if name.startswith("ep") else 1
    pp = (args.pp or world) if name == "pp" else 1
    micro = max(args.micro, pp) if name == "pp" else 1  # a pipeline needs >= pp micro-batches per step
    pcfg = PretrainConfig(model_preset=args.preset, seq_len=args.seq_len, micro_batch_size=args.batch,
                          grad_accum_steps=micro, max_steps=10_000, warmup_steps=0, log_every=10_000, val_every=0,
                          lr=1e-4, parallelism="fsdp" if name.endswith("fsdp") else "ddp", expert_parallel=ep,
                          pipeline_parallel=pp, document_masking=False, param_dtype=args.param_dtype,
                          compile=False, dtype="auto")
    dp, ep, pp = pcfg.mesh_shape(world)
    torch.manual_seed(0)
    model = MoETransformer(pcfg.build_model_config()).to(device)
    if pcfg.param_dtype == "bf16":
        model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1 + (rank // pp))  # the stages of a replica read the same rows
    vocab = model.cfg.vocab_size

    def batches():
        while True:
            yield torch.randint(2, vocab, (args.batch, args.seq_len + 1), generator=gen)

    if pp > 1:
        from moeflow.platform.train.pipeline_parallel import PipelineTrainer, build_mesh

        wrapped = None
        trainer = PipelineTrainer(pcfg, model, batches(), mesh=build_mesh(device.type, dp, pp), device=device,
                                  schedule=args.pp_schedule)
    else:
        wrapped = wrap_model(model, pcfg.parallelism, pcfg.dtype, world, device, expert_parallel=ep)
        trainer = Trainer(pcfg, model, batches(), wrapped=wrapped, device=device)
    for _ in range(args.warmup):
        trainer.train_step()
    times = []
    for _ in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        trainer.train_step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    a2a_share = None
    if ep > 1:
        with _A2ATimer(expert_parallel, device) as timer:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            _sync(device)
            instrumented = time.perf_counter() - t0
        a2a_share = timer.seconds / instrumented
    tokens = args.batch * micro * args.seq_len * dp * ep  # rows per step of every model replica (pp: not x pp)
    result = {"variant": name, "world": world, "dp": dp, "ep": ep, "pp": pp, "micro_batches": micro,
              "preset": args.preset, "seq_len": args.seq_len, "batch_per_rank": args.batch, "step_s": step_s, "tokens_per_s": tokens / step_s,
              "tokens_per_s_per_rank": tokens / step_s / world, "all_to_all_share": a2a_share,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    del trainer, wrapped, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def bench(args) -> list[dict]:
    import torch

    from moeflow.platform.train.distributed import worker_context

    results = []
    with worker_context("cuda" if torch.cuda.is_available() else "cpu") as ctx:
        for name in args.variants.split(","):
            results.append(run_variant(name, args, ctx.rank, ctx.world_size, ctx.device))
            if ctx.is_rank0:
                print(json.dumps(results[-1]), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(results[-1]) + "\n")
        if ctx.is_rank0:
            print(f"{'variant':10} {'world':>5} {'dp':>3} {'ep':>3} {'pp':>3} {'tokens/s':>12} {'per rank':>10} "
                  f"{'a2a share':>9}")
            for r in results:
                share = "-" if r["all_to_all_share"] is None else f"{100 * r['all_to_all_share']:.1f} %"
                print(f"{r['variant']:10} {r['world']:5} {r['dp']:3} {r['ep']:3} {r['pp']:3} "
                      f"{r['tokens_per_s']:12,.0f} {r['tokens_per_s_per_rank']:10,.0f} {share:>9}")
    return results


def _spawned(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    bench(parse(argv))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench_ref")
    p.add_argument("--variants", default="fsdp,ep_fsdp", help="comma list of fsdp, ep_fsdp, ddp, ep_ddp, pp")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: the world size)")
    p.add_argument("--pp", type=int, default=None, help="pp variant: pipeline stages (default: the world size; "
                                                        "DP over the rest)")
    p.add_argument("--micro", type=int, default=4, help="pp variant: micro-batches (of --batch rows) per step")
    p.add_argument("--pp-schedule", default="1f1b", choices=["1f1b", "interleaved_1f1b"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="rows per rank per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--param-dtype", choices=["bf16", "fp32"], default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", default=None, help="append JSON lines here (rank 0)")
    p.add_argument("--spawn", type=int, default=0, help="CPU smoke test: spawn this many gloo processes")
    args = p.parse_args(argv)
    if args.param_dtype is None:
        import torch

        args.param_dtype = "bf16" if torch.cuda.is_available() else "fp32"
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.spawn:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rest = [a for i, a in enumerate(argv) if a != "--spawn" and (i == 0 or argv[i - 1] != "--spawn")]
        mp.spawn(_spawned, args=(args.spawn, port, rest), nprocs=args.spawn, join=True)
        return
    bench(args)


if __name__ == "__main__":
    main()
