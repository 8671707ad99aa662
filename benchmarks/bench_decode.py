"""Decode throughput with the latent MLA cache, beside transformers' ``generate`` on the same weights.

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_decode.py --out results/decode.jsonl

``bench_ref`` in bf16, random weights (a random routing bias too), 64-token random prompts, 128 new
tokens, greedy, batch 1 and 32. Our model is exported with ``export_hf`` and loaded by
transformers (``DeepseekV3ForCausalLM``, SDPA), so both run the same weights.

Rows:
- ``moeflow cached``      ``generate()`` with the dynamic latent cache (eager kernels);
- ``moeflow cuda_graph (capture per call)``  ``generate(cuda_graph=True)``: static cache, one decode step
  captured as a CUDA graph in every call and replayed;
- ``moeflow cuda_graph pool``  the same with a ``CudaGraphPool`` kept across calls (captured once per shape);
- ``moeflow cuda_graph pool + compile``  the pooled graph of a ``torch.compile``d step (fused kernels);
- ``hf generate``         ``model.generate(do_sample=False, min_new_tokens=max_new_tokens)``.
tokens/s = batch × new tokens ÷ wall time of the whole call (prefill, graph capture included);
``steady tok/s`` excludes prefill and capture: batch × (128 − 2) ÷ (t(128 new) − t(2 new)).
KV-cache bytes per token (all layers): ours (kv_lora_rank + rope_dim) × layers × 2 bytes, vs full
multi-head attention H × (qk_head_dim + v_head_dim) × layers × 2 bytes, and what transformers'
cache actually holds after a prefill.
Correctness beside speed: ``teacher_forced`` compares every generated token with the argmax of a full
uncached forward over prompt + completion (see ``teacher_forced_check``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.generation import CudaGraphPool, generate
from moeflow.models.hf import export_hf


def log(msg: str) -> None:
    print(msg, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each row's tokens before the first disagreement."""
    fracs = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        fracs.append(n / max(len(x), 1))
    return sum(fracs) / len(fracs)


@torch.no_grad()
def teacher_forced_check(model, prompts: list[list[int]], tokens: list[list[int]]) -> dict:
    """Does each generated token equal the argmax of a full (uncached) forward over prompt + completion?

    With random bf16 weights the logits are nearly flat, so rounding differences between two correct
    implementations flip near-ties and token sequences diverge early; the logit GAP (max logit minus
    the chosen token's logit) still tells a correct decode (gaps at the bf16 rounding level) from a
    broken one (gaps like the logit spread).
    """
    ids = torch.tensor([p + t for p, t in zip(prompts, tokens)], device=model.lm_head.weight.device)
    P = len(prompts[0])
    pred_BNV = model(ids).logits[:, P - 1: -1].float()
    chosen_BN = pred_BNV.gather(-1, ids[:, P:, None]).squeeze(-1)
    gap_BN = pred_BNV.max(-1).values - chosen_BN
    return {"argmax_match": (gap_BN == 0).float().mean().item(), "gap_mean": gap_BN.mean().item(),
            "gap_max": gap_BN.max().item(), "logit_std": pred_BNV.std().item()}


def hf_cache_bytes_per_token(hf_model, ids_BT) -> float | None:
    try:
        with torch.no_grad():
            pkv = hf_model(input_ids=ids_BT, use_cache=True).past_key_values
        total = 0
        for layer in pkv.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total / ids_BT.numel()
    except Exception as exc:  # a cache layout this script does not know: report, do not fail
        log(f"# could not read transformers' cache size: {type(exc).__name__}: {exc}")
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench_ref")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--impls", default="all", help="comma-separated substrings of the moeflow rows to run, or all")
    p.add_argument("--out", default="")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg = ModelConfig.preset("tiny" if args.smoke else args.preset)
    if args.smoke:
        args.batches, args.prompt_len, args.new_tokens, args.repeats = "1,3", 8, 6, 1
    if cuda:
        log(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(device, dtype).eval()
    with torch.no_grad():
        for r in model.routers():
            r.e_score_correction_bias.normal_(0.0, 0.02)
    hf_model = None
    if not args.skip_hf:
        import transformers
        log(f"# transformers {transformers.__version__}")
        with tempfile.TemporaryDirectory() as d:
            export_hf(model, d, dtype=dtype)
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                d, dtype=dtype, attn_implementation="sdpa").to(device).eval()

    # one pool per variant, shared by both batch sizes; length 256 holds 64 + 128 (+1) slots, so the
    # 2-token and 128-token calls reuse one captured graph (and one compilation) per batch size
    pool, pool_compiled = CudaGraphPool(length_multiple=256), CudaGraphPool(compile_step=True, length_multiple=256)
    L, H = cfg.num_layers, cfg.num_heads
    ours_bpt = cfg.kv_cache_values_per_token * L * 2
    mha_bpt = H * (cfg.qk_head_dim + cfg.v_head_dim) * L * 2
    rows = [{"bench": "kv_cache_bytes_per_token", "moeflow_latent": ours_bpt, "full_mha": mha_bpt,
             "ratio": mha_bpt / ours_bpt}]
    g = torch.Generator().manual_seed(5)
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(3, cfg.vocab_size, (B, args.prompt_len), generator=g).tolist()
        results = {}
        impls = [("moeflow cached", {}), ("moeflow cuda_graph (capture per call)", {"cuda_graph": True}),
                 ("moeflow cuda_graph pool", {"cuda_graph": pool}),
                 ("moeflow cuda_graph pool + compile", {"cuda_graph": pool_compiled})]
        for name, kw in impls:
            if name not in args.impls and args.impls != "all":
                continue
            if kw.get("cuda_graph") is not None and kw.get("cuda_graph") is not False and not cuda:
                continue
            run = lambda n, kw=kw: generate(model, prompts, n, sync_every=64, **kw)  # noqa: E731
            try:
                t_warm, _ = wall(lambda: run(4), 1)  # warm-up (kernels, allocator, graph capture, compile)
                t_full, res = wall(lambda: run(args.new_tokens), args.repeats)
                t_two, _ = wall(lambda: run(2), args.repeats)
            except Exception as exc:  # one failing variant must not hide the others
                log(f"!! {name} failed: {type(exc).__name__}: {exc}")
                rows.append({"bench": "decode", "impl": name, "batch": B, "error": f"{type(exc).__name__}: {exc}"})
                continue
            results[name] = res.tokens
            row = {"bench": "decode", "impl": name, "batch": B, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "seconds": t_full, "warmup_s": t_warm,
                   "tokens_per_s": B * args.new_tokens / t_full,
                   "steady_tokens_per_s": B * (args.new_tokens - 2) / max(t_full - t_two, 1e-9),
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                   "teacher_forced": teacher_forced_check(model, prompts, res.tokens)}
            log(json.dumps(row))
            rows.append(row)
        if hf_model is not None:
            ids = torch.tensor(prompts, device=device)
            mask = torch.ones_like(ids)

            def hf_run(n):
                with torch.no_grad():
                    return hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                             do_sample=False, pad_token_id=0)

            hf_run(4)
            t_full, out = wall(lambda: hf_run(args.new_tokens), max(1, args.repeats - 2))
            hf_tokens = out[:, args.prompt_len:].tolist()
            row = {"bench": "decode", "impl": "hf generate", "batch": B, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "seconds": t_full, "tokens_per_s": B * args.new_tokens / t_full,
                   "greedy_prefix_agreement_with_ours": prefix_agreement(results["moeflow cached"], hf_tokens),
                   "teacher_forced_on_our_model": teacher_forced_check(model, prompts, hf_tokens)}
            if B == 1:
                row["hf_cache_bytes_per_token"] = hf_cache_bytes_per_token(hf_model, ids)
            log(json.dumps(row))
            rows.append(row)
        for name, toks in results.items():
            if name != "moeflow cached":
                rows.append({"bench": "decode_agreement", "batch": B, "impl": name,
                             "prefix_agreement_with_eager_cached": prefix_agreement(results["moeflow cached"], toks)})
                log(json.dumps(rows[-1]))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    log(f"\nKV cache bytes/token (all {L} layers, bf16): moeflow latent {ours_bpt:,} vs full MHA {mha_bpt:,} "
        f"({mha_bpt / ours_bpt:.1f}x)")
    log("| impl | batch | tokens/s (whole call) | steady tokens/s | seconds |")
    log("| --- | --- | --- | --- | --- |")
    for r in rows:
        if r["bench"] == "decode" and "error" not in r:
            steady = f"{r['steady_tokens_per_s']:,.0f}" if "steady_tokens_per_s" in r else ""
            log(f"| {r['impl']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {steady} | {r['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
