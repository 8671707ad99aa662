"""INT8 routed experts at decode sizes: the per-slot gather against the whole-stack paths, same run.

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    PYTHONPATH=/tmp/pkg OMP_NUM_THREADS=1 python3 benchmarks/bench_int8_experts.py --tokens 1 8 32
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_int8_experts.py --device cuda --cuda-graph --out results/int8_experts.jsonl

One ``DeepSeekMoE`` layer of ``--preset`` (bench_ref: hidden 1024, 64 routed experts, top-6, expert width
512, one shared expert) with random weights, timed forward (``with_losses=False``, under
``torch.inference_mode``, as a decode step runs it) on N tokens for each ``--tokens`` N. Rows, one layer
each, all built from the same float weights:

- ``float``: the layer unquantized, in ``--dtype`` (bf16 on cuda, fp32 on cpu by default);
- ``int8 whole stack, grouped``: ``quantize_int8`` copy forced onto the whole-stack grouped path (the GPU
  path before the per-slot gather: every call dequantizes all E experts' (2F, D) and (D, F) rows);
- ``int8 whole stack, looped``: the whole-stack per-expert loop (the CPU default before; it dequantizes
  only the experts that got tokens, but syncs the host with ``tolist``: not with ``--cuda-graph``);
- ``int8 per-slot``: the per-slot gather, forced on for every N (auto takes it only where N·K < E, on
  CUDA or beside the grouped path; the ``auto`` column says which path an unpinned layer takes on this
  device and dtype, so the rows show the crossover).

Rounds alternate the rows (``--rounds`` × ``--reps`` calls each, after ``--warmup``); ms = median over all
calls. ``--cuda-graph`` captures each row's call in a CUDA graph and times replays (as the serving
engine's decode runs). ``max_rel_diff`` = max |row − int8 whole stack grouped| ÷ max |int8 whole stack
grouped| on the same input (the int8 rows must agree to rounding; the float row shows the quantization).
Two more rows time the layer's shared expert alone (a SwiGLU of ``nn.Linear``s, and its ``Int8Linear``
twin: ``torch._weight_int8pack_mm``), so the INT8 cost outside the routed experts shows too.
On cuda each row also reports its peak memory over the weights. The script also runs with an older
``moeflow`` on PYTHONPATH (one without the per-slot gather: its rows are the whole-stack ones), so old and
new trees can be timed one after the other on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from moeflow.models import ModelConfig
from moeflow.models.moe import DeepSeekMoE
from moeflow.models.quant import Int8RoutedExperts, quantize_int8

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def log(msg: str) -> None:
    print(msg, flush=True)


def build_layers(cfg: ModelConfig, device: str, dtype: torch.dtype) -> dict[str, DeepSeekMoE]:
    """The float layer and its int8 copies, each pinned to one path (class attributes set per instance)."""
    torch.manual_seed(0)
    layer = DeepSeekMoE(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
        layer.gate.e_score_correction_bias.normal_(0, 0.01)
    layer = layer.to(device, dtype).eval()
    layers = {"float": layer}
    for name, grouped, slot in (("int8 whole stack, grouped", True, False), ("int8 whole stack, looped", False, False),
                                ("int8 per-slot", None, True)):
        if slot and not hasattr(Int8RoutedExperts, "_per_slot"):
            continue  # the code under PYTHONPATH predates the per-slot gather: its whole-stack rows only
        q = copy.deepcopy(layer)
        quantize_int8(q)
        q.experts.use_grouped_mm = grouped if grouped is not None else q.experts.use_grouped_mm
        q.experts.use_slot_gather = slot
        layers[name] = q
    return layers


def default_path(experts: Int8RoutedExperts, x_BTD: torch.Tensor, k: int) -> str:
    """The path an unpinned ``Int8RoutedExperts`` (both choices auto) takes for x's tokens on this device and dtype."""
    if not hasattr(experts, "_slot_path"):  # a tree from before the per-slot gather (--old runs)
        return "whole stack (no per-slot path)"
    pinned = experts.use_grouped_mm, experts.use_slot_gather
    experts.use_grouped_mm = experts.use_slot_gather = None
    try:
        x_TD = x_BTD.view(-1, x_BTD.shape[-1])
        idx_TK = torch.zeros(x_TD.shape[0], k, dtype=torch.long, device=x_TD.device)
        if experts._slot_path(x_TD, idx_TK):
            return "per-slot"
        return "whole stack, " + ("grouped" if experts._grouped_path(x_TD) else "looped")
    finally:
        experts.use_grouped_mm, experts.use_slot_gather = pinned


def make_call(name: str, layer: DeepSeekMoE, x_BTD: torch.Tensor, cuda_graph: bool):
    """A no-argument call of the layer's forward on x (of its shared expert alone for a "shared" row); with
    cuda_graph, the replay of its captured graph."""
    def call():
        if name.startswith("shared"):
            return layer.shared_experts(x_BTD)
        return layer(x_BTD, with_losses=False)[0]

    if not cuda_graph:
        return call
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graph's documentation asks
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()

    def replay():
        graph.replay()
        return out
    return replay


def time_rows(calls: dict, device: str, rounds: int, reps: int, warmup: int) -> dict[str, list[float]]:
    times = {name: [] for name in calls}
    for name, call in calls.items():
        for _ in range(warmup):
            call()
    for _ in range(rounds):  # alternate the rows: a noisy machine slows all of them, not one
        for name, call in calls.items():
            for _ in range(reps):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                call()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    return times


def bench_tokens(layers: dict, n: int, args, dtype: torch.dtype) -> list[dict]:
    cfg = layers["float"].cfg
    g = torch.Generator().manual_seed(n)
    x_BTD = torch.randn(1, n, cfg.hidden_size, generator=g).to(args.device, dtype)
    names = [k for k in layers if not (args.cuda_graph and "looped" in k)]
    shared = {"shared expert, float": layers["float"], "shared expert, int8": layers["int8 whole stack, grouped"]}
    if layers["float"].shared_experts is None:
        shared = {}
    layers = {**layers, **shared}
    names += list(shared)
    auto = default_path(layers["int8 whole stack, grouped"].experts, x_BTD, cfg.num_experts_per_tok)
    calls, outs, peaks = {}, {}, {}
    with torch.inference_mode():
        for name in names:
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            calls[name] = make_call(name, layers[name], x_BTD, args.cuda_graph)
            outs[name] = calls[name]().float().clone()
            if args.device == "cuda":
                torch.cuda.synchronize()
                peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = time_rows(calls, args.device, args.rounds, args.reps, args.warmup)
    rows = []
    for name in names:
        ref = outs["shared expert, float" if name.startswith("shared") else "int8 whole stack, grouped"]
        med = statistics.median(times[name])
        row = {"bench": "int8_experts", "row": name, "tokens": n, "slots": n * cfg.num_experts_per_tok,
               "experts": cfg.num_routed_experts, "auto": auto,
               "device": args.device, "dtype": str(dtype).removeprefix("torch."), "cuda_graph": args.cuda_graph,
               "ms_median": med * 1e3, "ms_min": min(times[name]) * 1e3, "calls": len(times[name]),
               "max_rel_diff": float((outs[name] - ref).abs().max() / ref.abs().max())}
        if name in peaks:
            row["peak_mib"] = peaks[name]
        rows.append(row)
    return rows


def machine() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench_ref")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cuda-graph", action="store_true", help="time replays of a captured graph (cuda only)")
    p.add_argument("--out", default="", help="append JSON lines here")
    args = p.parse_args(argv)
    if args.cuda_graph and args.device != "cuda":
        p.error("--cuda-graph needs --device cuda")
    dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    cfg = ModelConfig.preset(args.preset)
    log(json.dumps({"machine": machine(), "preset": args.preset, "args": vars(args)}))
    layers = build_layers(cfg, args.device, dtype)
    rows = []
    for n in args.tokens:
        for row in bench_tokens(layers, n, args, dtype):
            log(json.dumps(row))
            rows.append(row)
    names = list(dict.fromkeys(r["row"] for r in rows))
    log("\n| tokens | slots (auto) | " + " | ".join(f"{k} ms" for k in names) + " |")
    log("| ---: | --- | " + " | ".join("---:" for _ in names) + " |")
    for n in args.tokens:
        mine = {r["row"]: r for r in rows if r["tokens"] == n}
        log(f"| {n} | {n * cfg.num_experts_per_tok} ({next(iter(mine.values()))['auto']}) | "
            + " | ".join(f"{r['ms_median']:.3f}" for r in mine.values()) + " |")
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
