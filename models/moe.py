"""DeepSeekMoE layer: fp32 top-k router with balancing bias, stacked routed experts, shared experts.

Parameter layout (Hugging Face DeepseekV3 names, so export is a key copy):
    mlp.gate.weight                    (E, D)   router, fp32 maths
    mlp.gate.e_score_correction_bias   (E,)     fp32 BUFFER (aux-loss-free balancing; no grad)
    mlp.experts.gate_up_proj           (E, 2F, D)  rows [0, F) gate, rows [F, 2F) up
    mlp.experts.down_proj              (E, D, F)
    mlp.shared_experts.{gate,up,down}_proj  one SwiGLU of width num_shared × F
The expert weights are stored (out, in) like nn.Linear; ``torch._grouped_mm`` consumes them as
the transposed view (E, D, 2F) / (E, F, D) — a column-major operand the kernel takes without a copy.

Expert compute: token slots are permuted by a stable sort of expert ids (``stable_expert_order``: a
comparison count at decode sizes, argsort above). On CUDA in bf16 each
projection is one ``torch._grouped_mm`` with int32 cumulative end offsets. Groups can be padded to
multiples of ``RoutedExperts.group_align`` rows; on the lent H100 with torch 2.11 unpadded groups
(align 1) gave identical outputs and gradients and were faster, so 1 is the default. The
permutations use custom autograd functions whose backward is a gather (autograd's default
index_add_ with atomics was the costliest kernel of a training step). All of it stays on the device: no
``.item()``/``.tolist()``, and every shape is static (T·K slots, plus an upper bound on padding),
so torch.compile sees no data-dependent shapes. Elsewhere (CPU, fp32/fp64) a per-expert loop
over the same permuted rows computes the same function. The combine un-permutes the outputs and
takes the gate-weighted sum over the k slots of each token (deterministic, unlike an atomic
scatter-add).

Router at inference: one Triton launch may compute the logits, the scores, the biased top-k and the gate weights
(kernels/router.py; ``Router.fused_inference`` and ``Router.fused_logits``), the formula's choices.

Shape suffixes: T tokens (flattened batch), D hidden, E experts, K experts per token,
N = T·K routed slots, M padded slots, F expert width, G groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import balancing
from .expert_order import (  # noqa: F401  (re-exported: the routing's and the kernels' one place)
    RANK_ORDER_MAX_SLOTS, RANK_TOPK_MAX_PAIRS, rank_form_pays, stable_expert_order, topk_by_rank)
from .config import ModelConfig
from .layers import SwiGLU


@dataclass
class RouterOutput:
    topk_idx_TK: torch.Tensor     # int64
    topk_weight_TK: torch.Tensor  # fp32 gate weights (unbiased scores, renormalised, × route_scale)
    scores_TE: torch.Tensor       # fp32 sigmoid/softmax scores (no bias)
    logits_TE: torch.Tensor       # fp32 router logits


def select_experts(scores_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int, n_group: int,
                   topk_group: int) -> torch.Tensor:
    """Top-k expert ids (T, K) on scores + bias, restricted to the best ``topk_group`` groups.

    A group's score is the sum of its top-2 biased scores (DeepSeek-V3); experts of dropped groups
    are masked with −inf (not 0, which could still win against negative biased scores).
    """
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    if n_group > 1 and topk_group < n_group:
        T, E = choice_TE.shape
        grouped_TGe = choice_TE.view(T, n_group, E // n_group)
        group_score_TG = grouped_TGe.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_score_TG.topk(topk_group, dim=-1).indices, True)
        keep_TE = keep_TG[:, :, None].expand_as(grouped_TGe).reshape(T, E)
        choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
    if rank_form_pays(choice_TE.numel() * choice_TE.shape[-1], RANK_TOPK_MAX_PAIRS):
        return topk_by_rank(choice_TE, k)
    return choice_TE.topk(k, dim=-1).indices


def balanced_assignment(num_tokens: int, k: int, num_experts: int, device) -> torch.Tensor:
    """Round-robin expert ids (T, K): slot n = t·K + j goes to expert n mod E (benchmark mode)."""
    slots = torch.arange(num_tokens * k, device=device).view(num_tokens, k)
    return slots % num_experts


class Router(nn.Module):
    """HF ``mlp.gate``: logits and scores in fp32; the bias only chooses, never weighs."""

    # After the logits GEMV, one Triton launch (kernels/router.py) instead of eager's 9 kernels a layer (sigmoid, bias
    # add, topk's two, gather, sum, add, div, mul) where it is safe, the rules of ``RMSNorm.fused_inference``: no
    # gradient needed, a device in ``kernel_devices``, not while torch.compile traces (inductor fuses the formula; the
    # kernel is no op it could trace), Triton importable, plus: no forced or balanced routing, E ≤ 256 (a power of two
    # with group-limited routing), K ≤ 16, fp32 logits (``kernels.router.kernel_applies``). The formula's choices in its column
    # order (ties to the lower id) and, on the GPU, its scores and weights bit for bit (CUDA's expf, IEEE divisions,
    # CUDA ``sum``'s order); generate() and the serving engine both take it, so greedy engine output still equals
    # generate()'s. On by default since it ran on a GPU (H200, 2026-12-07, RESULTS.md "Serving"): its GPU tests
    # passed (bit-equal to eager CUDA, CUDA's sum order included), and the default graph engine step ran 863 vs 773
    # tok/s at batch 1 and 16,814 vs 15,541 at batch 32 with it (same call; 63 launches a bench_ref decode step
    # become 7). benchmarks/bench_decode.py "+norouter" is the row without it.
    fused_inference: bool = True
    # Where the fused router runs (above), the same launch also forms the logits from x and the weight
    # (``kernels.router.route_hidden``): the two casts and cuBLAS's fp32 GEMV of ``logits`` go, 4 launches a MoE layer
    # become 1 (bench_ref: 21 fewer a decode step). Also an fp32 weight and bf16/fp16/fp32 inputs, in fp32; fp64 and
    # a gradient through x or the weight take ``logits``. The logits differ from cuBLAS's only in the order of their
    # fp32 sums, and that order is the same for every token of every call (batch invariance: the engine's prefill
    # chunks and generate()'s whole prompts route alike); choices can differ from ``logits``' at near-ties. On by
    # default since it ran on a GPU (H100, 2026-12-07 late, RESULTS.md "Three more decode kernels on the GPU"): its
    # GPU tests passed (no sync, graph replay, the graphed engine == generate()) and the default graph engine step
    # ran 1,244 vs 1,213 tok/s at batch 1 and 21,069 vs 20,577 at batch 32 with it (same call).
    # benchmarks/bench_decode.py "+norouterlogits" is the row without it.
    fused_logits: bool = True
    # where the kernel may run; the CPU tests add "cpu" to run it in Triton's interpreter
    kernel_devices: tuple[str, ...] = ("cuda",)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.k = cfg.num_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.score_func, self.norm_topk_prob, self.route_scale = cfg.score_func, cfg.norm_topk_prob, cfg.route_scale
        self.use_bias = cfg.balancing == "aux_free"
        self.force_balanced = cfg.force_balanced_routing
        self.weight = nn.Parameter(torch.empty(cfg.num_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the balancing bias: keep it fp32 (as HF does), moving only its device.
        bias_fp32 = self.e_score_correction_bias
        out = super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if moved.dtype != torch.float32 and bias_fp32.dtype == torch.float32:
            self.e_score_correction_bias = bias_fp32.to(device=moved.device)
        return out

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 (fp64 in reference tests), also under autocast, which would run the linear in bf16."""
        dt = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.to(dt), self.weight.to(dt))

    def forward(self, x_TD: torch.Tensor, forced_idx_TK: torch.Tensor | None = None) -> RouterOutput:
        """forced_idx_TK (optional) replays given expert choices (e.g. routing replay in RL)."""
        kernel = self._kernel(x_TD, forced_idx_TK)
        if kernel is not None and self.fused_logits:
            fused = self._fused_from_input(kernel, x_TD)
            if fused is not None:
                return RouterOutput(*fused)
        logits_TE = self.logits(x_TD)
        fused = self._fused(kernel, logits_TE) if kernel is not None else None
        if fused is not None:
            return RouterOutput(*fused, logits_TE)
        scores_TE = logits_TE.sigmoid() if self.score_func == "sigmoid" else logits_TE.softmax(dim=-1)
        if forced_idx_TK is not None:
            idx_TK = forced_idx_TK
        elif self.force_balanced:
            idx_TK = balanced_assignment(x_TD.shape[0], self.k, self.num_experts, x_TD.device)
        else:
            with torch.no_grad():
                bias = self.e_score_correction_bias if self.use_bias else None
                idx_TK = select_experts(scores_TE.detach(), bias, self.k, self.n_group, self.topk_group)
        weight_TK = scores_TE.gather(1, idx_TK)
        if self.norm_topk_prob:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return RouterOutput(idx_TK, weight_TK * self.route_scale, scores_TE, logits_TE)

    def _kernel(self, x_TD: torch.Tensor, forced_idx_TK: torch.Tensor | None):
        """kernels.router where the fused router may run (``fused_inference``; the rest: its ``*_applies``), else
        None."""
        # is_compiling first: under torch.compile nothing else is read, so no guard on the switch
        if (torch.compiler.is_compiling() or not self.fused_inference
                or x_TD.device.type not in self.kernel_devices or forced_idx_TK is not None or self.force_balanced):
            return None
        from .kernels import router  # imports triton, an optional dependency CPU training need not load

        return router

    def _routing_args(self):
        bias_E = self.e_score_correction_bias if self.use_bias else None
        return bias_E, self.k, self.score_func, self.n_group, self.topk_group

    def _fused_from_input(self, kernel, x_TD: torch.Tensor):
        """(idx_TK, weight_TK, scores_TE, logits_TE) from one launch that also forms the logits, else None."""
        weight_ED = self.weight  # read once (a parametrization computes it per read)
        bias_E, k, score_func, *groups = self._routing_args()
        if not kernel.logits_kernel_applies(x_TD, weight_ED, bias_E, k, score_func, *groups):
            return None
        return kernel.route_hidden(x_TD, weight_ED, bias_E, k, score_func, self.norm_topk_prob, self.route_scale,
                                   *groups)

    def _fused(self, kernel, logits_TE: torch.Tensor):
        """(idx_TK, weight_TK, scores_TE) from the kernel after ``logits``, else None."""
        bias_E, k, score_func, *groups = self._routing_args()
        if not kernel.kernel_applies(logits_TE, bias_E, k, score_func, *groups):
            return None
        return kernel.route(logits_TE, bias_E, k, score_func, self.norm_topk_prob, self.route_scale, *groups)


class _GatherTokenSlots(torch.autograd.Function):
    """x_sorted[n] = x[token_of_slot[order[n]]]; backward un-permutes and sums each token's K slots.

    The autograd default (index_add_ over 6× repeated token ids) uses atomics and was the single
    most expensive kernel of a bench_ref training step; this backward is a gather plus a reduction.
    """

    @staticmethod
    def forward(ctx, x_TD, order_N, inv_order_N, k: int):
        ctx.save_for_backward(inv_order_N)
        ctx.k = k
        return x_TD.index_select(0, order_N // k)

    @staticmethod
    def backward(ctx, grad_sorted_ND):
        (inv_order_N,) = ctx.saved_tensors
        grad_NKD = grad_sorted_ND.index_select(0, inv_order_N).view(-1, ctx.k, grad_sorted_ND.shape[-1])
        return grad_NKD.sum(dim=1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """x.index_select(0, perm) whose backward is the inverse gather (no atomic index_add)."""

    @staticmethod
    def forward(ctx, x_ND, perm_N, inv_perm_N):
        ctx.save_for_backward(inv_perm_N)
        return x_ND.index_select(0, perm_N)

    @staticmethod
    def backward(ctx, grad_ND):
        (inv_perm_N,) = ctx.saved_tensors
        return grad_ND.index_select(0, inv_perm_N), None, None


def _grouped_mm(x_MD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x_MD, w_EDF, offs=offs_E)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked; see the module docstring for layout and dispatch."""

    group_align = 1  # row multiple per group; 1 measured fastest and correct on H100 (torch 2.11)
    use_grouped_mm: bool | None = None  # None: auto (CUDA + bf16); True/False forces a path
    # fp8.enable_fp8(model, ["experts"]) sets this to the fp8 gradient dtype: the grouped path's two
    # GEMMs then run through fp8.fp8_grouped_mm (groups padded to 16 rows); None = bf16 grouped_mm
    fp8_grad_dtype: torch.dtype | None = None
    # decode-sized calls through fused Triton kernels, kernels/moe_decode.py (slot-major up to T·K = 3·E,
    # expert-major above); None: auto (CUDA, bf16, no autograd, triton importable, T·K ≤ 6·E:
    # moe_decode.decide_fused_decode); True forces; False keeps the grouped path. Auto by default since
    # 2026-12-07: the kernels round where inductor does, not where the eager grouped path does (no farther from
    # float64), and generate() and the serving engine take them alike (the graphed engine == generate() with them
    # on auto passed on an H200); 5.5x the grouped layer at 1 token, 1.4x at 32 (H100, RESULTS.md).
    # EngineConfig.fused_moe sets it per served model.
    fused_decode: bool | None = None
    # The expert-major kernels' routing bookkeeping (the slots' stable order by expert and each expert's end in it)
    # as one Triton launch (moe_decode.fused_expert_order) where the uncompiled step runs a radix argsort, the
    # inverse's scatter and the ends' count (~27 µs a layer for 192 ids on an H100, profile_decode.py): the same
    # integers. Outside torch.compile only (there the comparison count fuses into one inductor kernel). Off until
    # its GPU test and an engine row have run (written 2026-12-08, loans paused): benchmarks/bench_decode.py
    # "+moeorder", benchmarks/bench_moe_decode.py "expert_major_folded+order".
    fused_decode_order: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, D, F_ = cfg.num_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.width = E, F_
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))

    @staticmethod
    def compute_dtype(x: torch.Tensor) -> torch.dtype:
        """The dtype the expert matmuls run in: the autocast dtype under CUDA autocast (as
        nn.Linear would; fp32 master weights are cast per call), else the input's."""
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            return torch.get_autocast_dtype("cuda")
        return x.dtype

    def _grouped_path(self, x: torch.Tensor) -> bool:
        if self.use_grouped_mm is not None:
            return self.use_grouped_mm
        return x.is_cuda and self.compute_dtype(x) == torch.bfloat16

    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor,
                shared: nn.Module | None = None) -> torch.Tensor:
        """Σ_k weight[t, k] · expert_{idx[t, k]}(x[t]) for every token t, plus shared(x[t]) when the MoE's shared
        expert is given: folded into the fused decode kernels where they run and it folds
        (``moe_decode.shared_fold_weights``), else its module's output added, as ``DeepSeekMoE`` adds it."""
        if self.fused_decode or (self.fused_decode is None and x_TD.is_cuda):
            from .kernels import moe_decode  # imports triton (optional), so only where the fused path may run

            stacks = (self.gate_up_proj, self.down_proj)  # read once: LoRA's parametrization computes them per read
            if moe_decode.fused_decode_applies(self, x_TD, idx_TK, *stacks):
                return moe_decode.fused_routed_experts(self, x_TD, idx_TK, weight_TK, *stacks, shared=shared)
        T, K = idx_TK.shape
        flat_N = idx_TK.reshape(-1)
        order_N, inv_order_N = stable_expert_order(flat_N)
        counts_E = balancing.tokens_per_expert(idx_TK, self.num_experts).to(torch.int32)
        x_sorted_ND = _GatherTokenSlots.apply(x_TD, order_N, inv_order_N, K)
        if self._grouped_path(x_TD):
            y_sorted_ND = self._grouped(x_sorted_ND, flat_N[order_N], counts_E)
        else:
            y_sorted_ND = self._looped(x_sorted_ND, counts_E)
        # un-permute to (T, K, D) and take the gate-weighted sum over the K slots. An elementwise
        # multiply + sum, not a (T,1,K)@(T,K,D) bmm: cuBLAS runs that shape ~10x slower (measured).
        y_ND = _PermuteRows.apply(y_sorted_ND, inv_order_N, order_N)
        w_TK1 = weight_TK.to(y_ND.dtype)[:, :, None]
        y_TD = (y_ND.view(T, K, -1) * w_TK1).sum(dim=1)
        return y_TD if shared is None else y_TD + shared(x_TD)

    def _swiglu_rows(self, h_X2F: torch.Tensor) -> torch.Tensor:
        gate, up = h_X2F.split(self.width, dim=-1)
        return F.silu(gate) * up

    def _grouped(self, x_sorted_ND, expert_sorted_N, counts_E) -> torch.Tensor:
        N, D = x_sorted_ND.shape
        E, a = self.num_experts, self.group_align
        if self.fp8_grad_dtype is not None:
            from .fp8 import FP8_GROUP_ALIGN

            a = max(a, FP8_GROUP_ALIGN)
        if a > 1:
            padded_E = (counts_E + (a - 1)) // a * a
            pad_end_E = torch.cumsum(padded_E, 0, dtype=torch.int32)
            start_E = torch.cumsum(counts_E, 0, dtype=torch.int32) - counts_E
            rank_N = torch.arange(N, device=x_sorted_ND.device, dtype=torch.int32) - start_E[expert_sorted_N]
            dest_N = (pad_end_E - padded_E)[expert_sorted_N] + rank_N
            M = (N + E * (a - 1) + a - 1) // a * a  # static bound on the padded length
            x_MD = x_sorted_ND.new_zeros(M, D).index_copy(0, dest_N.long(), x_sorted_ND)
            offs_E = pad_end_E
        else:
            x_MD, offs_E = x_sorted_ND, torch.cumsum(counts_E, 0, dtype=torch.int32)
        dtype = self.compute_dtype(x_MD)  # grouped_mm has no autocast rule: cast explicitly (no-op in bf16)
        x_MD = x_MD.to(dtype)
        if self.fp8_grad_dtype is not None:
            from .fp8 import fp8_grouped_mm

            h_M2F = fp8_grouped_mm(x_MD, self.gate_up_proj.to(dtype), offs_E, self.fp8_grad_dtype)
            y_MD = fp8_grouped_mm(self._swiglu_rows(h_M2F), self.down_proj.to(dtype), offs_E, self.fp8_grad_dtype)
        else:
            h_M2F = _grouped_mm(x_MD, self.gate_up_proj.to(dtype).transpose(-2, -1), offs_E)
            y_MD = _grouped_mm(self._swiglu_rows(h_M2F), self.down_proj.to(dtype).transpose(-2, -1), offs_E)
        return y_MD.index_select(0, dest_N.long()) if a > 1 else y_MD

    def _looped(self, x_sorted_ND, counts_E) -> torch.Tensor:
        # Fallback: one slice per expert. The host sync in tolist() is fine off the GPU fast path.
        outs = []
        for e, rows_XD in enumerate(torch.split(x_sorted_ND, counts_E.tolist())):
            h = rows_XD @ self.gate_up_proj[e].t()
            outs.append(self._swiglu_rows(h) @ self.down_proj[e].t())
        return torch.cat(outs, dim=0)


@dataclass
class MoEStats:
    # None when the forward was asked for no router statistics (``with_stats=False``: decode steps)
    tokens_per_expert_E: torch.Tensor | None  # fp32 counts (detached)
    maxvio: torch.Tensor | None
    router_entropy: torch.Tensor | None
    # the balancing losses; None when the forward was asked for none (``with_losses=False``: decode steps)
    seq_aux_loss: torch.Tensor | None  # already × α
    z_loss: torch.Tensor | None        # already × weight
    lb_loss: torch.Tensor | None       # already × weight
    topk_idx_BTK: torch.Tensor


class DeepSeekMoE(nn.Module):
    """Shared experts + routed experts. ``forward`` returns (y_BTD, MoEStats)."""

    # Hand the shared expert to the routed experts, whose fused decode kernels then compute it as S more slots a
    # token (kernels/moe_decode.py, slot-major) or one more expert holding every token (expert-major): a
    # decode-sized MoE layer's whole FFN in their two (three) launches, where the shared SwiGLU and the add took 6
    # (gate, up, silu, mul, down GEMVs and kernels, and the add: 42 a bench_ref decode step). Elsewhere
    # (grouped/looped paths, a shared expert that does not fold) RoutedExperts adds the module's output as this
    # class did. Rounds once fewer than the formula (the shared output joins the routed fp32 sum unrounded by an add;
    # no farther from float64, tests/test_shared_fold.py). On by default since it ran on a GPU (H100, 2026-12-07 late,
    # RESULTS.md "Three more decode kernels on the GPU"; the slot-major fold then, the expert-major one came later and
    # has run in Triton's CPU interpreter only so far): its GPU tests passed (compiled, captured, no sync, == the
    # formula; the graphed engine == generate() with no shared SwiGLU run) and the default graph engine step ran 1,411
    # vs 1,213 tok/s at batch 1 and 21,217 vs 20,577 at batch 32 with it (same call). benchmarks/bench_decode.py
    # "+nosharedfold" is the row without it.
    fused_shared: bool = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.num_shared_experts * cfg.moe_intermediate_size)
                               if cfg.num_shared_experts > 0 else None)

    def forward(self, x_BTD: torch.Tensor, forced_idx_BTK: torch.Tensor | None = None,
                with_losses: bool = True, valid_BT: torch.Tensor | None = None,
                with_stats: bool = True) -> tuple[torch.Tensor, MoEStats]:
        """with_losses=False skips the balancing losses (zeros), e.g. when no loss is computed;
        with_stats=False skips the router statistics (None): a decode step reads only the choices.

        valid_BT (bool, optional): the positions that count in the stats and losses (an MTP depth's
        positions with a target); every token is still routed and computed.
        """
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        forced = forced_idx_BTK.reshape(B * T, -1) if forced_idx_BTK is not None else None
        r = self.gate(x_TD, forced)
        # isinstance: a stand-in for the routed experts (platform/train/expert_parallel.py's) takes no shared expert
        if self.shared_experts is not None and self.fused_shared and isinstance(self.experts, RoutedExperts):
            y_TD = self.experts(x_TD, r.topk_idx_TK, r.topk_weight_TK, shared=self.shared_experts)
        else:
            y_TD = self.experts(x_TD, r.topk_idx_TK, r.topk_weight_TK)
            if self.shared_experts is not None:
                y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(B, T, D), self._stats(r, B, T, with_losses, valid_BT, with_stats)

    def _stats(self, r: RouterOutput, B: int, T: int, with_losses: bool, valid_BT: torch.Tensor | None,
               with_stats: bool = True) -> MoEStats:
        cfg = self.cfg
        stats = (None, None, None)
        if with_stats:
            with torch.no_grad():
                counts_E = balancing.tokens_per_expert(r.topk_idx_TK, cfg.num_routed_experts, valid_BT)
                stats = (counts_E, balancing.maxvio(counts_E), balancing.router_entropy(r.scores_TE, valid_BT))
        idx_BTK = r.topk_idx_TK.view(B, T, -1)
        if not with_losses:  # no zeros either (a launch a MoE layer of every decode step); no one reads them
            return MoEStats(*stats, None, None, None, idx_BTK)
        zero = r.scores_TE.new_zeros(())
        seq_aux = (balancing.seq_aux_loss(r.scores_TE.view(B, T, -1), idx_BTK, cfg.seq_aux_alpha, valid_BT)
                   if cfg.seq_aux_alpha > 0 else zero)
        z = (balancing.z_loss(r.logits_TE, cfg.z_loss_weight, valid_BT)
             if cfg.z_loss_weight > 0 else zero)
        lb = (balancing.load_balancing_loss(r.scores_TE, r.topk_idx_TK, cfg.lb_loss_weight, valid_BT)
              if cfg.lb_loss_weight > 0 else zero)
        return MoEStats(*stats, seq_aux, z, lb, idx_BTK)
