"""Per-shape FP8 vs bf16 table for the linear layers of ``bench_ref`` (decides models/fp8.py's defaults).

For every linear shape of bench_ref at M = 8 × 2048 tokens (M × K × N), same run, same data:
  - ``bf16 mm``          F.linear(x, W) in bf16 (forward only);
  - ``fp8 mm only``      torch._scaled_mm on operands quantised beforehand (rowwise e4m3, bf16 out);
  - ``fp8 fwd +quant``   quantise x and W per call, then _scaled_mm, as one compiled function;
  - ``bf16 layer``       forward + backward of RMSNorm → linear, compiled (the producer the
                         quantisation fuses into), 6·M·K·N FLOPs counted for the linear only;
  - ``fp8 layer``        the same with models/fp8.py's fp8_linear (e4m3 forward and dgrad, bf16 wgrad).
Median of ``--iters`` CUDA-event timings after warm-up; inputs rotate over 4 buffers so repeated runs do
not measure the L2. Run on the GPU: ``python3 benchmarks/bench_fp8.py --out $OUT/fp8.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from moeflow.models import ModelConfig
from moeflow.models.fp8 import fp8_linear, quantize_rows
from moeflow.models.layers import RMSNorm


def shapes(cfg: ModelConfig, M: int) -> list[tuple[str, int, int, int]]:
    d, h = cfg.hidden_size, cfg.num_heads
    return [
        ("attn q_proj", M, d, h * cfg.qk_head_dim),
        ("attn kv_a_proj", M, d, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        ("attn kv_b_proj", M, cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
        ("attn o_proj", M, h * cfg.v_head_dim, d),
        ("dense gate/up", M, d, cfg.dense_intermediate_size),
        ("dense down", M, cfg.dense_intermediate_size, d),
        ("shared gate/up", M, d, cfg.num_shared_experts * cfg.moe_intermediate_size),
        ("shared down", M, cfg.num_shared_experts * cfg.moe_intermediate_size, d),
        ("routed gate_up (all slots, one GEMM)", M * cfg.num_experts_per_tok, d, 2 * cfg.moe_intermediate_size),
        ("lm_head", M, d, cfg.vocab_size),
    ]


def median_ms(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench_shape(name, M, K, N, iters) -> dict:
    dev, bf = "cuda", torch.bfloat16
    xs = [torch.randn(M, K, device=dev, dtype=bf) for _ in range(4)]
    w = (torch.randn(N, K, device=dev) * K ** -0.5).to(bf)
    qs = [quantize_rows(x) for x in xs]
    wq, sw = quantize_rows(w)
    i = [0]

    def nxt():
        i[0] = (i[0] + 1) % 4
        return i[0]

    def quant_mm(x, w_):
        xq, sx = quantize_rows(x)
        wq_, sw_ = quantize_rows(w_)
        return torch._scaled_mm(xq, wq_.t(), scale_a=sx, scale_b=sw_.t(), out_dtype=torch.bfloat16)

    quant_mm_c = torch.compile(quant_mm)
    norm = RMSNorm(K).to(dev, bf)

    def layer(x, w_, use_fp8: bool):
        h = norm(x)
        return fp8_linear(h, w_) if use_fp8 else F.linear(h, w_)

    layer_c = torch.compile(layer)
    wl = w.detach().clone().requires_grad_(True)
    xls = [x.detach().clone().requires_grad_(True) for x in xs]
    dys = [torch.randn(M, N, device=dev, dtype=bf) for _ in range(2)]

    def run_layer(use_fp8):
        k = nxt()
        layer_c(xls[k], wl, use_fp8).backward(dys[k % 2])
        xls[k].grad = None
        wl.grad = None

    flops = 2.0 * M * K * N
    row = {"shape": name, "M": M, "K": K, "N": N}
    times = {
        "bf16_mm": median_ms(lambda: F.linear(xs[nxt()], w), iters),
        "fp8_mm_only": median_ms(lambda: torch._scaled_mm(qs[nxt()][0], wq.t(), scale_a=qs[i[0]][1], scale_b=sw.t(),
                                                            out_dtype=bf), iters),
        "fp8_fwd_quant": median_ms(lambda: quant_mm_c(xs[nxt()], w), iters),
        "bf16_layer": median_ms(lambda: run_layer(False), iters),
        "fp8_layer": median_ms(lambda: run_layer(True), iters),
    }
    for k, ms in times.items():
        row[f"{k}_ms"] = ms
        row[f"{k}_tflops"] = (3 if "layer" in k else 1) * flops / (ms * 1e-3) / 1e12
    # accuracy of the fp8 forward against bf16 (relative Frobenius error)
    ref = F.linear(xs[0].float(), w.float())
    row["fp8_fwd_rel_err"] = ((quant_mm(xs[0], w).float() - ref).norm() / ref.norm()).item()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench_ref")
    p.add_argument("--tokens", type=int, default=8 * 2048)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8 needs a CUDA GPU (torch._scaled_mm on the tensor cores)")
        return 1
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    cfg = ModelConfig.preset(args.preset)
    rows = []
    for name, M, K, N in shapes(cfg, args.tokens):
        try:
            row = bench_shape(name, M, K, N, args.iters)
        except Exception as exc:  # one unsupported shape must not hide the others
            row = {"shape": name, "M": M, "K": K, "N": N, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.compiler.reset()
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print("\n| shape (M × K × N) | bf16 mm | fp8 mm only | fp8 fwd + quant (compiled) | bf16 layer fwd+bwd | "
          "fp8 layer fwd+bwd | fp8 rel. err |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} {r['M']}×{r['K']}×{r['N']} | ERROR {r['error'][:60]} | | | | | |")
            continue
        print(f"| {r['shape']} {r['M']}×{r['K']}×{r['N']} | {r['bf16_mm_tflops']:.0f} | {r['fp8_mm_only_tflops']:.0f} | "
              f"{r['fp8_fwd_quant_tflops']:.0f} | {r['bf16_layer_tflops']:.0f} | {r['fp8_layer_tflops']:.0f} | "
              f"{r['fp8_fwd_rel_err']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
