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

Serving engine rows (``models/serving``, continuous batching; ``--engine``):
- ``engine graph`` / ``engine eager``: B requests added at once to an ``Engine`` with B slots, CUDA-graph
  decode (buckets captured by ``warmup()`` before timing) or the dynamic eager step; stepped to the end.
  ``decode tok/s`` = B × (new − 1) ÷ the time after the step that produced every first token (prefill
  excluded); ``tokens_per_s`` = B × new ÷ the whole time (prefill included).
- ``engine graph int8``: the same on the INT8 weight-only copy (``models/quant.py``), with ``--int8``.
- ``engine graph+nonorm``: a mode flag for a peer row: the engine with ``RMSNorm.fused_inference`` off (the
  eager 8-kernel norm) where the other rows take the fused Triton norm (``--fused-norm``, on by default).
- ``engine graph+norope``: likewise the engine with ``RotaryEmbedding.fused_inference`` off (on by default: one
  Triton launch per RoPE instead of 9 kernels; ``--fused-rope`` sets it for every row, ``+rope`` turns it on for
  a row). Flags combine: ``graph+norope+nonorm``.
- ``engine graph+nocachewrite``: likewise ``MLA.fused_cache_write`` off (on by default: a cache step's latent norm,
  key RoPE, cat and cache write and the queries' RoPE in one Triton launch instead of 21 a layer, 5 with the fused
  RoPE; ``--fused-cache-write``, ``+cachewrite``).
- ``engine graph+nocachestep``: likewise ``MLA.fused_cache_step`` off (on by default: a decode step's key mask,
  counts, positions, attention mask and RoPE cos/sin in one Triton launch instead of 19; ``+cachestep``).
- ``engine graph+norouter``: likewise ``Router.fused_inference`` off (on by default: one Triton launch per router
  after its logits GEMV instead of 9 kernels; ``--fused-router``, ``+router``).
- ``engine graph+norouterlogits``: likewise ``Router.fused_logits`` off (on by default since its H100 run: the
  fused router's launch also forms the logits, so the two casts and the fp32 GEMV of ``Router.logits`` go, 4 launches
  a MoE layer become 1; ``--fused-router-logits``, ``+routerlogits``; it needs the fused router on).
- ``engine graph+mla``: likewise the engine with ``MLA.fused_decode_attention`` on (the absorbed attention's cat,
  bmm, masked fp32 softmax and second bmm as one Triton launch, two with a key split) where the other rows take
  the formula (``--fused-mla``, off by default); ``+nomla`` turns it off for a row. Under ``+compile`` it runs as
  a custom op the compiler keeps opaque: ``graph+compile+mla`` is the compiled step's peer row.
- ``engine graph+noboundary``: ``MoETransformer.defer_residual_add`` off (on by default: a cache step adds each
  block's output to the residual stream in the next block's input norm, one fused launch instead of two a block
  boundary); ``+boundary`` turns it on for a row.
- ``engine graph+nosharedfold``: likewise ``DeepSeekMoE.fused_shared`` off (on by default since its H100 run: the
  shared expert computed inside the fused routed-experts kernels, where they run, instead of 6 launches a MoE layer;
  ``--fused-shared``, ``+sharedfold``).
MBU (decode) = bytes a step must read ÷ step time ÷ bandwidth, where bytes = every weight except the
embedding table (one row per token is read) and the routed experts, + the routed experts' bytes × the
expected fraction of experts a batch of B tokens touches, 1 − (1 − k/E)^B, + the latent cache of the live
tokens (B × (prompt + new/2) × (kv_lora_rank + rope_dim) × layers × 2 bytes). Bandwidth: the 4.3 TB/s of
BENCHMARKS.md (H200) and the device-to-device copy bandwidth measured in the same run (bytes read + written).
INT8 rows also report the weight bytes, the peak GPU memory of the row, and the perplexity of the bf16
and INT8 models on ``--ppl-seqs`` sequences sampled from the bf16 model at temperature 1 (random weights:
the perplexity is the model's own, what matters is the INT8 − bf16 delta on the same tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time

import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.attention import MLA
from moeflow.models.generation import CudaGraphPool, generate
from moeflow.models.hf import export_hf
from moeflow.models.layers import RMSNorm, RotaryEmbedding
from moeflow.models.moe import DeepSeekMoE, Router, RoutedExperts
from moeflow.models.quant import model_bytes, quantize_int8
from moeflow.models.serving import Engine, SamplingParams

STATED_BW = 4.3e12  # BENCHMARKS.md: H200 copy bandwidth


# engine mode flag -> (the class, its switch) it sets: "+norm" on, "+nonorm" off (likewise rope, cachewrite, cachestep,
# router, routerlogits, mla, vproj (with mla: the value up-projection in its launches), boundary, sharedfold)
FUSED_SWITCHES = {"norm": (RMSNorm, "fused_inference"), "rope": (RotaryEmbedding, "fused_inference"),
                  "cachewrite": (MLA, "fused_cache_write"), "cachestep": (MLA, "fused_cache_step"),
                  "router": (Router, "fused_inference"),
                  "routerlogits": (Router, "fused_logits"), "mla": (MLA, "fused_decode_attention"),
                  "vproj": (MLA, "fused_value_projection"),
                  "boundary": (MoETransformer, "defer_residual_add"), "sharedfold": (DeepSeekMoE, "fused_shared"),
                  "moeorder": (RoutedExperts, "fused_decode_order")}


def fused_norm() -> bool | None:
    """RMSNorm.fused_inference now (None in trees without the fused norm)."""
    return getattr(RMSNorm, "fused_inference", None)


def fused_rope() -> bool | None:
    """RotaryEmbedding.fused_inference now (None in trees without the fused RoPE)."""
    return getattr(RotaryEmbedding, "fused_inference", None)


def fused_cache_write() -> bool | None:
    """MLA.fused_cache_write now (None in trees without the fused MLA cache step)."""
    return getattr(MLA, "fused_cache_write", None)
def fused_router() -> bool | None:
    """Router.fused_inference now (None in trees without the fused router)."""
    return getattr(Router, "fused_inference", None)


def fused_router_logits() -> bool | None:
    """Router.fused_logits now (None in trees without the logits in the fused router)."""
    return getattr(Router, "fused_logits", None)


def fused_mla() -> bool | None:
    """MLA.fused_decode_attention now (None in trees without the fused decode attention)."""
    return getattr(MLA, "fused_decode_attention", None)


def fused_shared() -> bool | None:
    """DeepSeekMoE.fused_shared now (None in trees without the shared expert's fold)."""
    return getattr(DeepSeekMoE, "fused_shared", None)


@contextlib.contextmanager
def fused_kernel_settings(mode: str):
    """The fused-kernel switches (``FUSED_SWITCHES``) for one engine row: off with the mode flag "+no<name>" (e.g.
    "+nonorm", "+nomla"), on with "+<name>", else as the ``--fused-*`` flags set them. A no-op for a switch the
    tree lacks."""
    flags = mode.split("+")[1:]
    saved = {(cls, attr): getattr(cls, attr) for cls, attr in FUSED_SWITCHES.values() if hasattr(cls, attr)}
    for name, (cls, attr) in FUSED_SWITCHES.items():
        if (cls, attr) in saved and (name in flags or "no" + name in flags):
            setattr(cls, attr, name in flags)
    try:
        yield
    finally:
        for (cls, attr), old in saved.items():
            setattr(cls, attr, old)


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


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 10, 2 GiB)."""
    src = torch.randn(2**29, device="cuda")  # 2 GiB of fp32
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * 2**31 / statistics.median(times)


def decode_bytes_per_step(model, batch: int, live_tokens_per_row: float) -> float:
    """What a decode step must read (see the module docstring): weights touched + the live latent cache."""
    cfg = model.cfg
    touched = 1 - (1 - cfg.num_experts_per_tok / max(cfg.num_routed_experts, 1)) ** batch
    total, seen = 0.0, set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        nbytes = t.numel() * t.element_size()
        if "embed_tokens" in name:
            nbytes = batch * t.shape[-1] * t.element_size()
        elif ".experts." in name:
            nbytes *= touched
        total += nbytes
    cache = batch * live_tokens_per_row * cfg.kv_cache_values_per_token * cfg.num_layers * 2
    return total + cache


def engine_decode(model, prompts: list[list[int]], new: int, mode: str) -> dict:
    """B requests at once through the serving engine; decode-only and whole-call tokens/s.
    ``mode``: a ``decode_mode``, with "+compile" for the inductor-compiled step (capture_s then includes
    compilation, which the warm-up call of the same model has mostly done) and "+sync" for the engine's
    overlap off (each step's tokens read back before the next step is launched)."""
    B = len(prompts)
    decode_mode, *flags = mode.split("+")
    engine = Engine(model, max_batch=B, context_len=len(prompts[0]) + new + 8, prefill_chunk=1 << 16,
                    decode_mode=decode_mode, compile="inductor" if "compile" in flags else None,
                    overlap=False if "sync" in flags else None)
    warm = time.perf_counter()
    engine.warmup()
    warm = time.perf_counter() - warm
    tokens: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add(str(i), p, SamplingParams(max_tokens=new, temperature=0.0))
    sync()
    t0 = time.perf_counter()
    steps = 0
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None:
                tokens.setdefault(ev.request_id, []).append(ev.token_id)
        steps += 1
        if steps == 1:
            sync()
            t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return {"decode_tokens_per_s": B * (new - 1) / (t2 - t1), "tokens_per_s": B * new / (t2 - t0),
            "step_ms": 1e3 * (t2 - t1) / max(steps - 1, 1), "steps": steps, "capture_s": warm,
            "graphs": engine.static.num_graphs if engine.static else 0,
            "tokens": [tokens[str(i)] for i in range(B)]}


@torch.no_grad()
def perplexity(model, seqs_BT: torch.Tensor, start: int) -> float:
    """exp(mean next-token cross-entropy) over positions >= start (the sampled part)."""
    logits = model(seqs_BT[:, :-1]).logits[:, start - 1:].float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs_BT[:, start:].reshape(-1))
    return float(torch.exp(ce))


def engine_rows(model, args, cuda: bool, bw: float | None) -> list[dict]:
    rows, g = [], torch.Generator().manual_seed(11)
    models = {"bf16" if cuda else "fp32": model}
    if args.int8:
        q = copy.deepcopy(model)
        report = quantize_int8(q)
        models["int8"] = q
        log(f"# int8: {report.num_linears} linears, {report.num_expert_stacks} expert stacks, "
            f"{report.bytes_before:,} -> {report.bytes_after:,} bytes")
    modes = ["graph", "eager"] if cuda else ["static", "eager"]
    if args.engine_compile:
        modes.insert(1, modes[0] + "+compile")
    if args.engine_modes:
        modes = args.engine_modes.split(",")
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(3, model.cfg.vocab_size, (B, args.prompt_len), generator=g).tolist()
        ref = None
        for label, m in models.items():
            for mode in (modes if label != "int8" else modes[:1]):
                with fused_kernel_settings(mode):  # "+nonorm" / "+norm", "+norope" / "+rope", ...: this row's paths
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    engine_decode(m, prompts, 4, mode)  # warm-up (kernels, allocator)
                    r = engine_decode(m, prompts, args.new_tokens, mode)
                    step_bytes = decode_bytes_per_step(m, B, args.prompt_len + args.new_tokens / 2)
                    row = {"bench": "engine_decode", "impl": f"engine {mode}", "weights": label, "batch": B,
                           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "fused_norm": fused_norm(),
                           "fused_rope": fused_rope(), "fused_cache_write": fused_cache_write(),
                           "fused_router": fused_router(), "fused_router_logits": fused_router_logits(),
                           "fused_mla": fused_mla(), "fused_shared": fused_shared(),
                           **{k: v for k, v in r.items() if k != "tokens"},
                           "weight_bytes": model_bytes(m), "bytes_per_step": step_bytes,
                           "mbu_stated_bw": step_bytes / (r["step_ms"] / 1e3) / STATED_BW,
                           "mbu_measured_bw": step_bytes / (r["step_ms"] / 1e3) / bw if bw else None,
                           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
                    row["teacher_forced"] = teacher_forced_check(m, prompts, r["tokens"])
                    if ref is None:
                        ref = r["tokens"]
                        row["equals_generate"] = r["tokens"] == generate(m, prompts, args.new_tokens).tokens
                    else:
                        row["prefix_agreement_with_first_row"] = prefix_agreement(ref, r["tokens"])
                    log(json.dumps(row))
                    rows.append(row)
    if args.int8:
        torch.manual_seed(3)
        starts = torch.randint(3, model.cfg.vocab_size, (args.ppl_seqs, 16)).tolist()
        sampled = generate(model, starts, args.ppl_len, temperature=1.0, seed=7).tokens
        seqs = torch.tensor([s + t for s, t in zip(starts, sampled)], device=model.lm_head.weight.device)
        ppl = {label: perplexity(m, seqs, 16) for label, m in models.items()}
        base = ppl["bf16" if cuda else "fp32"]
        row = {"bench": "int8_perplexity", "seqs": args.ppl_seqs, "tokens_per_seq": args.ppl_len, **ppl,
               "delta_pct": 100 * (ppl["int8"] - base) / base}
        log(json.dumps(row))
        rows.append(row)
    return rows


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
    p.add_argument("--engine", action="store_true", help="serving-engine rows (graph/eager) with MBU")
    p.add_argument("--engine-only", action="store_true", help="only the engine rows (and int8)")
    p.add_argument("--int8", action="store_true", help="engine rows on the INT8 model too, and perplexity")
    p.add_argument("--engine-compile", action="store_true", help="also the engine with its step compiled")
    p.add_argument("--engine-modes", default="", help="engine rows to run, e.g. graph+compile,graph+compile+sync "
                   "(+compile: inductor step; +sync: overlap off; +nonorm / +norm: the fused RMSNorm off / on for the "
                   "row; +norope / +rope: the fused RoPE off / on; +nocachewrite / +cachewrite: the fused MLA cache "
                   "step off / on; +nocachestep / +cachestep: a decode step's bookkeeping and RoPE table in one "
                   "launch off / on; +norouter / +router: the fused router off / on; +norouterlogits / +routerlogits: "
                   "the logits in it off / on; +nomla / +mla: the fused MLA decode attention off / on; +noboundary / "
                   "+boundary: the block boundary's residual add in the next norm off / on; +nosharedfold / "
                   "+sharedfold: the shared expert's fold into the fused MoE kernels off / on); the first also runs "
                   "on the INT8 model")
    p.add_argument("--moe-fused", default="auto", choices=["auto", "on", "off"],
                   help="RoutedExperts.fused_decode (the fused routed-experts kernels: slot-major at T·K < E, "
                   "expert-major up to 8·E), where the tree has it")
    p.add_argument("--fused-norm", default="on", choices=["on", "off"],
                   help="RMSNorm.fused_inference (one Triton launch per norm and per residual add + norm at inference "
                   "on CUDA) for every row; an engine mode's +nonorm / +norm flag overrides it for that row")
    p.add_argument("--fused-rope", default="on", choices=["on", "off"],
                   help="RotaryEmbedding.fused_inference (one Triton launch per RoPE at inference on CUDA) for every "
                   "row; an engine mode's +norope / +rope flag overrides it for that row")
    p.add_argument("--fused-cache-write", default="on", choices=["on", "off"],
                   help="MLA.fused_cache_write (a cache step's latent write and the queries' RoPE in one Triton launch "
                   "per layer on CUDA) for every row; an engine mode's +nocachewrite / +cachewrite overrides it")
    p.add_argument("--fused-router", default="on", choices=["on", "off"],
                   help="Router.fused_inference (one Triton launch per router after its logits at inference on CUDA) "
                   "for every row; an engine mode's +norouter / +router flag overrides it for that row")
    p.add_argument("--fused-router-logits", default="on", choices=["on", "off"],
                   help="Router.fused_logits (the fused router also forms the logits: one launch per MoE layer instead "
                   "of 4) for every row; an engine mode's +norouterlogits / +routerlogits flag overrides it")
    p.add_argument("--fused-mla", default="off", choices=["on", "off"],
                   help="MLA.fused_decode_attention (the absorbed decode attention in one or two Triton launches on "
                   "CUDA) for every row; an engine mode's +nomla / +mla flag overrides it for that row")
    p.add_argument("--fused-shared", default="on", choices=["on", "off"],
                   help="DeepSeekMoE.fused_shared (the shared expert inside the fused routed-experts kernels where "
                   "they run) for every row; an engine mode's +nosharedfold / +sharedfold overrides it for that row")
    p.add_argument("--ppl-seqs", type=int, default=16)
    p.add_argument("--ppl-len", type=int, default=240)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg = ModelConfig.preset("tiny" if args.smoke else args.preset)
    from moeflow.models.moe import RoutedExperts

    if hasattr(RoutedExperts, "fused_decode"):  # older trees have no fused path: the flag is then a no-op
        RoutedExperts.fused_decode = {"auto": None, "on": True, "off": False}[args.moe_fused]
    if fused_norm() is not None:  # older trees have no fused norm: the flag is then a no-op
        RMSNorm.fused_inference = args.fused_norm == "on"
    if fused_rope() is not None:  # likewise the fused RoPE
        RotaryEmbedding.fused_inference = args.fused_rope == "on"
    if fused_cache_write() is not None:  # likewise the fused MLA cache step
        MLA.fused_cache_write = args.fused_cache_write == "on"
    if fused_router() is not None:  # likewise the fused router
        Router.fused_inference = args.fused_router == "on"
    if fused_router_logits() is not None:  # likewise the logits in it
        Router.fused_logits = args.fused_router_logits == "on"
    if fused_mla() is not None:  # and the fused MLA decode attention
        MLA.fused_decode_attention = args.fused_mla == "on"
    if fused_shared() is not None:  # and the shared expert's fold
        DeepSeekMoE.fused_shared = args.fused_shared == "on"
    if args.smoke:
        args.batches, args.prompt_len, args.new_tokens, args.repeats = "1,3", 8, 6, 1
        args.ppl_seqs, args.ppl_len = 2, 16
    if args.engine_only:
        args.engine, args.skip_hf = True, True
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

    rows = []
    if args.engine:
        bw = copy_bandwidth() if cuda else None
        if bw:
            log(f"# device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)")
            rows.append({"bench": "copy_bandwidth", "bytes_per_s": bw})
        rows += engine_rows(model, args, cuda, bw)
    if args.engine_only:
        _finish(args, rows)
        return 0
    # one pool per variant, shared by both batch sizes; length 256 holds 64 + 128 (+1) slots, so the
    # 2-token and 128-token calls reuse one captured graph (and one compilation) per batch size
    pool, pool_compiled = CudaGraphPool(length_multiple=256), CudaGraphPool(compile_step=True, length_multiple=256)
    L, H = cfg.num_layers, cfg.num_heads
    ours_bpt = cfg.kv_cache_values_per_token * L * 2
    mha_bpt = H * (cfg.qk_head_dim + cfg.v_head_dim) * L * 2
    rows.append({"bench": "kv_cache_bytes_per_token", "moeflow_latent": ours_bpt, "full_mha": mha_bpt,
                 "ratio": mha_bpt / ours_bpt})
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
                   "fused_norm": fused_norm(), "fused_rope": fused_rope(), "fused_cache_write": fused_cache_write(),
                   "fused_router": fused_router(), "fused_router_logits": fused_router_logits(),
                   "fused_mla": fused_mla(), "fused_shared": fused_shared(),
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
    _finish(args, rows)
    log(f"\nKV cache bytes/token (all {L} layers, bf16): moeflow latent {ours_bpt:,} vs full MHA {mha_bpt:,} "
        f"({mha_bpt / ours_bpt:.1f}x)")
    log("| impl | batch | tokens/s (whole call) | steady tokens/s | seconds |")
    log("| --- | --- | --- | --- | --- |")
    for r in rows:
        if r["bench"] == "decode" and "error" not in r:
            steady = f"{r['steady_tokens_per_s']:,.0f}" if "steady_tokens_per_s" in r else ""
            log(f"| {r['impl']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {steady} | {r['seconds']:.2f} |")
    return 0


def _finish(args, rows: list[dict]) -> None:
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    eng = [r for r in rows if r["bench"] == "engine_decode"]
    if eng:
        log("\n| impl | weights | batch | decode tok/s | step ms | tok/s (whole) | MBU (4.3 TB/s) | MBU (measured bw) | peak GiB |")
        log("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in eng:
            mbu_m = f"{100 * r['mbu_measured_bw']:.1f} %" if r["mbu_measured_bw"] else ""
            peak = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] else ""
            log(f"| {r['impl']} | {r['weights']} | {r['batch']} | {r['decode_tokens_per_s']:,.0f} | {r['step_ms']:.2f} | "
                f"{r['tokens_per_s']:,.0f} | {100 * r['mbu_stated_bw']:.1f} % | {mbu_m} | {peak} |")


if __name__ == "__main__":
    sys.exit(main())
