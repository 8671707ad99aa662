"""FP8 training for linear layers: rowwise-scaled e4m3 forward, e4m3/e5m2 gradient, bf16 weight gradient.

Recipe (the rowwise recipe of DeepSeek-V3 / torchao's ``rowwise_with_gw_hp``, at row granularity):
- forward   y = x · Wᵀ with x quantised per ROW (one fp32 scale per token) and W per output row, both
            e4m3; ``torch._scaled_mm`` multiplies the fp8 operands on the tensor cores and applies
            the two scale vectors in its epilogue, writing bf16.
- dgrad     dx = dy · W with dy quantised per row (``grad_dtype``: e4m3 as DeepSeek-V3, or e5m2 for
            more range) and W per input COLUMN (a second, transposed quantisation of the small weight).
- wgrad     dW = dyᵀ · x in bf16 from the saved bf16 input: the weight gradient, accumulated into the
            fp32 master weight or the bf16 weight, keeps full bf16 accuracy (no fp8 quantisation along
            the token dimension, which would need a transposed pass over the activation).
The parameters stay what they were (fp32 master weights under autocast, or bf16): quantisation
happens per call. A scale is amax / fp8_max of its row (fp32, floored at 1e-12 so an all-zero row
gives zeros, not NaN); no delayed scaling, no history.

Where the quantisation runs: the scale needs a row reduction (amax), then one element-wise pass.
Written as plain torch ops, torch.compile fuses both into the kernel that PRODUCES the activation
when the producer is in the same compiled region (the RMSNorm before q_proj, the SwiGLU before
down_proj, the attention-output reshape before o_proj; in backward, the gradient's producer), so
no extra pass over the activation is made. Eager, each quantisation is a separate kernel:
``benchmarks/bench_fp8.py`` measures both against bf16 per shape.

``_scaled_mm`` wants K and N multiples of 16; a linear whose shape is not is left in bf16.
On CPU ``_scaled_mm`` runs too (torch ≥ 2.6), which is what the tests compare against a
dequantise-then-matmul reference.

``enable_fp8(model, modules=("attn", "dense", "shared"))`` swaps the chosen nn.Linear modules for
``Fp8Linear`` (the same Parameter objects, the same names, so checkpoints and the HF export are
unchanged); ``"lm_head"`` and ``"router"`` are selectable but not defaults (DeepSeek-V3 keeps the
output head and the gating in high precision).

Shape suffixes: M rows (tokens), K in features, N out features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_GROUPS = ("attn", "dense", "shared", "lm_head")


def quantize_rows(x_MK: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 quantisation: returns (x_fp8 (M, K), scale (M, 1) fp32) with x ≈ x_fp8 · scale."""
    fmax = torch.finfo(dtype).max
    x32 = x_MK.float()
    scale_M1 = (x32.abs().amax(dim=-1, keepdim=True) / fmax).clamp_min(1e-12)
    return (x32 / scale_M1).clamp(-fmax, fmax).to(dtype), scale_M1


def fp8_supported(in_features: int, out_features: int) -> bool:
    return in_features % 16 == 0 and out_features % 16 == 0


class _Fp8Matmul(torch.autograd.Function):
    """y (M, N) = x (M, K) · w (N, K)ᵀ with the recipe of the module docstring."""

    @staticmethod
    def forward(ctx, x_MK: torch.Tensor, w_NK: torch.Tensor, grad_dtype: torch.dtype, out_dtype: torch.dtype):
        xq_MK, sx_M1 = quantize_rows(x_MK.contiguous(), E4M3)
        wq_NK, sw_N1 = quantize_rows(w_NK.contiguous(), E4M3)
        y_MN = torch._scaled_mm(xq_MK, wq_NK.t(), scale_a=sx_M1, scale_b=sw_N1.t(), out_dtype=out_dtype)
        ctx.save_for_backward(x_MK, w_NK)
        ctx.grad_dtype = grad_dtype
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN: torch.Tensor):
        x_MK, w_NK = ctx.saved_tensors
        dx_MK = dw_NK = None
        if ctx.needs_input_grad[0]:
            gq_MN, sg_M1 = quantize_rows(dy_MN.contiguous(), ctx.grad_dtype)
            wq_KN, sw_K1 = quantize_rows(w_NK.t().contiguous(), E4M3)  # per input column of W
            dx_MK = torch._scaled_mm(gq_MN, wq_KN.t(), scale_a=sg_M1, scale_b=sw_K1.t(), out_dtype=dy_MN.dtype)
        if ctx.needs_input_grad[1]:
            dw_NK = (dy_MN.t() @ x_MK.to(dy_MN.dtype)).to(w_NK.dtype)
        return dx_MK, dw_NK, None, None


def fp8_linear(x: torch.Tensor, weight_NK: torch.Tensor, grad_dtype: torch.dtype = E4M3) -> torch.Tensor:
    """F.linear(x, weight) (no bias) through fp8; x (..., K). Under CUDA autocast the operands are
    taken in the autocast dtype first, as nn.Linear would."""
    dt = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
    lead = x.shape[:-1]
    with torch.autocast(x.device.type, enabled=False):
        y_MN = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]).to(dt), weight_NK.to(dt), grad_dtype, dt)
    return y_MN.view(*lead, weight_NK.shape[0])


class Fp8Linear(nn.Linear):
    """nn.Linear (no bias) computing through ``fp8_linear``; built from an nn.Linear, sharing its weight."""

    grad_dtype: torch.dtype = E4M3

    @classmethod
    def from_linear(cls, lin: nn.Linear, grad_dtype: torch.dtype = E4M3) -> "Fp8Linear":
        if lin.bias is not None:
            raise ValueError("Fp8Linear: linear layers with a bias are not supported")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight = lin.weight  # the same Parameter: optimiser state, names and checkpoints unchanged
        new.register_parameter("bias", None)
        new.grad_dtype = grad_dtype
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.grad_dtype)


def _linear_groups(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """(parent, attribute) of every swappable nn.Linear of an MoETransformer, by group."""
    groups: dict[str, list[tuple[nn.Module, str]]] = {g: [] for g in FP8_GROUPS}
    blocks = list(model.model.layers) + [m.block for m in getattr(model, "mtp", [])]
    for block in blocks:
        attn = block.self_attn
        for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            if isinstance(getattr(attn, name, None), nn.Linear):
                groups["attn"].append((attn, name))
        mlp = block.mlp
        ffn, group = (mlp.shared_experts, "shared") if block.is_moe else (mlp, "dense")
        if ffn is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                groups[group].append((ffn, name))
    groups["lm_head"].append((model, "lm_head"))
    return groups


def enable_fp8(model: nn.Module, modules=("attn", "dense", "shared"), grad_dtype: torch.dtype = E4M3,
               layers: list[int] | None = None) -> list[str]:
    """Swap the chosen linear groups of an MoETransformer for Fp8Linear; returns the swapped names.

    ``layers`` limits the per-block groups to those main-layer indices. A tied lm_head is not
    swapped (its weight is the embedding table). Call before torch.compile / compile_blocks."""
    unknown = sorted(set(modules) - set(FP8_GROUPS))
    if unknown:
        raise ValueError(f"enable_fp8: unknown module group(s) {unknown}; known: {list(FP8_GROUPS)}")
    if grad_dtype not in (E4M3, E5M2):
        raise ValueError(f"enable_fp8: grad_dtype must be float8_e4m3fn or float8_e5m2, not {grad_dtype}")
    names = {id(m): n for n, m in model.named_modules()}
    allowed = None if layers is None else {id(model.model.layers[i]) for i in layers}
    owner = {}
    for block in model.model.layers:
        for m in block.modules():
            owner[id(m)] = block
    swapped = []
    groups = _linear_groups(model)
    for group in modules:
        for parent, attr in groups[group]:
            lin = getattr(parent, attr)
            if isinstance(lin, Fp8Linear) or not fp8_supported(lin.in_features, lin.out_features):
                continue
            if group == "lm_head" and getattr(model.cfg, "tie_embeddings", False):
                continue
            if allowed is not None and group != "lm_head" and id(owner.get(id(parent))) not in allowed:
                continue
            setattr(parent, attr, Fp8Linear.from_linear(lin, grad_dtype))
            swapped.append(f"{names[id(parent)]}.{attr}".lstrip("."))
    return swapped


def reference_fp8_linear(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """What the fp8 forward computes, written as dequantise-then-matmul in fp32 (tests)."""
    xq, sx = quantize_rows(x_MK)
    wq, sw = quantize_rows(w_NK)
    return F.linear(xq.float() * sx, wq.float() * sw)
