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

Routed experts (group ``"experts"``): ``fp8_grouped_mm`` runs each of the two grouped GEMMs of
``RoutedExperts._grouped`` through ``torch._scaled_grouped_mm`` (CUDA, sm90+): the permuted token
rows quantised per row (e4m3), each expert's weight per output row (one scale per expert and
output feature), bf16 out; dgrad the same way with the gradient per row and the weight per input
column; wgrad per expert in bf16 (``torch._grouped_mm`` of the saved bf16 rows), as above. Groups
are padded to 16 rows (``FP8_GROUP_ALIGN``), the alignment the fp8 grouped kernel asks for.
The token permutation and SwiGLU that produce the GEMM inputs sit in the same compiled block, so the
rowwise quantisation fuses into them. ``_scaled_grouped_mm`` has no CPU kernel; the CPU reference is
``reference_fp8_grouped_mm`` (dequantise, then per-group matmul), compared on the GPU.

``enable_fp8(model, modules=("attn", "dense", "shared"))`` swaps the chosen nn.Linear modules for
``Fp8Linear`` (the same Parameter objects, the same names, so checkpoints and the HF export are
unchanged) and, for ``"experts"``, sets ``RoutedExperts.fp8_grad_dtype`` (the same parameters, the
grouped GEMMs through ``fp8_grouped_mm``). ``"experts"`` and ``"lm_head"`` are selectable but not
defaults; the router always stays fp32 (DeepSeek-V3 keeps the output head and the gating in high
precision).

Shape suffixes: M rows (tokens), K in features, N out features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_GROUPS = ("attn", "dense", "shared", "experts", "lm_head")
FP8_GROUP_ALIGN = 16  # rows per expert group: the fp8 grouped GEMM wants 16-row aligned offsets


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


class _Fp8GroupedMatmul(torch.autograd.Function):
    """y (M, N) = x (M, K) · b[e] (K, N) for the rows of each group e (``offs`` = cumulative group
    ends, int32); ``w_ENK`` is the stored expert weight (E, N, K), ``b`` its transposed view."""

    @staticmethod
    def forward(ctx, x_MK: torch.Tensor, w_ENK: torch.Tensor, offs_E: torch.Tensor, grad_dtype: torch.dtype,
                out_dtype: torch.dtype):
        xq_MK, sx_M1 = quantize_rows(x_MK.contiguous(), E4M3)
        wq_ENK, sw_EN1 = quantize_rows(w_ENK.contiguous(), E4M3)  # one scale per expert and output row
        y_MN = torch._scaled_grouped_mm(xq_MK, wq_ENK.transpose(-2, -1), sx_M1.squeeze(-1), sw_EN1.squeeze(-1),
                                        offs=offs_E, out_dtype=out_dtype)
        ctx.save_for_backward(x_MK, w_ENK, offs_E)
        ctx.grad_dtype = grad_dtype
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN: torch.Tensor):
        x_MK, w_ENK, offs_E = ctx.saved_tensors
        dx_MK = dw_ENK = None
        if ctx.needs_input_grad[0]:
            gq_MN, sg_M1 = quantize_rows(dy_MN.contiguous(), ctx.grad_dtype)
            wq_EKN, sw_EK1 = quantize_rows(w_ENK.transpose(-2, -1).contiguous(), E4M3)  # per input column
            dx_MK = torch._scaled_grouped_mm(gq_MN, wq_EKN.transpose(-2, -1), sg_M1.squeeze(-1), sw_EK1.squeeze(-1),
                                             offs=offs_E, out_dtype=dy_MN.dtype)
        if ctx.needs_input_grad[1]:  # per expert dy_gᵀ · x_g in bf16 (ragged K = the group's rows)
            dw_ENK = torch._grouped_mm(dy_MN.t(), x_MK.to(dy_MN.dtype), offs=offs_E).to(w_ENK.dtype)
        return dx_MK, dw_ENK, None, None, None


def fp8_grouped_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor, offs_E: torch.Tensor,
                   grad_dtype: torch.dtype = E4M3) -> torch.Tensor:
    """``torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)`` through fp8 (see the module docstring);
    x (M, K) in the compute dtype, w (E, N, K) the stored expert weight, offs (E,) int32 ends."""
    with torch.autocast(x_MK.device.type, enabled=False):
        return _Fp8GroupedMatmul.apply(x_MK, w_ENK.to(x_MK.dtype), offs_E, grad_dtype, x_MK.dtype)


def reference_fp8_grouped_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """What ``fp8_grouped_mm`` computes, as dequantise-then-matmul per group in fp32 (tests)."""
    xq, sx = quantize_rows(x_MK)
    wq, sw = quantize_rows(w_ENK)
    x32, w32 = xq.float() * sx, wq.float() * sw
    out = x32.new_zeros(x_MK.shape[0], w_ENK.shape[1])
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        out[start:end] = x32[start:end] @ w32[e].t()
        start = end
    return out


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
        if group == "experts":
            for i, block in enumerate(model.model.layers):
                experts = getattr(block.mlp, "experts", None) if block.is_moe else None
                if experts is None or (allowed is not None and id(block) not in allowed):
                    continue
                if fp8_supported(experts.gate_up_proj.shape[-1], experts.gate_up_proj.shape[-2]) and \
                        fp8_supported(experts.down_proj.shape[-1], experts.down_proj.shape[-2]):
                    experts.fp8_grad_dtype = grad_dtype
                    swapped.append(f"{names[id(experts)]}")
            for module in getattr(model, "mtp", []):
                experts = getattr(module.block.mlp, "experts", None) if module.block.is_moe else None
                if experts is not None and layers is None:
                    experts.fp8_grad_dtype = grad_dtype
                    swapped.append(f"{names[id(experts)]}")
            continue
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
