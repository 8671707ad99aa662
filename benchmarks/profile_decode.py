"""Where a serving decode step's GPU time goes: the kernels of the engine's step, per step.

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    PYTHONPATH=/tmp/pkg python3 benchmarks/profile_decode.py --batches 1 32 --modes graph graph+compile
    PYTHONPATH=/tmp/pkg python3 benchmarks/profile_decode.py --batches 1 --modes graph graph+nonorm
    PYTHONPATH=/tmp/pkg python3 benchmarks/profile_decode.py --batches 1 32 --modes graph graph+rope
    PYTHONPATH=/tmp/pkg python3 benchmarks/profile_decode.py --batches 1 32 --modes graph graph+cachewrite
    PYTHONPATH=/tmp/pkg python3 benchmarks/profile_decode.py --batches 1 32 --modes graph graph+router
    PYTHONPATH=/tmp/pkg python3 benchmarks/profile_decode.py --batches 1 32 --modes graph graph+norouterlogits
    PYTHONPATH=/tmp/pkg python3 benchmarks/profile_decode.py --batches 1 32 --modes graph graph+mla
    PYTHONPATH=/tmp/pkg python3 benchmarks/profile_decode.py --batches 1 32 --modes graph graph+nosharedfold

``bench_ref`` in bf16 with random weights, B requests of a 64-token random prompt decoding greedily
through the serving ``Engine`` (CUDA-graph step, optionally the inductor-compiled step). After every
request has its first token, ``--steps`` steps run under ``torch.profiler``; the table lists each kernel's
count and GPU time per step (CUPTI reports the kernels a CUDA graph replays), the step's wall time, the
sum of kernel time (GPU busy) and the number of kernels a step launches. A kernel-bound step (many
kernels of a few µs) and a bandwidth-bound one (few kernels near the copy bandwidth) need different work.
Mode flags: ``+compile`` (the inductor step), ``+nonorm`` / ``+norm`` (``RMSNorm.fused_inference`` off / on for
that mode; ``--fused-norm`` sets it for the others): ``norm_kernels_per_step`` counts the fused norm's launches;
``+norope`` / ``+rope`` likewise ``RotaryEmbedding.fused_inference`` (``--fused-rope``, on by default), counted in
``rope_kernels_per_step``; ``+nocachewrite`` / ``+cachewrite`` likewise ``MLA.fused_cache_write``
(``--fused-cache-write``, on by default), counted in ``cache_write_kernels_per_step``; ``+norouter`` / ``+router``
``Router.fused_inference`` (``--fused-router``, on by default), counted in ``router_kernels_per_step``;
``+norouterlogits`` / ``+routerlogits`` ``Router.fused_logits`` (``--fused-router-logits``, on by default: the same
launch also forms the logits), so ``graph+norouterlogits`` has 3 kernels a MoE layer more (bench_ref: 21 a step; the
casts and the GEMV, counted as ``kernels_per_step`` − the other rows' and not by name: cuBLAS's kernel names vary),
and ``router_kernels_per_step`` is the same 7 in both; ``+nomla``
/ ``+mla`` ``MLA.fused_decode_attention`` (``--fused-mla``, off by default), its launches (attention and combine
kernels) counted in ``mla_kernels_per_step``; ``+noboundary`` / ``+boundary`` ``MoETransformer.defer_residual_add``
(the block boundary's residual add inside the next norm's launch; on by default); ``+nosharedfold`` / ``+sharedfold``
``DeepSeekMoE.fused_shared`` (``--fused-shared``, on by default), the fused MoE kernels' launches counted in
``moe_kernels_per_step`` (2 a MoE layer at batch 1 either way; the fold takes the shared expert's 6 off
``kernels_per_step``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.attention import MLA
from moeflow.models.layers import RMSNorm, RotaryEmbedding
from moeflow.models.moe import DeepSeekMoE, Router, RoutedExperts
from moeflow.models.serving import Engine, SamplingParams


def build_model(preset: str) -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset(preset)).to(device="cuda", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0.0, 0.01)  # a realistic, non-uniform routing
    return model


# mode flag -> (the class, its switch) it sets: "+norm" on, "+nonorm" off (likewise rope, cachewrite, router,
# routerlogits, mla, boundary, sharedfold)
FUSED_SWITCHES = {"norm": (RMSNorm, "fused_inference"), "rope": (RotaryEmbedding, "fused_inference"),
                  "cachewrite": (MLA, "fused_cache_write"), "router": (Router, "fused_inference"),
                  "routerlogits": (Router, "fused_logits"), "mla": (MLA, "fused_decode_attention"),
                  "vproj": (MLA, "fused_value_projection"),
                  "boundary": (MoETransformer, "defer_residual_add"), "sharedfold": (DeepSeekMoE, "fused_shared"),
                  "moeorder": (RoutedExperts, "fused_decode_order")}


# the fused MoE decode kernels (models/kernels/moe_decode.py), slot- and expert-major
MOE_KERNELS = ("_gate_up_swiglu_kernel", "_down_combine_kernel", "_expert_down_kernel", "_combine_kernel")


def profile_mode(model, batch: int, mode: str, steps: int, prompt_len: int, top: int) -> dict:
    decode_mode, *flags = mode.split("+")
    defaults = {(cls, attr): getattr(cls, attr) for cls, attr in FUSED_SWITCHES.values()}
    for name, (cls, attr) in FUSED_SWITCHES.items():
        if name in flags or "no" + name in flags:
            setattr(cls, attr, name in flags)
    try:
        return _profile(model, batch, mode, steps, prompt_len, top)
    finally:
        for (cls, attr), old in defaults.items():
            setattr(cls, attr, old)


def _profile(model, batch: int, mode: str, steps: int, prompt_len: int, top: int) -> dict:
    decode_mode, *flags = mode.split("+")
    engine = Engine(model, max_batch=batch, context_len=prompt_len + steps + 64, prefill_chunk=1 << 16,
                    decode_mode=decode_mode, compile="inductor" if "compile" in flags else None)
    engine.warmup()
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(3, model.cfg.vocab_size, (prompt_len,), generator=g).tolist()
        engine.add(str(i), prompt, SamplingParams(max_tokens=steps + 40, temperature=0.0))
    for _ in range(8):  # prefill, first tokens, a few steady decode steps
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:  # kernels, copies and memsets on the GPU
            rec = per_kernel[evt.name]
            rec[0] += 1
            rec[1] += evt.time_range.elapsed_us()
    busy_us = sum(v[1] for v in per_kernel.values()) / steps
    rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
    table = [{"kernel": name[:110], "per_step": round(cnt / steps, 2), "us_per_step": round(us / steps, 2),
              "pct": round(100 * us / steps / busy_us, 1)} for name, (cnt, us) in rows[:top]]
    return {"bench": "profile_decode", "batch": batch, "mode": mode, "steps": steps,
            "wall_ms_per_step": 1e3 * wall / steps, "gpu_busy_ms_per_step": busy_us / 1e3,
            "kernels_per_step": sum(v[0] for v in per_kernel.values()) / steps, "fused_norm": RMSNorm.fused_inference,
            "norm_kernels_per_step": sum(v[0] for k, v in per_kernel.items() if "rms_norm" in k) / steps,
            "fused_rope": RotaryEmbedding.fused_inference,
            "rope_kernels_per_step": sum(v[0] for k, v in per_kernel.items() if "_rope_kernel" in k) / steps,
            "fused_cache_write": MLA.fused_cache_write,
            "cache_write_kernels_per_step": sum(v[0] for k, v in per_kernel.items() if "_mla_prep_kernel" in k) / steps,
            "fused_router": Router.fused_inference,
            "router_kernels_per_step": sum(v[0] for k, v in per_kernel.items() if "_router_kernel" in k) / steps,
            "fused_router_logits": Router.fused_logits,
            "fused_mla": MLA.fused_decode_attention,
            "mla_kernels_per_step": sum(v[0] for k, v in per_kernel.items() if "_mla_" in k and "_mla_prep" not in k) / steps,
            "fused_shared": DeepSeekMoE.fused_shared,
            "moe_kernels_per_step": sum(v[0] for k, v in per_kernel.items()
                                        if any(n in k for n in MOE_KERNELS)) / steps,
            "top": table}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench_ref")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--modes", nargs="+", default=["graph", "graph+compile"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--fused-norm", default="on", choices=["on", "off"], help="RMSNorm.fused_inference for modes "
                   "without +norm / +nonorm")
    p.add_argument("--fused-rope", default="on", choices=["on", "off"], help="RotaryEmbedding.fused_inference for "
                   "modes without +rope / +norope")
    p.add_argument("--fused-cache-write", default="on", choices=["on", "off"], help="MLA.fused_cache_write for "
                   "modes without +cachewrite / +nocachewrite")
    p.add_argument("--fused-router", default="on", choices=["on", "off"], help="Router.fused_inference for modes "
                   "without +router / +norouter")
    p.add_argument("--fused-router-logits", default="on", choices=["on", "off"], help="Router.fused_logits for "
                   "modes without +routerlogits / +norouterlogits")
    p.add_argument("--fused-mla", default="off", choices=["on", "off"], help="MLA.fused_decode_attention for "
                   "modes without +mla / +nomla")
    p.add_argument("--fused-shared", default="on", choices=["on", "off"], help="DeepSeekMoE.fused_shared for "
                   "modes without +sharedfold / +nosharedfold")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    RMSNorm.fused_inference = args.fused_norm == "on"
    RotaryEmbedding.fused_inference = args.fused_rope == "on"
    MLA.fused_cache_write = args.fused_cache_write == "on"
    Router.fused_inference = args.fused_router == "on"
    Router.fused_logits = args.fused_router_logits == "on"
    MLA.fused_decode_attention = args.fused_mla == "on"
    DeepSeekMoE.fused_shared = args.fused_shared == "on"
    model = build_model(args.preset)
    rows = []
    for batch in args.batches:
        for mode in args.modes:
            r = profile_mode(model, batch, mode, args.steps, args.prompt_len, args.top)
            rows.append(r)
            print(f"## batch {batch} {mode}: wall {r['wall_ms_per_step']:.3f} ms/step, GPU busy "
                  f"{r['gpu_busy_ms_per_step']:.3f} ms/step, {r['kernels_per_step']:.0f} kernels/step "
                  f"({r['norm_kernels_per_step']:.0f} fused norm launches; fused_norm={r['fused_norm']}; "
                  f"{r['rope_kernels_per_step']:.0f} fused rope launches; fused_rope={r['fused_rope']}; "
                  f"{r['cache_write_kernels_per_step']:.0f} fused cache-write launches; "
                  f"fused_cache_write={r['fused_cache_write']}; "
                  f"{r['router_kernels_per_step']:.0f} fused router launches; fused_router={r['fused_router']}; "
                  f"fused_router_logits={r['fused_router_logits']}; "
                  f"{r['mla_kernels_per_step']:.0f} fused mla launches; fused_mla={r['fused_mla']}; "
                  f"{r['moe_kernels_per_step']:.0f} fused moe launches; fused_shared={r['fused_shared']})", flush=True)
            for t in r["top"]:
                print(f"  {t['us_per_step']:8.1f} us {t['pct']:5.1f}% x{t['per_step']:<5} {t['kernel']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
