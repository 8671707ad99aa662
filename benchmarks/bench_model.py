"""Training-step and MoE-layer benchmarks for the moeflow model, beside transformers' DeepseekV3 (same run).

Imports only torch / numpy / transformers / moeflow.models, so it runs on the GPU image without the
platform's dependencies:

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_model.py --out results/model.jsonl

Training step (``--parts train``): ``bench_ref`` (BENCHMARKS.md), B=8 × S=2048, bf16 parameters,
``torch.optim.AdamW(fused=True)``, forward + backward + optimiser step (+ our router-bias update),
on the same random tokens for every implementation:
  - ``moeflow eager``      MoETransformer as is (SDPA flash attention, grouped_mm experts);
  - ``moeflow compiled``   the same with ``compile_blocks`` (torch.compile per decoder block);
  - ``hf``                 transformers ``DeepseekV3ForCausalLM`` built from our exported config
                           (SDPA attention, transformers' default experts implementation);
  - ``torchtitan``         torchtitan's ``DeepSeekV3Model`` with the same sizes, compiled as torchtitan's
                           ``apply_compile`` does (each block, the routed experts left eager), its
                           compiled sum-CE loss and its aux-loss-free bias update (``torchtitan_eager``: no
                           compile). Parameters bf16 like ours (its complex RoPE table stays complex64).
An implementation may carry options after ``+``: ``compiled+ac=selective`` (activation checkpointing
policy, every block), ``compiled+b=16`` (micro-batch), ``compiled+fp8=attn.dense.shared`` (FP8 linear
groups, models/fp8.py; ``+e5m2`` for e5m2 gradients), ``compiled+mode=max-autotune-no-cudagraphs``
(torch.compile mode), ``+graph`` (the whole step replayed as one CUDA graph, models/kernels/graph_step.py),
``+ind.<key>=<value>`` (a ``torch._inductor.config`` setting while that row builds and runs, e.g.
``+ind.coordinate_descent_tuning=1``),
``+opt=triton`` (the AdamW: ``fused`` default, ``triton``/``triton_exact`` = models/kernels/adamw.py, ``compiled``
= torch's for-each AdamW under torch.compile; see ``train_step_fn``); ``torchtitan+b=16`` takes ``b`` too.
Reported: median step time over ``--steps`` timed steps (CUDA events) after ``--warmup`` steps,
tokens/s, MFU and peak memory.
MFU = (6 × active non-embedding params + causal attention FLOPs) × tokens/s ÷ 790 TFLOP/s (H200), i.e.
``ModelConfig.flops_per_token(S)`` × tokens/s ÷ 790e12 (BENCHMARKS.md).

MoE layer (``--parts moe``): T=16384 tokens, D=1024, E=64, k=6, F=512, forward + backward of the
routed experts (random top-k choices, 18·T·k·D·F FLOPs), grouped_mm vs the per-expert loop, and
the whole DeepSeekMoE layer (router + shared expert + routed experts) eager and compiled.

``--smoke`` shrinks everything (tiny preset, few steps) to check the script itself, also on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time

import torch
import torch._inductor.config  # noqa: F401  (the ind.* options patch it)

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.moe import DeepSeekMoE, RoutedExperts
from moeflow.models.transformer import compile_blocks, set_activation_checkpointing

PEAK_FLOPS = 790e12  # bf16 dense matmul rate of the H200 (BENCHMARKS.md; 798 was the lent H100)


def log(msg: str) -> None:
    print(msg, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(fn, steps: int, warmup: int) -> list[float]:
    """Per-call seconds (CUDA events on GPU, wall clock on CPU) after warm-up calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def free_memory() -> None:
    """Also forgets every compiled graph: each implementation compiles afresh (no recompile-limit
    fallback to eager after many models in one process) under the default dynamo settings."""
    torch.compiler.reset()
    torch._dynamo.config.capture_scalar_outputs = False  # torchtitan's apply_compile sets it True
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


# ============================================================================ training step

def parse_impl(spec: str) -> tuple[str, dict]:
    """'compiled+ac=full+b=16' -> ('compiled', {'ac': 'full', 'b': '16'}); a bare flag maps to '1'."""
    kind, *opts = spec.split("+")
    return kind, dict((o.split("=", 1) + ["1"])[:2] for o in opts)


def inductor_settings(opts: dict) -> dict:
    """``{'ind.coordinate_descent_tuning': '1'}`` -> ``{'coordinate_descent_tuning': True}`` (typed like the default)."""
    import torch._inductor.config as ind

    out = {}
    for key, raw in opts.items():
        if not key.startswith("ind."):
            continue
        name = key[4:]
        default = getattr(ind, name)  # an unknown key fails here, with its name
        out[name] = raw.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(raw)
    return out


def build_ours(cfg: ModelConfig, device, dtype, compiled: bool, opts: dict | None = None):
    from moeflow.models import fp8

    opts = opts or {}
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(device=device, dtype=dtype).train()
    if opts.get("ac", "none") != "none":
        set_activation_checkpointing(model, opts["ac"])
    if opts.get("fp8"):
        fp8.enable_fp8(model, opts["fp8"].split("."), grad_dtype=fp8.E5M2 if "e5m2" in opts else fp8.E4M3)
    if compiled:
        compile_blocks(model, **({"mode": opts["mode"]} if "mode" in opts else {}))
    return model


def build_torchtitan(cfg: ModelConfig, device, dtype, compiled: bool):
    """torchtitan 0.2.2's DeepSeek-V3 at our sizes, set up as its single-GPU trainer would."""
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model, DeepSeekV3ModelArgs
    from torchtitan.models.moe import MoEArgs

    args = DeepSeekV3ModelArgs(
        vocab_size=cfg.vocab_size, dim=cfg.hidden_size, inter_dim=cfg.dense_intermediate_size,
        moe_inter_dim=cfg.moe_intermediate_size, n_layers=cfg.num_layers, n_dense_layers=cfg.first_k_dense,
        n_heads=cfg.num_heads, norm_eps=cfg.rms_norm_eps,
        moe_args=MoEArgs(num_experts=cfg.num_routed_experts, num_shared_experts=cfg.num_shared_experts,
                         top_k=cfg.num_experts_per_tok, score_func=cfg.score_func, route_norm=cfg.norm_topk_prob,
                         route_scale=cfg.route_scale, score_before_experts=False,
                         use_grouped_mm=str(device).startswith("cuda"),
                         load_balance_coeff=cfg.bias_update_gamma),
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, max_seq_len=cfg.max_seq_len,
        original_seq_len=cfg.max_seq_len, rope_theta=cfg.rope_theta)
    args.moe_impl = "standard"  # what update_from_config sets without expert parallelism
    torch.manual_seed(0)
    with torch.device(device), torch.no_grad():  # torchtitan's trainer initialises under no_grad too
        model = DeepSeekV3Model(args)
        model.init_weights(buffer_device=torch.device(device))
    for p in model.parameters():  # bf16 weights like ours; buffers (complex RoPE, fp32 bias) untouched
        p.data = p.data.to(dtype)
    model.train()
    loss_fn = _torchtitan_loss
    if compiled:
        from types import SimpleNamespace

        from torchtitan.models.llama4.infra.parallelize import apply_compile

        apply_compile(model, SimpleNamespace(backend="inductor"), ep_enabled=False)
        loss_fn = torch.compile(_torchtitan_loss)
    return model, loss_fn


def _torchtitan_loss(pred, labels):
    return torch.nn.functional.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum",
                                             ignore_index=-100)


def torchtitan_step_fn(model, loss_fn, ids_BT, targets_BT):
    """torchtitan's train step: sum-CE / token count, backward, its expert-bias pre-step hook, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=ids_BT.is_cuda)
    moes = [b.moe for b in model.layers.values() if b.moe_enabled]
    n_tokens = (targets_BT != -100).sum()

    def step():
        loss = loss_fn(model(ids_BT), targets_BT) / n_tokens
        loss.backward()
        with torch.no_grad():
            tpe_LE = torch.vstack([m.tokens_per_expert for m in moes])
            for m, tpe in zip(moes, tpe_LE):
                delta = m.load_balance_coeff * torch.sign(tpe.mean() - tpe)
                m.expert_bias.add_(delta - delta.mean())
                m.tokens_per_expert.zero_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def build_hf(cfg: ModelConfig, device, dtype):
    import transformers
    from moeflow.models.hf import config_to_hf

    d = config_to_hf(cfg, dtype)
    for k in ("architectures", "model_type", "dtype", "torch_dtype", "rope_theta", "rope_scaling"):
        d.pop(k, None)
    hf_cfg = transformers.DeepseekV3Config(**d)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).train()


def train_step_fn(model, kind: str, ids_BT, targets_BT, graph: bool = False, opt_impl: str = "fused"):
    """One optimiser step per call; ``graph=True`` replays it as one CUDA graph after 3 eager calls
    (models/kernels/graph_step.py; AdamW then runs with capturable=True). ``opt_impl`` (``+opt=``) picks the
    AdamW: ``fused`` (torch's, the default), ``triton`` / ``triton_exact`` (models/kernels/adamw.py),
    ``compiled`` (torch's for-each under torch.compile), ``foreach`` (benchmarks/bench_adamw.make_adamw)."""
    if opt_impl == "fused":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=ids_BT.is_cuda,
                                capturable=graph and ids_BT.is_cuda)
    else:
        from bench_adamw import make_adamw  # this script's folder is on sys.path

        opt = make_adamw(list(model.parameters()), opt_impl, lr=1e-4, weight_decay=0.1, capturable=graph)

    def body(ids, targets):
        if kind == "hf":
            loss = model(input_ids=ids, labels=ids).loss  # HF shifts labels itself
        else:
            out = model(ids, targets=targets)
            loss = out.loss
        loss.backward()
        opt.step()
        if kind != "hf":
            model.apply_router_bias_update(out.aux["tokens_per_expert"])
        return loss.detach()

    if graph:
        from moeflow.models.kernels.graph_step import GraphedStep, make_capture_safe

        make_capture_safe(model)
        graphed = GraphedStep(body, [opt], warmup_steps=3)
        return lambda: graphed(ids_BT, targets_BT)

    def step():
        loss = body(ids_BT, targets_BT)
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def make_tokens(cfg: ModelConfig, B: int, S: int, device):
    """The same random tokens for every implementation (first rows equal across batch sizes)."""
    g = torch.Generator().manual_seed(1234)
    ids_BT = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(device)
    targets_BT = torch.full_like(ids_BT, -100)
    targets_BT[:, :-1] = ids_BT[:, 1:]
    return ids_BT, targets_BT


def bench_train(cfg: ModelConfig, args, device, dtype) -> list[dict]:
    S = args.seq
    flops_tok = cfg.flops_per_token(S)
    log(f"# bench_ref-like config: {cfg.num_params() / 1e6:.1f} M params, "
        f"{cfg.num_params(active=True, embedding=False) / 1e6:.1f} M active non-embedding, "
        f"{flops_tok / 1e9:.3f} GFLOP/token (6N + attention)")
    rows = []
    for spec in args.impls.split(","):
        kind, opts = parse_impl(spec)
        free_memory()
        t_build = time.perf_counter()
        B = int(opts.get("b", args.batch))
        ids_BT, targets_BT = make_tokens(cfg, B, S, device)
        try:
            settings = contextlib.ExitStack()
            settings.enter_context(torch._inductor.config.patch(inductor_settings(opts)))
            if kind == "hf":
                model = build_hf(cfg, device, dtype)
                note = f"transformers SDPA, experts={model.config._experts_implementation}"
                step = train_step_fn(model, kind, ids_BT, targets_BT, graph="graph" in opts)
            elif kind.startswith("torchtitan"):
                model, loss_fn = build_torchtitan(cfg, device, dtype, compiled=(kind == "torchtitan"))
                note = "torchtitan apply_compile" if kind == "torchtitan" else "torchtitan eager"
                step = torchtitan_step_fn(model, loss_fn, ids_BT, targets_BT)
            else:
                model = build_ours(cfg, device, dtype, compiled=(kind == "compiled"), opts=opts)
                note = ("compile_blocks" if kind == "compiled" else "eager") + "".join(
                    f" {k}={v}" for k, v in opts.items() if k != "b")
                step = train_step_fn(model, kind, ids_BT, targets_BT, graph="graph" in opts,
                                     opt_impl=opts.get("opt", "fused"))
            first = time.perf_counter()
            step()
            sync()
            first = time.perf_counter() - first
            times = timed_steps(step, args.steps, args.warmup)
            settings.close()
        except Exception as exc:  # record and go on: one broken implementation must not hide the others
            log(f"!! {spec} failed: {type(exc).__name__}: {exc}")
            rows.append({"bench": "train_step", "impl": spec, "error": f"{type(exc).__name__}: {exc}"})
            model = step = None
            settings.close()
            continue
        med = statistics.median(times)
        tok_s = B * S / med
        row = {"bench": "train_step", "impl": spec, "note": note, "batch": B, "seq": S,
               "step_s_median": med, "step_s_min": min(times), "step_s_max": max(times),
               "tokens_per_s": tok_s, "mfu": flops_tok * tok_s / PEAK_FLOPS, "peak_mem_gib": peak_gib(),
               "first_step_s": first, "build_s": time.perf_counter() - t_build - sum(times)}
        log(json.dumps(row))
        rows.append(row)
        if args.profile and spec == args.profile:
            profile_steps(step, args)
        del model, step
    return rows


def profile_steps(step, args) -> None:
    """Two profiled steps: the kernels by self device time (what the GPU spends its time on), then
    the summed kernel time against the wall time of the two steps (the rest is idle GPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        sync()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=90)
    busy_us = sum(e.self_device_time_total for e in events) if cuda else float("nan")
    summary = (f"\n# 2 profiled steps: wall {wall * 1e3:.1f} ms, summed kernel time {busy_us / 1e3:.1f} ms "
               f"({busy_us / 1e6 / wall:.1%} of wall; profiler overhead included in wall)\n")
    log(table + summary)
    if args.profile_out:
        with open(args.profile_out, "w") as f:
            f.write(table + summary)


# ============================================================================ MoE layer

def bench_moe(cfg: ModelConfig, args, device, dtype) -> list[dict]:
    T, D, E, K, F_ = args.moe_tokens, cfg.hidden_size, cfg.num_routed_experts, cfg.num_experts_per_tok, \
        cfg.moe_intermediate_size
    routed_flops = 18.0 * T * K * D * F_  # (gate_up 2·D·2F + down 2·F·D) per slot, ×3 for fwd+bwd
    shared_flops = 18.0 * T * cfg.num_shared_experts * D * F_
    router_flops = 6.0 * T * D * E
    g = torch.Generator().manual_seed(7)
    x_TD = (torch.randn(T, D, generator=g) * 0.5).to(device, dtype)
    dy_TD = torch.randn(T, D, generator=g).to(device, dtype)
    idx_TK = torch.rand(T, E, generator=g).topk(K, dim=-1).indices.to(device)
    w_TK = torch.rand(T, K, generator=g).softmax(-1).to(device)
    rows = []

    def run(name: str, module, call, flops: float, compiled: bool = False) -> None:
        free_memory()
        fn_module = torch.compile(module) if compiled else module
        xg = x_TD.detach().clone().requires_grad_(True)

        def fwd_bwd():
            y = call(fn_module, xg)
            y.backward(dy_TD)
            module.zero_grad(set_to_none=True)
            xg.grad = None

        try:
            times = timed_steps(fwd_bwd, args.moe_steps, args.warmup + (2 if compiled else 0))
        except Exception as exc:
            log(f"!! {name} failed: {type(exc).__name__}: {exc}")
            rows.append({"bench": "moe_layer", "impl": name, "error": f"{type(exc).__name__}: {exc}"})
            return
        med = statistics.median(times)
        row = {"bench": "moe_layer", "impl": name, "tokens": T, "ms_median": med * 1e3,
               "tflops": flops / med / 1e12, "flops_counted": flops, "peak_mem_gib": peak_gib()}
        log(json.dumps(row))
        rows.append(row)

    torch.manual_seed(0)
    experts = RoutedExperts(cfg).to(device, dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    routed_call = lambda m, x: m(x, idx_TK, w_TK)  # noqa: E731
    for name, use_grouped, compiled in (("routed grouped_mm", True, False), ("routed per-expert loop", False, False),
                                        ("routed grouped_mm compiled", True, True)):
        if use_grouped and not x_TD.is_cuda:
            continue
        experts.use_grouped_mm = use_grouped
        run(name, experts, routed_call, routed_flops, compiled)
    layer = DeepSeekMoE(cfg).to(device, dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    layer_call = lambda m, x: m(x[None])[0][0]  # noqa: E731
    for name, compiled in (("DeepSeekMoE layer (router+shared+routed)", False),
                           ("DeepSeekMoE layer compiled", True)):
        run(name, layer, layer_call, routed_flops + shared_flops + router_flops, compiled)
    return rows


# ============================================================================ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench_ref")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--impls", default="eager,compiled,hf")
    p.add_argument("--parts", default="train,moe")
    p.add_argument("--moe-tokens", type=int, default=16384)
    p.add_argument("--moe-steps", type=int, default=20)
    p.add_argument("--profile", default="", help="impl to profile after timing (eager|compiled|hf)")
    p.add_argument("--profile-out", default="")
    p.add_argument("--profile-rows", type=int, default=60)
    p.add_argument("--out", default="", help="append JSON lines here")
    p.add_argument("--smoke", action="store_true", help="tiny preset, few steps (checks the script)")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = ModelConfig.preset(args.preset)
    if args.smoke:
        cfg = ModelConfig.preset("tiny")
        args.batch, args.seq, args.steps, args.warmup, args.moe_tokens, args.moe_steps = 2, 64, 2, 1, 256, 2
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        log(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    try:
        import transformers
        log(f"# transformers {transformers.__version__}")
    except ImportError:
        pass
    rows = []
    if "train" in args.parts:
        rows += bench_train(cfg, args, device, dtype)
    if "moe" in args.parts:
        rows += bench_moe(cfg, args, device, dtype)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    log("\n| bench | impl | tokens/s or TFLOP/s | MFU | peak GiB | median |")
    log("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            log(f"| {r['bench']} | {r['impl']} | ERROR {r['error'][:80]} | | | |")
        elif r["bench"] == "train_step":
            log(f"| train | {r['impl']} ({r['note']}) | {r['tokens_per_s']:,.0f} tok/s | {r['mfu']:.1%} | "
                f"{r['peak_mem_gib']:.1f} | {r['step_s_median'] * 1e3:.1f} ms |")
        else:
            log(f"| moe | {r['impl']} | {r['tflops']:.1f} TFLOP/s | | {r['peak_mem_gib']:.1f} | {r['ms_median']:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
