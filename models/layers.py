"""Small building blocks: RMSNorm, SwiGLU feed-forward, rotary embeddings with optional YaRN.

Each computes exactly the function of its Hugging Face DeepseekV3 counterpart (the HF parity test
depends on it):
- RMSNorm normalises in fp32, casts back to the input dtype, then multiplies by the weight (``rms_norm``).
  Inference calls on CUDA take one Triton launch computing the same function (``RMSNorm.fused_inference``,
  kernels/rmsnorm.py); training, CPU and ``torch.compile`` keep the formula, so the parity tests see it.
- RoPE uses DeepSeek's interleaved pair layout (HF ``rope_interleave=True``): dims (2i, 2i+1) form
  one pair rotated by frequency i; the rotated output is laid out as [all even-slot results,
  all odd-slot results]. That output permutation is applied to queries and keys alike, so q·k
  is the interleaved-rotation dot product. ``apply_rope`` is the formula; ``RotaryEmbedding.rotate`` (what
  attention calls) may take one Triton launch computing it bit for bit at inference (kernels/rope.py; off by
  default, ``RotaryEmbedding.fused_inference``).
- YaRN: blended inverse frequencies (HF ``_compute_yarn_parameters``), cos/sin multiplied by the
  attention factor mscale(f, mscale)/mscale(f, mscale_all_dim); the extra softmax-scale factor
  mscale(f, mscale_all_dim)^2 is applied in attention (``ModelConfig.softmax_scale``).

Shape suffixes: B batch, T tokens, D hidden, F ffn width, P rope dim, H heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, yarn_mscale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF DeepseekV3RMSNorm: x·rsqrt(mean(x²) + eps) in fp32, rounded to x.dtype, times the weight (promoted)."""
    x_f32 = x.float()
    x_f32 = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x_f32.to(x.dtype)


class RMSNorm(nn.Module):
    # One Triton launch instead of 8 kernels (``add_forward``: 9) where it is safe: no gradient needed, a device
    # in ``kernel_devices``, not while torch.compile traces (inductor fuses the formula; the kernel is no op it
    # could trace), Triton importable (``kernels.rmsnorm.kernel_applies`` has the rest). Same function, only the
    # fp32 sum's order differs, and generate() and the serving engine both take it, so greedy engine output
    # still equals generate()'s. On by default: the decode step is launch-bound (issue 13); on an H100 the default
    # CUDA-graph engine step ran 789 vs 635 tok/s at batch 1 and 15,218 vs 12,729 at batch 32 with it (same call,
    # benchmarks/RESULTS.md), its GPU tests pass (engine == generate() with it; 99.9995 % bit-equal to eager CUDA,
    # worst 2 ulps). benchmarks/bench_decode.py --fused-norm on|off (or engine modes "+norm" / "+nonorm") gives
    # both rows.
    fused_inference: bool = True
    # where the kernel may run; the CPU tests add "cpu" to run it in Triton's interpreter
    kernel_devices: tuple[str, ...] = ("cuda",)

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self._kernels(x)
        if kernels is not None and kernels.kernel_applies(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, residual: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, self(residual + delta)): the decoder block's residual add and the norm after it,
        one launch where ``forward`` would take the kernel."""
        kernels = self._kernels(residual)
        if kernels is not None and kernels.kernel_applies(residual, self.weight, delta):
            return kernels.add_rms_norm(residual, delta, self.weight, self.eps)
        total = residual + delta
        return total, rms_norm(total, self.weight, self.eps)

    def _kernels(self, x: torch.Tensor):
        """kernels.rmsnorm when the cheap checks pass (imported here: it imports triton, an optional dependency
        that CPU training need not load), else None."""
        # is_compiling first: under torch.compile nothing else is read, so no guard on the switch
        if torch.compiler.is_compiling() or not self.fused_inference or x.device.type not in self.kernel_devices:
            return None
        from .kernels import rmsnorm

        return rmsnorm


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); names follow HF (gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (P/2,) in fp32 and the cos/sin attention factor."""
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    factor = float(rs["factor"])
    orig_max = float(rs["original_max_position_embeddings"])
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
    else:
        attention_factor = yarn_mscale(factor)
    beta_fast = float(rs.get("beta_fast") or 32)
    beta_slow = float(rs.get("beta_slow") or 1)

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(orig_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Turns integer positions (B, T) into cos/sin tables (B, T, P/2) in fp32; ``rotate`` applies them."""

    # ``rotate`` takes one Triton launch instead of ``apply_rope``'s 9 kernels where it is safe, the same rules as
    # ``RMSNorm.fused_inference``: no gradient needed, a device in ``kernel_devices``, not while torch.compile
    # traces (inductor fuses the formula; the kernel is no op it could trace), Triton importable
    # (``kernels.rope.kernel_applies`` has the rest). Bit-equal to the formula (element-wise, every rounding point
    # kept), and generate() and the serving engine both take it, so greedy engine output still equals
    # generate()'s. On by default since it ran on a GPU (H200, 2026-12-07, RESULTS.md "Serving"): its GPU tests
    # passed, and the default graph engine step ran 901 vs 773 tok/s at batch 1 and 17,623 vs 15,541 at batch 32
    # with it (same call; 18 launches a layer become 2). benchmarks/bench_decode.py "+norope" is the row without it.
    fused_inference: bool = True
    # where the kernel may run; the CPU tests add "cpu" to run it in Triton's interpreter
    kernel_devices: tuple[str, ...] = ("cuda",)

    # the smallest table ``table`` builds (rows; more where asked, to the next power of two)
    min_table_rows: int = 1024

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: list[tuple[tuple, torch.Tensor]] = []  # (inv_freq's identity, table); see ``table``

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the inverse frequencies: a bf16 inv_freq is off by up to
        # 0.36 rad at position 2047, and evaluation / the HF export rebuild it in fp32. Keep fp32,
        # moving only the device (as Router keeps its balancing bias).
        inv_freq_fp32 = self.inv_freq
        out = super()._apply(fn, recurse)
        moved = self.inv_freq
        if moved.dtype != torch.float32 and inv_freq_fp32.dtype == torch.float32:
            self.inv_freq = inv_freq_fp32.to(device=moved.device)
        return out

    def forward(self, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles_BTp = positions_BT.float()[..., None] * self.inv_freq.float()
        return angles_BTp.cos() * self.attention_factor, angles_BTp.sin() * self.attention_factor

    def table(self, num_positions: int, device) -> torch.Tensor | None:
        """(N, P) fp32 with N ≥ ``num_positions``: row p is ``forward``'s cos ‖ sin of position p, computed by
        ``forward`` itself over positions 0..N-1 on ``device`` (element-wise fp32 ops: the same bits as from any
        other positions tensor; tests/test_cache_step_kernel.py checks it). The fused cache step
        (kernels/cache_step.py) copies a step's rows from it instead of computing them (6 launches).

        Built on first use and kept; a larger one is built when asked for more rows, the smaller kept too (a
        captured CUDA graph may read it), never while a graph is being captured (None then: the caller keeps the
        formula). A new ``inv_freq`` (``init_weights``, a move) gets new tables, dropping those of the old one."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" names the current device: compare as cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        if self.inv_freq.device != device:
            return None
        try:
            version = self.inv_freq._version
        except RuntimeError:  # an inference tensor (a model built under inference_mode) has no version counter
            version = -1
        key = (device, self.inv_freq.data_ptr(), version)
        for k, t in self._tables:
            if k == key and t.shape[0] >= num_positions:
                return t
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        n = max(self.min_table_rows, 1 << max(0, num_positions - 1).bit_length())
        with torch.inference_mode(False), torch.no_grad():
            cos_1Np, sin_1Np = self.forward(torch.arange(n, device=device)[None])
            table_NP = torch.cat([cos_1Np[0], sin_1Np[0]], dim=-1)
        self._tables = [(k, t) for k, t in self._tables if k == key] + [(key, table_NP)]
        return table_NP

    @classmethod
    def rotate(cls, x: torch.Tensor, cos_BTp: torch.Tensor, sin_BTp: torch.Tensor) -> torch.Tensor:
        """``apply_rope(x, cos_BTp, sin_BTp)``, in one launch where the kernel may run (see ``fused_inference``)."""
        # is_compiling first: under torch.compile nothing else is read, so no guard on the switch
        if not torch.compiler.is_compiling() and cls.fused_inference and x.device.type in cls.kernel_devices:
            from .kernels import rope  # imports triton, an optional dependency CPU training need not load

            if rope.kernel_applies(x, cos_BTp, sin_BTp):
                return rope.apply_rope(x, cos_BTp, sin_BTp)
        return apply_rope(x, cos_BTp, sin_BTp)


def apply_rope(x: torch.Tensor, cos_BTp: torch.Tensor, sin_BTp: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, [H,] P); output layout [even results, odd results].

    cos/sin are cast to x's dtype first, as HF does, so bf16 runs round the same way.
    """
    if x.dim() == 4:  # (B, T, H, P): broadcast over heads
        cos_BTp, sin_BTp = cos_BTp[:, :, None, :], sin_BTp[:, :, None, :]
    cos, sin = cos_BTp.to(x.dtype), sin_BTp.to(x.dtype)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], dim=-1)
