"""INT8 weight-only quantization: every linear AND the stacked 3-D expert weights, per-channel scales.

For a weight W (out, in): s_o = max_i |W_oi| / 127 per output channel, q = round(W / s).clamp(±127)
int8, and y = (x @ qᵀ) · s. Activations stay in the model's dtype (fp32 or bf16); only weights shrink
(4× vs fp32, 2× vs bf16, plus one scale per output channel). torchao's int8 weight-only covers
``nn.Linear`` only; a DeepSeek MoE keeps most of its parameters in the stacked expert tensors
(E, 2F, D) and (E, D, F), so those get per-(expert, output row) scales here too.

- ``Int8Linear`` replaces ``nn.Linear``. Its matmul is ``torch._weight_int8pack_mm`` (a fused
  int8-weight kernel on CPU and CUDA) or, where that is unavailable, a dequantize-then-matmul.
  ``weight`` is still readable (dequantized on access): MLA's absorbed path reads
  ``kv_b_proj.weight`` to split it into W_uk / W_uv, and callers read ``lm_head.weight.device``.
- ``Int8RoutedExperts`` subclasses ``moe.RoutedExperts``. A call takes one of two paths, chosen from
  shapes and the device alone (no host sync: a captured CUDA graph or compiled step keeps one branch
  per bucket):
  * per-slot gather (``use_slot_gather``; auto when the T·K routed slots are fewer than the E experts,
    i.e. decode at small batch: bench_ref's 64 experts, top-6, up to 10 tokens, on CUDA or wherever
    the grouped path would run; the CPU keeps its per-expert loop, measured faster): each slot gathers its
    own expert's int8 rows and scales (``index_select`` by expert id), dequantizes just those and runs
    two ``bmm``s, one row per slot. A batch-1 decode step reads 6 experts' int8, not 64, and needs
    no argsort/permutation. Slots that share an expert each dequantize a copy (at most T·K < E copies,
    written into the first rows of the shared scratch below, so never more than the whole stack).
  * whole stack (``RoutedExperts.forward``): it dequantizes one expert at a time in the looped (CPU)
    path, or one layer's stack per call on the grouped (GPU) path, so the transient full-precision
    copy is one expert / one layer, never the model. Without autograd the grouped path writes that
    copy into ONE scratch tensor per stack shape shared by every layer of the model (``quantize_int8``
    hands them one dict): the layers run one after another, and a captured CUDA graph then holds no
    dequantized stack of its own, however many decode buckets are captured. (Fresh copies per layer
    and per captured bucket are the suspected cause of the INT8 graph engine's 63 GiB peak against
    4.5 GiB in bf16, RESULTS.md; a ``gpu`` test in tests/test_quant.py bounds the peak.)
  ``Int8Linear`` needs no such split: ``_weight_int8pack_mm`` reads the int8 weight directly and
  every row of a linear is used by every token.
- Kept in full precision on purpose: routers (their fp32 top-k decides which experts run, and a
  flipped choice costs more than it saves), norms, embeddings (a lookup, not a matmul) and an
  ``lm_head`` tied to the embeddings.

``quantize_int8(model)`` converts in place and returns a report (bytes before/after).
Shape suffixes: O out features, I in features, E experts, F expert width, D hidden, N rows
(in ``Int8RoutedExperts``: the N = T·K routed slots), T tokens, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .moe import RoutedExperts

QMAX = 127


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 same shape, scale fp32 = w.shape[:-1]); an all-zero row gets scale 1."""
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=-1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w32 / scale[..., None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale[..., None].to(dtype)


def _dequantize_into(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``dequantize_rows`` written into ``out`` (bit for bit the same values: int8 -> dtype is exact)."""
    if out.is_cuda:  # one kernel: reads the int8, writes the result
        return torch.mul(q, scale[..., None].to(out.dtype), out=out)
    # on the CPU a mixed int8 x float mul is ~6x slower than a vectorised convert + in-place mul
    # (measured at bench_ref size: 183 vs 30 ms for 48 experts' gate_up rows, fp32)
    return out.copy_(q).mul_(scale[..., None].to(out.dtype))


class Int8Linear(nn.Module):
    use_int8pack_mm = True  # False: dequantize + F.linear (the reference the tests compare with)

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear: the model's linears have no bias")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        q_OI, scale_O = quantize_rows(linear.weight)
        self.register_buffer("weight_int8", q_OI.to(linear.weight.device))
        self.register_buffer("scale", scale_O.to(linear.weight.device, linear.weight.dtype))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (O, I): readable for code that inspects it (absorbed MLA, devices)."""
        return dequantize_rows(self.weight_int8, self.scale, self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_int8pack_mm and x.dtype in (torch.float32, torch.bfloat16, torch.float16) \
                and x.device.type in ("cpu", "cuda"):
            x_NI = x.reshape(-1, self.in_features)
            y_NO = torch._weight_int8pack_mm(x_NI.contiguous(), self.weight_int8, self.scale.to(x.dtype))
            return y_NO.view(*x.shape[:-1], self.out_features)
        return F.linear(x, dequantize_rows(self.weight_int8, self.scale, x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8RoutedExperts(RoutedExperts):
    """Stacked experts with int8 weights and per-(expert, output row) scales.

    Path per call (module docstring): per-slot gather when ``_slot_path`` says so (T·K < E by default),
    else the whole-stack ``RoutedExperts.forward`` (grouped on the GPU, looped on the CPU).
    """

    # None: auto, the per-slot gather when the T·K routed slots are fewer than the E experts, on CUDA or where
    # the whole stack would take the grouped path (a decision on shapes and devices only: it holds for a whole
    # captured graph / compiled bucket); True/False forces a path
    use_slot_gather: bool | None = None
    fused_decode = False  # the fused kernels read bf16 stacks (kernels/moe_decode.py); int8 has the per-slot path

    def __init__(self, experts: RoutedExperts, scratch: dict | None = None) -> None:
        """scratch: where the grouped path's dequantized stacks go, shared with the model's other layers."""
        nn.Module.__init__(self)
        self.scratch = {} if scratch is None else scratch
        self.num_experts, self.width = experts.num_experts, experts.width
        self.use_grouped_mm = experts.use_grouped_mm
        dtype, dev = experts.gate_up_proj.dtype, experts.gate_up_proj.device
        gu_q, gu_s = quantize_rows(experts.gate_up_proj)   # (E, 2F, D), scale (E, 2F)
        dn_q, dn_s = quantize_rows(experts.down_proj)      # (E, D, F),  scale (E, D)
        self.register_buffer("gate_up_int8", gu_q.to(dev))
        self.register_buffer("gate_up_scale", gu_s.to(dev, dtype))
        self.register_buffer("down_int8", dn_q.to(dev))
        self.register_buffer("down_scale", dn_s.to(dev, dtype))

    def _slot_path(self, x_TD: torch.Tensor, idx_TK: torch.Tensor) -> bool:
        if self.use_slot_gather is not None:
            return self.use_slot_gather
        # shapes and devices only: never a host sync. The CPU's looped whole-stack path stays the CPU default:
        # it dequantizes only the experts that got tokens, each once, and measured faster than the per-slot
        # gather on the 2-core CPU (bench_ref layer, fp32: 9 vs 14 ms at 1 token, 56 vs 132 ms at 8;
        # benchmarks/RESULTS.md, "INT8 routed experts at decode sizes")
        return idx_TK.numel() < self.num_experts and (x_TD.is_cuda or self._grouped_path(x_TD))

    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor,
                shared: nn.Module | None = None) -> torch.Tensor:
        """Σ_k weight[t, k] · expert_{idx[t, k]}(x[t]) (+ shared(x[t]) where given), by the per-slot gather or the
        whole stack."""
        if self._slot_path(x_TD, idx_TK):
            y_TD = self._per_slot(x_TD, idx_TK, weight_TK)
            return y_TD if shared is None else y_TD + shared(x_TD)
        return super().forward(x_TD, idx_TK, weight_TK, shared)

    def slot_weights(self, expert_N: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized (gate_up (N, 2F, D), down (N, D, F)) of expert ``expert_N[n]`` for each slot n.

        Gathers the int8 rows and their scale rows first, then dequantizes: the same values as
        ``dequantize_rows`` of the whole stack indexed by ``expert_N`` (an elementwise op), at N/E of the cost.
        """
        return (self._gathered(self.gate_up_int8, self.gate_up_scale, expert_N, dtype),
                self._gathered(self.down_int8, self.down_scale, expert_N, dtype))

    def _gathered(self, q: torch.Tensor, scale: torch.Tensor, expert_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q_N, scale_N = q.index_select(0, expert_N), scale.index_select(0, expert_N)
        # into the first N rows of the whole stack's scratch where that is safe (``_scratch``): on the CPU a fresh
        # multi-MB tensor per call costs more in page faults than the dequantization itself (measured: 29 vs
        # 6.5 ms for 6 slots at bench_ref size), and a captured CUDA graph then keeps no copy of its own
        out = self._scratch(q, dtype)
        if out is None or expert_N.shape[0] > q.shape[0]:  # (more slots than experts only when forced)
            return dequantize_rows(q_N, scale_N, dtype)
        return _dequantize_into(q_N, scale_N, out[:expert_N.shape[0]])

    def _per_slot(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        T, K = idx_TK.shape
        dtype = self.compute_dtype(x_TD)  # as _grouped: the autocast dtype under CUDA autocast
        gate_up_N2FD, down_NDF = self.slot_weights(idx_TK.reshape(-1), dtype)
        # slot n = t·K + j reads token t (idx_TK's row-major order); expand + reshape copies x K times, tiny
        x_N1D = x_TD.to(dtype)[:, None, :].expand(T, K, x_TD.shape[-1]).reshape(T * K, 1, -1)
        h_N12F = torch.bmm(x_N1D, gate_up_N2FD.transpose(1, 2))
        y_N1D = torch.bmm(self._swiglu_rows(h_N12F), down_NDF.transpose(1, 2))
        # the same combine as RoutedExperts.forward (elementwise multiply + sum over the K slots)
        w_TK1 = weight_TK.to(y_N1D.dtype)[:, :, None]
        return (y_N1D.view(T, K, -1) * w_TK1).sum(dim=1)

    # RoutedExperts.forward permutes tokens and calls one of these two on the sorted rows.
    def _looped(self, x_sorted_ND, counts_E) -> torch.Tensor:
        outs, dt = [], x_sorted_ND.dtype
        for e, rows_XD in enumerate(torch.split(x_sorted_ND, counts_E.tolist())):
            if rows_XD.shape[0] == 0:
                outs.append(rows_XD)
                continue
            h = F.linear(rows_XD, self._expert_rows(self.gate_up_int8, self.gate_up_scale, e, dt))
            outs.append(F.linear(self._swiglu_rows(h), self._expert_rows(self.down_int8, self.down_scale, e, dt)))
        return torch.cat(outs, dim=0)

    def _expert_rows(self, q: torch.Tensor, scale: torch.Tensor, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's dequantized rows, into row e of the shared scratch where that is safe (fresh per-call
        tensors made the CPU loop's time swing 8-25 ms a layer with the allocator's page faults)."""
        out = self._scratch(q, dtype)
        if out is None:
            return dequantize_rows(q[e], scale[e], dtype)
        return _dequantize_into(q[e], scale[e], out[e])

    def _grouped(self, x_sorted_ND, expert_sorted_N, counts_E) -> torch.Tensor:
        dtype = self.compute_dtype(x_sorted_ND)
        self.gate_up_proj = self._dequantized(self.gate_up_int8, self.gate_up_scale, dtype)  # one layer
        self.down_proj = self._dequantized(self.down_int8, self.down_scale, dtype)
        try:
            return super()._grouped(x_sorted_ND, expert_sorted_N, counts_E)
        finally:
            del self.gate_up_proj, self.down_proj

    def _dequantized(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``dequantize_rows`` (the same values), into the shared scratch unless autograd could keep it."""
        out = self._scratch(q, dtype)
        if out is None:
            return dequantize_rows(q, scale, dtype)
        return _dequantize_into(q, scale, out)

    def _scratch(self, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The model-wide tensor of q's shape in ``dtype`` to dequantize into, or None where a fresh one is needed."""
        # under autograd a backward would read the copy after the next layer overwrote it; a compiled step
        # (torch.compile) keeps its own buffers and would only trace the dict
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        key = (tuple(q.shape), dtype, q.device)
        out = self.scratch.get(key)
        if out is None:  # a normal tensor even when first made under inference_mode: both modes may write it
            with torch.inference_mode(False):
                out = self.scratch[key] = torch.empty(q.shape, dtype=dtype, device=q.device)
        return out


@dataclass
class QuantReport:
    num_linears: int
    num_expert_stacks: int
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        return self.bytes_after / max(self.bytes_before, 1)


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters + buffers, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def quantize_int8(model: nn.Module) -> QuantReport:
    """Swap every eligible linear and expert stack of ``model`` for its int8 twin (in place)."""
    before = model_bytes(model)
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    num_linears = num_stacks = 0
    scratch: dict = {}  # one dequantized copy per expert-stack shape for the whole model (Int8RoutedExperts)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not (tied and name == "lm_head" and parent is model):
                setattr(parent, name, Int8Linear(child))
                num_linears += 1
            elif type(child) is RoutedExperts:
                setattr(parent, name, Int8RoutedExperts(child, scratch))
                num_stacks += 1
    return QuantReport(num_linears, num_stacks, before, model_bytes(model))
