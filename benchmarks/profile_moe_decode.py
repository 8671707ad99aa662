"""Each fused MoE decode kernel's own GPU time (torch.profiler), slot-major and expert-major with the shared expert
folded, bench_ref sizes, at 1, 32 and 64 tokens (issue 13).

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    PYTHONPATH=/tmp/pkg python3 benchmarks/profile_moe_decode.py

Why: benchmarks/bench_moe_decode.py times whole calls; its sweep (RESULTS.md, 2026-12-08) left the expert-major
kernels at ~1.7 TB/s whatever the tiles, so the next question is which of the three launches (gate_up, down,
combine) or the routing bookkeeping holds them there. Prints, per call form, each kernel's launches and mean self
time over 20 calls. Written 2026-12-08 when loans paused: not yet run on a GPU.
"""
import torch
from torch.profiler import ProfilerActivity, profile

from moeflow.models import ModelConfig
from moeflow.models.kernels import moe_decode as md


def kernel_times(fn, calls: int = 20) -> dict[str, tuple[int, float]]:
    """{kernel name: (launches, mean self µs)} of ``calls`` calls of fn on the GPU (after 5 warm-up calls)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {ev.key: (ev.count, ev.self_device_time_total / max(ev.count, 1)) for ev in prof.key_averages()
            if ev.self_device_time_total > 0}


def main() -> int:
    cfg = ModelConfig.preset("bench_ref")
    E, D, F, K = cfg.num_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    torch.manual_seed(0)
    gate_up = (torch.randn(E, 2 * F, D, device="cuda") * 0.02).bfloat16()
    down = (torch.randn(E, D, F, device="cuda") * 0.02).bfloat16()
    shared = [(torch.randn(*shape, device="cuda") * 0.02).bfloat16() for shape in ((F, D), (F, D), (D, F))]
    for T in (1, 32, 64):
        x = torch.randn(T, D, device="cuda").bfloat16()
        idx = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
        w = torch.rand(T, K, device="cuda")
        forms = {"slot-major folded": lambda: md.routed_experts_decode(x, idx, w, gate_up, down, *shared),
                 "expert-major folded": lambda: md.expert_major_decode(x, idx, w, gate_up, down, *shared)}
        for name, fn in forms.items():
            times = sorted(kernel_times(fn).items(), key=lambda kv: -kv[1][1])
            print(f"T={T} {name}: " + "; ".join(f"{k[:48]} x{n} {us:.1f} us" for k, (n, us) in times), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
