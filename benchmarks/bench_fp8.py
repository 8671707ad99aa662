"""Per-shape FP8 vs bf16 table for the linear layers of ``bench_ref`` (decides models/fp8.py's defaults).

For every linear shape of bench_ref at M = 8 × 2048 tokens (M × K × N), same run, same data:
  - ``bf16 mm``          F.linear(x, W) in bf16 (forward only);
  - ``fp8 mm only``      torch._scaled_mm on operands quantised beforehand (rowwise e4m3, bf16 out);
  - ``fp8 fwd +quant``   quantise x and W per call, then _scaled_mm, as one compiled function;
  - ``bf16 layer``       forward + backward of RMSNorm → linear, compiled (the producer the
                         quantisation fuses into), 6·M·K·N FLOPs counted for the linear only;
  - ``fp8 layer``        the same with models/fp8.py's fp8_linear (e4m3 forward and dgrad, bf16 wgrad).
Then the routed experts' grouped GEMMs (M × k slots over E experts, balanced, groups padded to 16 rows):
  - ``bf16 grouped``     torch._grouped_mm (what RoutedExperts runs in bf16);
  - ``fp8 grouped only`` torch._scaled_grouped_mm on pre-quantised operands (rowwise e4m3);
  - ``fp8 fwd +quant``   quantise + _scaled_grouped_mm, compiled;
  - ``bf16 / fp8 layer`` forward + backward of an element-wise producer (SwiGLU of the slots) → grouped
                         GEMM, compiled; fp8 = models/fp8.py's fp8_grouped_mm (e4m3 fwd + dgrad, bf16 wgrad).
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
from moeflow.models.fp8 import FP8_GROUP_ALIGN, fp8_grouped_mm, fp8_linear, quantize_rows
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


def grouped_shapes(cfg: ModelConfig, M: int) -> list[tuple[str, int, int, int, int]]:
    slots, d, f = M * cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    E = cfg.num_routed_experts
    return [("routed gate_up (grouped)", E, slots, d, 2 * f), ("routed down (grouped)", E, slots, f, d)]


def bench_grouped(name, E, S, K, N, iters) -> dict:
    dev, bf = "cuda", torch.bfloat16
    per = -(-S // E // FP8_GROUP_ALIGN) * FP8_GROUP_ALIGN  # balanced groups, 16-row aligned
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * per
    M = per * E
    xs = [torch.randn(M, 2 * K, device=dev, dtype=bf) for _ in range(2)]  # SwiGLU input (gate | up)
    hs = [F.silu(x[:, :K]) * x[:, K:] for x in xs]
    w = (torch.randn(E, N, K, device=dev) * K ** -0.5).to(bf)
    qs = [quantize_rows(h) for h in hs]
    wq, sw = quantize_rows(w)
    i = [0]

    def nxt():
        i[0] = (i[0] + 1) % 2
        return i[0]

    def quant_gmm(h, w_):
        hq, sh = quantize_rows(h)
        wq_, sw_ = quantize_rows(w_)
        return torch._scaled_grouped_mm(hq, wq_.transpose(-2, -1), sh.squeeze(-1), sw_.squeeze(-1), offs=offs,
                                        out_dtype=bf)

    quant_gmm_c = torch.compile(quant_gmm)

    def layer(x, w_, use_fp8: bool):
        h = F.silu(x[:, :K]) * x[:, K:]
        return fp8_grouped_mm(h, w_, offs) if use_fp8 else torch._grouped_mm(h, w_.transpose(-2, -1), offs=offs)

    layer_c = torch.compile(layer)
    wl = w.detach().clone().requires_grad_(True)
    xls = [x.detach().clone().requires_grad_(True) for x in xs]
    dy = torch.randn(M, N, device=dev, dtype=bf)

    def run_layer(use_fp8):
        k = nxt()
        layer_c(xls[k], wl, use_fp8).backward(dy)
        xls[k].grad = None
        wl.grad = None

    flops = 2.0 * M * K * N
    row = {"shape": name, "E": E, "M": M, "K": K, "N": N}
    times = {
        "bf16_mm": median_ms(lambda: torch._grouped_mm(hs[nxt()], w.transpose(-2, -1), offs=offs), iters),
        "fp8_mm_only": median_ms(lambda: torch._scaled_grouped_mm(
            qs[nxt()][0], wq.transpose(-2, -1), qs[i[0]][1].squeeze(-1), sw.squeeze(-1), offs=offs, out_dtype=bf), iters),
        "fp8_fwd_quant": median_ms(lambda: quant_gmm_c(hs[nxt()], w), iters),
        "bf16_layer": median_ms(lambda: run_layer(False), iters),
        "fp8_layer": median_ms(lambda: run_layer(True), iters),
    }
    for k, ms in times.items():
        row[f"{k}_ms"] = ms
        row[f"{k}_tflops"] = (3 if "layer" in k else 1) * flops / (ms * 1e-3) / 1e12
    ref = torch._grouped_mm(hs[0].float(), w.float().transpose(-2, -1), offs=offs)
    row["fp8_fwd_rel_err"] = ((quant_gmm(hs[0], w).float() - ref).norm() / ref.norm()).item()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench_ref")
    p.add_argument("--tokens", type=int, default=8 * 2048)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default="")
    p.add_argument("--grouped-only", action="store_true", help="only the routed experts' grouped GEMMs")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8 needs a CUDA GPU (torch._scaled_mm on the tensor cores)")
        return 1
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    cfg = ModelConfig.preset(args.preset)
    rows = []
    cases = [] if args.grouped_only else [(bench_shape, (n, M, K, N)) for n, M, K, N in shapes(cfg, args.tokens)]
    cases += [(bench_grouped, g) for g in grouped_shapes(cfg, args.tokens)]
    for fn, spec in cases:
        name, K, N = spec[0], spec[-2], spec[-1]
        try:
            row = fn(*spec, args.iters)
        except Exception as exc:  # one unsupported shape must not hide the others
            row = {"shape": name, "M": spec[-3], "K": K, "N": N, "error": f"{type(exc).__name__}: {exc}"[:300]}
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
