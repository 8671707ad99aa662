"""Routed experts at decode sizes on CUDA: the grouped path against the fused Triton kernels, same run.

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_moe_decode.py --out benchmarks/results/moe_decode.jsonl
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_moe_decode.py --sweep   # also a few block sizes (graph rows)

One ``RoutedExperts`` of ``--preset`` (bench_ref: hidden D 1024, 64 experts, top-6, width F 512) in bf16 with
random weights, called under ``torch.inference_mode`` on T tokens for each ``--tokens`` T, each token routed
to K distinct random experts (seeded), weights uniform. Rows, per T:

- ``grouped``: ``RoutedExperts.fused_decode = False``: argsort, permutations, two ``torch._grouped_mm``,
  SwiGLU, the combine (the path a decode step took before);
- ``fused``: ``fused_decode = True`` at T·K < E: the two slot-major kernels of ``models/kernels/moe_decode.py``
  (auto takes them here: CUDA, bf16, T·K < E, no autograd; the ``auto`` column says what auto picks);
- ``expert_major``: ``fused_decode = True`` at T·K ≥ E (bench_ref: T ≥ 11): the expert-major kernels (each
  expert's rows read once; auto takes them up to T·K = 8·E), the routing bookkeeping included;
- ``slot_major``: at T·K ≥ E also the slot-major op called directly (each slot reads its expert's rows), to
  see where the switch between the two should lie;
- ``slot_major+shared``, ``slot_major_folded``, ``expert_major+shared``, ``expert_major_folded``: at T·K ≥ E, with
  the preset's shared expert (a bf16 SwiGLU of width num_shared·F, random weights): each op plus the shared
  module's output (its GEMMs, SwiGLU and the add) against the op with the shared expert folded in
  (``DeepSeekMoE.fused_shared``), the four a MoE layer would run at that size (``max_rel_diff`` against grouped +
  the shared module; ``GB/s`` counts the shared weights too). ``--no-shared`` leaves them out;
- ``expert_major_folded+order``: the same with the routing bookkeeping (the slots' stable order by expert and each
  expert's end: a radix argsort, a scatter and a count uncompiled) as one launch
  (``RoutedExperts.fused_decode_order``).

Each row is timed eagerly (``graph = no``: one call after another, the host launching every kernel) and as
replays of one captured CUDA graph holding ``--calls-per-graph`` consecutive calls (``graph = yes``: what a
graph-captured decode step pays per layer: kernel time plus the gaps between kernels). ms per call = median
over ``--rounds`` rounds of ``--reps`` timed calls (CUDA events), rows interleaved per round.
``GB/s`` = bytes of the distinct experts' weights a call needs (3·D·F·2 bytes each) ÷ time: the slot-major
path reads an expert once per slot routed to it, so with repeats it reads more than this (H100 copy bandwidth
is ~3.0 TB/s: the expert-major rows at 32 and 64 tokens should come near it). ``max_rel_diff`` =
max |row − grouped| ÷ max |grouped| on the same input. ``--sweep`` adds graph rows of the fused op with other
block sizes (``gate_up_block_f/gate_up_block_d/down_block_d/down_block_f/num_warps``; expert-major, wherever it
applies: ``gate_up_block_f/gate_up_block_d/down_block_d/down_block_f/block_s/num_warps/num_stages``), to choose
defaults.
The whole run takes well under a minute on an H100 (most of it Triton compiling the kernels). ``--device cpu
--preset tiny`` runs the same rows in Triton's interpreter (a smoke test, not a timing).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from moeflow.models import ModelConfig
from moeflow.models.layers import SwiGLU
from moeflow.models.moe import RoutedExperts

SWEEP = [  # gate_up_block_f, gate_up_block_d, down_block_d, down_block_f, num_warps (the default: 16, 1024, 8, 512, 4)
    (8, 1024, 8, 512, 4), (32, 1024, 8, 512, 4), (16, 256, 8, 512, 4), (16, 1024, 4, 512, 4),
    (16, 1024, 16, 512, 4), (16, 1024, 8, 256, 4), (16, 1024, 8, 512, 8), (16, 1024, 8, 512, 2),
]
# expert-major: gate_up_block_f, gate_up_block_d, down_block_d, down_block_f, block_s, num_warps, num_stages
# (the default: 32, 128, 32, 128, 16, 4, 3): one setting changed at a time, then a few deeper pipelines with larger
# tiles (a bandwidth-bound kernel wants more bytes in flight a program)
EM_SWEEP = [
    (16, 128, 32, 128, 16, 4, 3), (64, 128, 32, 128, 16, 4, 3), (32, 256, 32, 128, 16, 4, 3),
    (32, 64, 32, 128, 16, 4, 3), (32, 128, 16, 128, 16, 4, 3), (32, 128, 64, 128, 16, 4, 3),
    (32, 128, 32, 256, 16, 4, 3), (32, 128, 32, 64, 16, 4, 3), (32, 128, 32, 128, 32, 4, 3),
    (32, 128, 32, 128, 16, 8, 3), (32, 128, 32, 128, 16, 2, 3), (32, 128, 32, 128, 16, 4, 2),
    (32, 128, 32, 128, 16, 4, 4), (32, 128, 32, 128, 16, 4, 5), (32, 256, 32, 256, 16, 4, 4),
    (32, 256, 64, 256, 16, 8, 4), (64, 256, 64, 256, 16, 8, 3), (16, 256, 16, 256, 16, 4, 4),
    (16, 512, 16, 512, 16, 4, 2), (32, 64, 32, 64, 16, 4, 6), (64, 64, 64, 64, 16, 4, 5),
    (16, 128, 16, 128, 16, 2, 4),
]


def log(msg: str) -> None:
    print(msg, flush=True)


def build(cfg: ModelConfig, device: str) -> RoutedExperts:
    torch.manual_seed(0)
    ex = RoutedExperts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.02)
        ex.down_proj.normal_(0, 0.02)
    return ex.to(device, torch.bfloat16).requires_grad_(False)


def routing(T: int, cfg: ModelConfig, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    E, K = cfg.num_routed_experts, cfg.num_experts_per_tok
    x = torch.randn(T, cfg.hidden_size, generator=g).to(device, torch.bfloat16)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device)
    w = torch.rand(T, K, generator=g).to(device)
    return x, idx, w


def make_call(fn, graph: bool, calls_per_graph: int):
    """(call, calls it makes): fn itself, or the replay of a graph of ``calls_per_graph`` calls of fn."""
    if not graph:
        return fn, 1
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graph's documentation asks
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls_per_graph):
            fn()
    return g.replay, calls_per_graph


def time_rows(calls: dict, rounds: int, reps: int, device: str) -> dict[str, float]:
    """Median ms per call of every row; the rows take turns within each round. CUDA events on the GPU; the
    CPU (the interpreter smoke run of the tests) takes wall time."""
    per_call = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (call, n) in calls.items():
            call()  # warm
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(reps):
                call()
            if device == "cuda":
                end.record()
                end.synchronize()
                elapsed_ms = start.elapsed_time(end)
            else:
                elapsed_ms = (time.perf_counter() - t0) * 1e3
            per_call[name].append(elapsed_ms / (reps * n))
    return {name: statistics.median(v) for name, v in per_call.items()}


def build_shared(cfg: ModelConfig, device: str) -> SwiGLU | None:
    """The preset's shared expert (as DeepSeekMoE builds it) in bf16 with random weights, or None without one."""
    if cfg.num_shared_experts == 0:
        return None
    torch.manual_seed(1)
    shared = SwiGLU(cfg.hidden_size, cfg.num_shared_experts * cfg.moe_intermediate_size)
    with torch.no_grad():
        for p in shared.parameters():
            p.normal_(0, 0.02)
    return shared.to(device, torch.bfloat16).requires_grad_(False)


def bench_tokens(ex: RoutedExperts, shared: SwiGLU | None, cfg: ModelConfig, T: int, args) -> list[dict]:
    from moeflow.models.kernels import moe_decode

    x, idx, w = routing(T, cfg, seed=T, device=args.device)
    D, F_ = cfg.hidden_size, cfg.moe_intermediate_size
    expert_major = moe_decode.uses_expert_major(idx.numel(), cfg.num_routed_experts)
    fused_name = "expert_major" if expert_major else "fused"
    ex.fused_decode = None
    auto = fused_name if moe_decode.fused_decode_applies(ex, x, idx, ex.gate_up_proj, ex.down_proj) else "grouped"

    def path(fused: bool):
        def call():
            ex.fused_decode = fused  # set per call: the rows share one module
            return ex(x, idx, w)
        return call

    stacks = (ex.gate_up_proj, ex.down_proj)
    fns = {("grouped", None): path(False), (fused_name, None): path(True)}
    if expert_major:  # the other kernels beside auto's choice wherever both apply (T·K ≥ E): the crossover
        fns[("slot_major", None)] = lambda: moe_decode.routed_experts_decode(x, idx, w, *stacks)
    elif idx.numel() >= cfg.num_routed_experts:
        fns[("expert_major", None)] = lambda: moe_decode.expert_major_decode(x, idx, w, *stacks)
    with_shared = set()  # rows that add the shared expert's output (their reference adds it too)
    if shared is not None and idx.numel() >= cfg.num_routed_experts:
        weights = tuple(m.weight for m in (shared.gate_proj, shared.up_proj, shared.down_proj))
        for name, op in (("slot_major", moe_decode.routed_experts_decode),
                         ("expert_major", moe_decode.expert_major_decode)):
            fns[(name + "+shared", None)] = lambda op=op: op(x, idx, w, *stacks) + shared(x)
            fns[(name + "_folded", None)] = lambda op=op: op(x, idx, w, *stacks, *weights)
            with_shared |= {(name + "+shared", None), (name + "_folded", None)}
        # the expert-major fold with its routing bookkeeping in one launch (RoutedExperts.fused_decode_order)
        fns[("expert_major_folded+order", None)] = lambda: moe_decode.expert_major_decode(
            x, idx, w, *stacks, *weights, fused_order=True)
        with_shared.add(("expert_major_folded+order", None))
    if args.sweep:  # slot-major's SWEEP where auto takes it, expert-major's EM_SWEEP wherever it applies
        if not expert_major:
            names = ("gate_up_block_f", "gate_up_block_d", "down_block_d", "down_block_f", "num_warps")
            for blocks in SWEEP:
                kw = dict(zip(names, blocks))
                fns[(fused_name, blocks)] = lambda kw=kw: moe_decode.routed_experts_decode(x, idx, w, *stacks, **kw)
        if idx.numel() >= cfg.num_routed_experts:
            names = ("gate_up_block_f", "gate_up_block_d", "down_block_d", "down_block_f", "block_s", "num_warps",
                     "num_stages")
            for blocks in EM_SWEEP:
                kw = dict(zip(names, blocks))
                fns[("expert_major", blocks)] = lambda kw=kw: moe_decode.expert_major_decode(x, idx, w, *stacks,
                                                                                              **kw)
    with torch.inference_mode():
        reference = path(False)()
        formula = reference + shared(x) if with_shared else None

        def diff(key, y):
            want = (formula if key in with_shared else reference).float()
            return ((y.float() - want).abs().max() / want.abs().max()).item()

        diffs = {key: diff(key, fn()) for key, fn in fns.items()}
        calls = {}
        for graph in (False, True) if args.device == "cuda" else (False,):
            for key, fn in fns.items():
                if graph or key[1] is None:
                    calls[(*key, graph)] = make_call(fn, graph, args.calls_per_graph)
        ms = time_rows(calls, args.rounds, args.reps, args.device)
    unique = int(torch.unique(idx).numel())
    nbytes = unique * 3 * D * F_ * 2
    shared_bytes = 0 if shared is None else 3 * D * shared.down_proj.weight.shape[1] * 2
    rows = []
    for (name, blocks, graph), t_ms in ms.items():
        row_bytes = nbytes + (shared_bytes if (name, blocks) in with_shared else 0)
        rows.append({"bench": "moe_decode", "preset": args.preset, "tokens": T, "path": name,
                     "blocks": list(blocks) if blocks else "default", "cuda_graph": graph, "ms": round(t_ms, 5),
                     "GBps": round(row_bytes / t_ms / 1e6, 1), "unique_experts": unique, "auto": auto,
                     "max_rel_diff": diffs[(name, blocks)], **machine(args.device)})
    return rows


def machine(device: str) -> dict:
    import triton

    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)", "torch": torch.__version__, "triton": triton.__version__,
            "host": platform.node(), "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench_ref")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 10, 16, 32, 64])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--calls-per-graph", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="also time the fused op with the block sizes of SWEEP")
    p.add_argument("--shared", action=argparse.BooleanOptionalAction, default=True,
                   help="the rows with the preset's shared expert added and folded (where T·K ≥ E)")
    p.add_argument("--out", default="", help="append JSON lines here")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke run of the rows in Triton's interpreter (TRITON_INTERPRET=1), no graph rows")
    args = p.parse_args(argv)
    cfg = ModelConfig.preset(args.preset)
    ex, shared = build(cfg, args.device), build_shared(cfg, args.device) if args.shared else None
    t0 = time.perf_counter()
    rows = []
    for T in args.tokens:
        rows += bench_tokens(ex, shared, cfg, T, args)
    log("| T | path | blocks | CUDA graph | ms / call | GB/s (distinct experts) | max_rel_diff | auto |")
    log("| ---: | --- | --- | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        blocks = r["blocks"] if r["blocks"] == "default" else "/".join(map(str, r["blocks"]))
        log(f"| {r['tokens']} | {r['path']} | {blocks} | {'yes' if r['cuda_graph'] else 'no'} | {r['ms']:.4f} | "
            f"{r['GBps']:.0f} | {r['max_rel_diff']:.2e} | {r['auto']} |")
    log(f"({rows[0]['device']}, torch {rows[0]['torch']}, triton {rows[0]['triton']}; {time.perf_counter() - t0:.1f} s)")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
