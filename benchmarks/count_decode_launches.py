"""How many kernel launches a serving decode step makes, counted on the CPU: per layer and per step, for the
default fused-kernel switches and each switch flipped.

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/pkg python3 benchmarks/count_decode_launches.py
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/pkg python3 benchmarks/count_decode_launches.py --modes default +sharedfold

Why: the uncompiled decode step is launch-bound on the GPU (~1.7-3 µs a kernel, issue 13), so the launches a change
removes are most of what it gains; this counts them without a GPU. The model is ``bench_ref``'s layer shapes with
``--layers`` layers (the first dense, as in bench_ref) and a small vocabulary; its kernels run in Triton's
interpreter (the fused paths are taken as on CUDA: ``kernel_devices`` includes the CPU, the routed experts' fused
path forced). One engine decode step at batch ``--batch`` (``decode_mode="static"``: the code a CUDA graph
captures), counted inside the model's forward:
- a launch = a Triton kernel run (each ``kernel[grid](...)``), or an aten op that would launch a CUDA kernel: views,
  allocations (``empty*``), dtype queries and no-op casts (``to`` that returns its input) do not count; the ops the
  interpreter itself runs to copy a kernel's arguments do not either;
- each op is charged to the decoder layer it ran in (dense / MoE), the rest to "outside" (embedding, the cache
  step's key mask / counts / positions / mask and RoPE table (one launch by default, ``MLA.fused_cache_step``), final
  norm, LM head); the RoPE table a fused cache step copies from is built before (once, as a server's first step).
A bench_ref step is then outside + 1 dense + 7 MoE layers. CPU ops stand for CUDA kernels one for one except where
an op decomposes differently on CUDA (e.g. an einsum's copies); the GPU profile (benchmarks/profile_decode.py) counts
the real ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# switch name -> (module path, class, attribute); "+name" sets it on, "+noname" off for a mode
SWITCHES = {"norm": ("layers", "RMSNorm", "fused_inference"), "rope": ("layers", "RotaryEmbedding", "fused_inference"),
            "cachewrite": ("attention", "MLA", "fused_cache_write"),
            "cachestep": ("attention", "MLA", "fused_cache_step"), "router": ("moe", "Router", "fused_inference"),
            "routerlogits": ("moe", "Router", "fused_logits"), "mla": ("attention", "MLA", "fused_decode_attention"),
            "vproj": ("attention", "MLA", "fused_value_projection"),
            "boundary": ("transformer", "MoETransformer", "defer_residual_add"),
            "sharedfold": ("moe", "DeepSeekMoE", "fused_shared"),
            "moeorder": ("moe", "RoutedExperts", "fused_decode_order")}
# classes whose kernel_devices must include the CPU for their kernels to run here
KERNEL_CLASSES = (("layers", "RMSNorm"), ("layers", "RotaryEmbedding"), ("attention", "MLA"), ("moe", "Router"))
MAY_COPY = {"to", "reshape", "contiguous", "flatten", "type_as"}
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "promote_types",
             "result_type", "is_same_size", "sym_size", "sym_stride", "sym_numel", "lift_fresh", "detach", "detach_"}


def _cls(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(f"moeflow.models.{module}"), name)


class LaunchCounter(TorchDispatchMode):
    """Counts launching aten ops and Triton kernel runs, charged to ``self.where`` (set by layer hooks)."""

    def __init__(self):
        super().__init__()
        self.where = "outside"
        self.counts: Counter = Counter()           # (where, name) -> launches
        self._in_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self._in_kernel or name in NO_LAUNCH or func.namespace != "aten":
            return out
        if func.is_view:  # views; but ``to`` / ``reshape`` / ``contiguous`` (may-alias schemas) copy when they must
            if not (name in MAY_COPY and isinstance(out, torch.Tensor) and args and torch.is_tensor(args[0])
                    and out.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr()):
                return out
        if not isinstance(out, (torch.Tensor, list, tuple)) or name in ("_local_scalar_dense",):
            return out
        self.counts[(self.where, f"aten.{name}")] += 1
        return out

    @contextlib.contextmanager
    def triton_runs(self):
        """Counts each interpreted Triton launch; the interpreter's own argument copies are not counted."""
        from triton.runtime import interpreter

        original = interpreter.GridExecutor.__call__
        counter = self

        def counted(executor, *args, **kwargs):
            counter.counts[(counter.where, f"triton.{executor.fn.__name__}")] += 1
            counter._in_kernel += 1
            try:
                return original(executor, *args, **kwargs)
            finally:
                counter._in_kernel -= 1

        interpreter.GridExecutor.__call__ = counted
        try:
            yield
        finally:
            interpreter.GridExecutor.__call__ = original


def build_model(num_layers: int, vocab_size: int, preset: str = "bench_ref"):
    from moeflow.models import ModelConfig, MoETransformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset).replace(num_layers=num_layers, vocab_size=vocab_size)
    model = MoETransformer(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for router in model.routers():
            router.e_score_correction_bias.normal_(0.0, 0.01)
    return model


@contextlib.contextmanager
def switches(mode: str):
    """The mode's switches set ("default" = the classes' defaults; "+x" on, "+nox" off), restored after."""
    flags = [f for f in mode.split("+")[1:] if f]
    saved = []
    for module, name in KERNEL_CLASSES:
        cls = _cls(module, name)
        saved.append((cls, "kernel_devices", cls.kernel_devices))
        cls.kernel_devices = ("cuda", "cpu")
    for flag in flags:
        key = flag[2:] if flag.startswith("no") and flag[2:] in SWITCHES else flag
        if key not in SWITCHES:
            raise SystemExit(f"unknown mode flag +{flag}; known: {', '.join(sorted(SWITCHES))} (and no<name>)")
        cls = _cls(*SWITCHES[key][:2])
        saved.append((cls, SWITCHES[key][2], getattr(cls, SWITCHES[key][2])))
        setattr(cls, SWITCHES[key][2], key == flag)
    try:
        yield {k: getattr(_cls(*v[:2]), v[2]) for k, v in SWITCHES.items()}
    finally:
        for cls, attr, value in reversed(saved):
            setattr(cls, attr, value)


def count_mode(model, mode: str, batch: int, prompt_len: int) -> dict:
    from moeflow.models.moe import RoutedExperts
    from moeflow.models.serving import Engine, SamplingParams

    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    # the prefill and a first decode step on the CPU's formula (interpreted kernels are slow; only the step counted
    # below needs them)
    engine = Engine(model, max_batch=batch, context_len=prompt_len + 16, prefill_chunk=1 << 16, decode_mode="static")
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(3, model.cfg.vocab_size, (prompt_len,), generator=g).tolist()
        engine.add(str(i), prompt, SamplingParams(max_tokens=8, temperature=0.0))
    for _ in range(2):
        engine.step()
    # the RoPE table the fused cache step copies rows from, built once (a server's first step, before capture)
    model.rotary.table(engine.slots.max_len, model.lm_head.weight.device)
    with switches(mode) as state:
        counter = LaunchCounter()
        hooks = []
        for i, layer in enumerate(model.model.layers):
            kind = "moe" if layer.is_moe else "dense"
            hooks.append(layer.register_forward_pre_hook(lambda *_, k=f"{kind}{i}": setattr(counter, "where", k)))
            hooks.append(layer.register_forward_hook(lambda *_: setattr(counter, "where", "outside")))
        # (a hook that returns a value replaces the inputs / output: these return None)
        hooks.append(model.register_forward_pre_hook(lambda *_: None if counter.__enter__() else None))
        hooks.append(model.register_forward_hook(lambda *_: None if counter.__exit__(None, None, None) else None))
        for m in experts:
            m.fused_decode = True  # what auto takes on CUDA at decode sizes
        try:
            with counter.triton_runs():
                engine.step()
        finally:
            for h in hooks:
                h.remove()
            for m in experts:
                m.fused_decode = None
    per_layer: dict[str, int] = Counter()
    for (where, _), n in counter.counts.items():
        per_layer[where] += n
    dense = [per_layer[k] for k in per_layer if k.startswith("dense")]
    moe = [per_layer[k] for k in per_layer if k.startswith("moe")]
    moe_ops = Counter({name: n for (where, name), n in counter.counts.items() if where == sorted(
        k for k in per_layer if k.startswith("moe"))[-1]}) if moe else Counter()
    row = {"bench": "count_decode_launches", "mode": mode, "batch": batch, "switches": state,
           "outside": per_layer["outside"], "dense_layer": max(dense) if dense else 0,
           "moe_layer": max(moe) if moe else 0,
           "moe_layer_ops": dict(sorted(moe_ops.items(), key=lambda kv: -kv[1])),
           "outside_ops": {name: n for (where, name), n in sorted(counter.counts.items(), key=lambda kv: -kv[1])
                           if where == "outside"}}
    row["bench_ref_step"] = row["outside"] + row["dense_layer"] + 7 * row["moe_layer"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=["default", "+noboundary", "+norouterlogits", "+nosharedfold",
                                                   "+nocachestep", "+mla", "+nonorm+norope+nocachewrite+norouter"
                                                   "+norouterlogits+nosharedfold+nocachestep+noboundary"])
    p.add_argument("--preset", default="bench_ref", help="the model config whose layer shapes are counted")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the first dense): 2 = one of each")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1: the fused kernels run in Triton's interpreter here")
    model = build_model(args.layers, args.vocab, args.preset)
    rows = [count_mode(model, mode, args.batch, args.prompt_len) for mode in args.modes]
    print(f"| mode | outside | dense layer | MoE layer | bench_ref step (1 dense + 7 MoE) | batch {args.batch} |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['outside']} | {r['dense_layer']} | {r['moe_layer']} | {r['bench_ref_step']} | |")
    for r in rows:
        print(f"\n{r['mode']}: one MoE layer's launches: "
              + ", ".join(f"{k} {v}" for k, v in r["moe_layer_ops"].items())
              + "; outside the layers: " + ", ".join(f"{k} {v}" for k, v in r["outside_ops"].items()))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
