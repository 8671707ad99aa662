"""One layer's absorbed MLA decode attention: the formula (``MLA._absorbed``'s bmm branch) vs the fused kernel.

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_mla_decode.py --out results/mla_decode.jsonl
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_mla_decode.py --sweep   # + key splits, key blocks, warps

``bench_ref``'s attention (16 heads, kv_lora_rank 256, rope 32, bf16), T = 1 new token, batch 1 / 8 / 32, S = 128 /
512 / 2,048 keys, ragged masks as the engine's (each row's real keys right-aligned, its own slot always allowed).
What is timed is the block the kernel replaces, from the absorbed query q_lat (B, H, T, R) and the rotated query
part q_rot (B, T, H, P) to the latent output o_lat (B, H, T, R): the formula's cat, bmm, cast, masked_fill, scale,
softmax, cast and bmm (8 kernels) vs ``kernels.mla_decode.mla_decode_attention`` (1 launch, 2 with a key split).
Two timings each, in µs per call, median of ``--repeats`` batches of ``--calls`` calls:
- ``eager``: calls launched one by one from Python (host launch cost included: what an eager step pays);
- ``graph``: the same ``--calls`` calls captured once as a CUDA graph and replayed (what the engine's captured
  decode step pays: kernel time plus the GPU's per-kernel gaps).
Also per row: the largest |kernel − formula| and each one's largest distance from float64, in units of the
largest |output| (the kernel keeps fp32 scores where the formula rounds them to bf16: expect it closer), and the
cache bytes a call must read (B × S × (R + P) × 2) over the graph time, as a bandwidth.
``--sweep`` adds rows for other ``keys_per_split`` (64 … 1,024), ``block_s`` (32, 64) and ``num_warps`` (4, 8).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys

import torch

from moeflow.models.kernels import mla_decode as mk

H, R, P = 16, 256, 32
SCALE = 96**-0.5  # (qk_nope 64 + qk_rope 32)^-½


def formula(q_lat_BHTR, q_rot_BTHP, kv_BSX, mask_B1TS, num_keys, scale, dtype=None):
    """``MLA._absorbed``'s decode-sized branch, cat to second bmm (``dtype``: inputs cast first, float64 reference)."""
    k_BSX = kv_BSX[:, :num_keys]
    if dtype is not None:
        q_lat_BHTR, q_rot_BTHP, k_BSX = q_lat_BHTR.to(dtype), q_rot_BTHP.to(dtype), k_BSX.to(dtype)
    kv_lat_BSR = k_BSX[..., : q_lat_BHTR.shape[-1]]
    q_BHTX = torch.cat([q_lat_BHTR, q_rot_BTHP.transpose(1, 2)], dim=-1)
    B, Hq, T, X = q_BHTX.shape
    scores_BHTS = torch.bmm(q_BHTX.reshape(B, Hq * T, X), k_BSX.transpose(1, 2)).view(B, Hq, T, -1)
    scores_BHTS = scores_BHTS.to(torch.promote_types(scores_BHTS.dtype, torch.float32))
    scores_BHTS = scores_BHTS.masked_fill(~mask_B1TS, float("-inf")) * scale
    probs_BQS = scores_BHTS.softmax(dim=-1).to(kv_lat_BSR.dtype).view(B, Hq * T, -1)
    return torch.bmm(probs_BQS, kv_lat_BSR).view(B, Hq, T, -1)


def inputs(B: int, S: int, seed: int):
    """q_lat as the einsum's view, q_rot as the query projection's split, the cache buffer (S + 64 slots, as a
    bucket view of a wider cache), the engine's ragged mask (B, 1, 1, S)."""
    g = torch.Generator().manual_seed(seed)
    q_lat = torch.randn(B, 1, H, R, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
    q_rot = torch.randn(B, 1, H, 64 + P, generator=g).to("cuda", torch.bfloat16).split([64, P], dim=-1)[1]
    kv = torch.randn(B, S + 64, R + P, generator=g).to("cuda", torch.bfloat16)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    real_BS = torch.arange(S)[None, :] >= (S - lengths)[:, None]
    real_BS[:, -1] = True  # the query's own slot
    return q_lat, q_rot, kv, real_BS[:, None, None, :].to("cuda")


def timed(fn, calls: int, repeats: int) -> tuple[float, float]:
    """(eager µs per call, CUDA-graph µs per call), medians over ``repeats`` batches of ``calls`` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()

    def per_call(run) -> float:
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / calls)
        return statistics.median(times)

    def eager():
        for _ in range(calls):
            fn()

    eager_us = per_call(eager)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager()
    graph.replay()
    torch.cuda.synchronize()
    return eager_us, per_call(graph.replay)


def row(B: int, S: int, args, **launch) -> dict:
    q_lat, q_rot, kv, mask = inputs(B, S, seed=B * 7 + S)
    with torch.inference_mode():
        got = mk.mla_decode_attention(q_lat, q_rot, kv, mask, S, SCALE, **launch)
        want = formula(q_lat, q_rot, kv, mask, S, SCALE)
        exact = formula(q_lat, q_rot, kv, mask, S, SCALE, torch.float64)
        top = exact.abs().max().item()
        out = {"bench": "mla_decode", "batch": B, "keys": S, "heads": H, "kv_lora_rank": R, "rope_dim": P,
               "launch": launch or "default", "splits": mk.key_splits(S, launch.get("keys_per_split"))[1],
               "kernel_vs_formula": (got.double() - want.double()).abs().max().item() / top,
               "kernel_vs_fp64": (got.double() - exact).abs().max().item() / top,
               "formula_vs_fp64": (want.double() - exact).abs().max().item() / top}
        if not launch:
            out["formula_eager_us"], out["formula_graph_us"] = timed(
                lambda: formula(q_lat, q_rot, kv, mask, S, SCALE), args.calls, args.repeats)
        out["kernel_eager_us"], out["kernel_graph_us"] = timed(
            lambda: mk.mla_decode_attention(q_lat, q_rot, kv, mask, S, SCALE, **launch), args.calls, args.repeats)
    out["cache_gb_per_s"] = B * S * (R + P) * 2 / (out["kernel_graph_us"] * 1e-6) / 1e9
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--keys", default="128,512,2048")
    p.add_argument("--calls", type=int, default=100, help="calls per timed batch (and per captured graph)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="also other key splits, key blocks and warps")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_mla_decode.py times CUDA kernels: no GPU here", file=sys.stderr)
        return 1
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = []
    for B, S in itertools.product([int(b) for b in args.batches.split(",")], [int(s) for s in args.keys.split(",")]):
        launches = [{}]
        if args.sweep:
            launches += [{"keys_per_split": n} for n in (64, 128, 256, 512, 1024) if n < 2 * S]
            launches += [{"block_s": 32}, {"num_warps": 8}, {"block_s": 32, "num_warps": 8}]
        for launch in launches:
            r = row(B, S, args, **launch)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print("\n| B | S | launch | splits | formula eager µs | formula graph µs | kernel eager µs | kernel graph µs | "
          "graph speed-up | cache GB/s | kernel−fp64 | formula−fp64 |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {}
    for r in rows:
        if r["launch"] == "default":
            base[(r["batch"], r["keys"])] = r
        b = base[(r["batch"], r["keys"])]
        print(f"| {r['batch']} | {r['keys']} | {r['launch']} | {r['splits']} | {b['formula_eager_us']:.1f} | "
              f"{b['formula_graph_us']:.1f} | {r['kernel_eager_us']:.1f} | {r['kernel_graph_us']:.1f} | "
              f"{b['formula_graph_us'] / r['kernel_graph_us']:.2f}x | {r['cache_gb_per_s']:.0f} | "
              f"{r['kernel_vs_fp64']:.1e} | {r['formula_vs_fp64']:.1e} |")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
