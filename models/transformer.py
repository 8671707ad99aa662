"""MoETransformer: the DeepSeek-V3-family decoder (MLA + DeepSeekMoE + optional MTP) and ModelOutput.

Module tree = Hugging Face ``DeepseekV3ForCausalLM`` keys (export is a key copy):
    model.embed_tokens, model.layers.{i}.{input_layernorm, self_attn.*, post_attention_layernorm, mlp.*},
    model.norm, lm_head; plus mtp.{j}.* (see mtp.py) when mtp_depth > 0.
Layers < first_k_dense have a dense SwiGLU ``mlp``; the rest a ``DeepSeekMoE`` (see moe.py).

Losses (``ModelOutput.aux``, all detached copies; ``loss`` is the attached sum):
    loss = lm_loss + mtp_loss_weight · mtp_loss + seq_aux_loss + z_loss + lb_loss
seq_aux/z/lb are summed over every MoE layer (MTP blocks included) and ALREADY carry their
weights (α, z_loss_weight, lb_loss_weight); mtp_loss is the plain mean CE over MTP depths.
They are computed only when targets are given (0 otherwise); router statistics always are.
lm_loss is the mean token cross-entropy over targets != -100 (0 if there are none).

Router statistics (rows: the main MoE layers in order, then MTP blocks' MoE layers):
    aux["tokens_per_expert"] (L, E) fp32 counts of this forward; aux["maxvio"] (L,);
    aux["router_entropy"] (L,). An MTP block counts only the positions its depth has a target for,
    in these statistics and in its seq_aux/z/lb losses. All computed on the device, no host sync.
A training loop sums tokens_per_expert over micro-batches and ranks and calls
``model.apply_router_bias_update(counts_LE)`` once per optimiser step.

Speed switches (benchmarks/RESULTS.md, issue 16): ``set_activation_checkpointing(model, policy, layers)``
recomputes blocks in backward (``full``, or ``selective``: keep the matrix products' outputs);
``models.fp8.enable_fp8`` runs chosen linear groups in FP8; ``models.kernels.graph_step`` replays a whole
training step as one CUDA graph (it sets ``capture_safe_embedding``: a sync-free embedding backward).

Shape suffixes: B batch, T new tokens, S key slots, D hidden, V vocab, L router layers, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from . import balancing
from .attention import MLA, CacheStep, MLACache, prepare_attention
from .config import ModelConfig
from .layers import RMSNorm, RotaryEmbedding, SwiGLU, rope_inv_freq
from .moe import DeepSeekMoE, MoEStats, Router
from .mtp import IGNORE_INDEX, MTPModule, mtp_targets, shift_left


@dataclass
class ModelOutput:
    logits: torch.Tensor             # (B, T, V), or (B, 1, V) with last_logits_only
    loss: torch.Tensor | None = None
    aux: dict = field(default_factory=dict)
    hidden: torch.Tensor | None = None  # (B, T, D) final-normed hidden states when return_hidden
    # the objective's attached terms (with targets): "lm_loss", "mtp_losses" (one per depth), "balance_loss"
    # (seq_aux + z + lb); a loop that weights micro-batches by their target counts rebuilds loss from them
    terms: dict = field(default_factory=dict)


# Activation checkpointing policies (``set_activation_checkpointing``):
#   none       keep every activation autograd saves (fastest, most memory)
#   full       keep only the block's inputs; recompute the whole block in backward
#   selective  keep the outputs of the matrix products (mm, grouped_mm, scaled_mm, attention) and
#              recompute the cheap element-wise work around them (norms, RoPE, SwiGLU, gathers)
AC_POLICIES = ("none", "full", "selective")

# ops whose outputs the selective policy saves: the expensive ones (recomputing them would cost
# FLOPs); everything else in the block is memory-bound and cheaper to redo than to keep.
_SAC_SAVE = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten._grouped_mm.default, torch.ops.aten._scaled_mm.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_cudnn_attention.default}


# MoEStats field names, fixed here: torch.compile cannot trace dataclasses.fields() on the class.
_STATS_FIELDS = tuple(f.name for f in fields(MoEStats))


def _sac_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAC_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_sac_policy)


class DecoderLayer(nn.Module):
    checkpoint_policy = "none"  # one of AC_POLICIES; set per block by set_activation_checkpointing

    def __init__(self, cfg: ModelConfig, layer_idx: int, moe: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = moe
        self.mlp = DeepSeekMoE(cfg) if moe else SwiGLU(cfg.hidden_size, cfg.dense_width(layer_idx))

    def forward(self, x_BTD, cos, sin, mask_B1TS=None, step: CacheStep | None = None, forced_idx_BTK=None,
                with_losses: bool = True, valid_BT=None, with_stats: bool = True, delta_BTD=None,
                defer_add: bool = False):
        """valid_BT (bool, optional): the positions that count in the MoE stats and losses (MTP blocks);
        with_stats=False: no router statistics (MoEStats' counts/maxvio/entropy None), only the choices.

        The block boundary's residual add, deferred (inference: a cache step or no autograd, where the block runs
        unchecked): ``delta_BTD`` is the previous block's output not yet added to ``x_BTD``; it is added by this
        block's input norm (``RMSNorm.add_forward``: the add and the norm in one launch where the fused norm
        runs, bit-equal to the add then the norm). ``defer_add=True`` returns ``(x_BTD, y_BTD, stats)``, this
        block's output ``y_BTD`` not added, for the next block or the final norm to add."""
        if (self.checkpoint_policy == "none" or step is not None or not torch.is_grad_enabled()
                or delta_BTD is not None or defer_add):
            return self._block(x_BTD, cos, sin, mask_B1TS, step, forced_idx_BTK, with_losses, valid_BT, with_stats,
                               delta_BTD, defer_add)
        # Non-reentrant checkpoint (traceable by torch.compile). The router choices are recomputed
        # from the same inputs, so the replay routes identically; the stats leave as a plain tuple
        # of tensors (what checkpoint and its compiled form carry), rebuilt into MoEStats here.
        context = _selective_context if self.checkpoint_policy == "selective" else None
        kw = {"context_fn": context} if context else {}
        y_BTD, flat = checkpoint(partial(self._flat_block, with_losses=with_losses), x_BTD, cos, sin,
                                 mask_B1TS, forced_idx_BTK, valid_BT, use_reentrant=False, **kw)
        return y_BTD, (MoEStats(*flat) if flat else None)

    def _flat_block(self, x_BTD, cos, sin, mask_B1TS, forced_idx_BTK, valid_BT, with_losses: bool):
        y_BTD, stats = self._block(x_BTD, cos, sin, mask_B1TS, None, forced_idx_BTK, with_losses, valid_BT)
        return y_BTD, (tuple(getattr(stats, name) for name in _STATS_FIELDS) if stats is not None else ())

    def _block(self, x_BTD, cos, sin, mask_B1TS, step, forced_idx_BTK, with_losses: bool, valid_BT,
               with_stats: bool = True, delta_BTD=None, defer_add: bool = False):
        if delta_BTD is None:
            h_BTD = self.input_layernorm(x_BTD)
        else:  # the previous block's residual add and this block's input norm (see ``forward``)
            x_BTD, h_BTD = self.input_layernorm.add_forward(x_BTD, delta_BTD)
        attn_BTD = self.self_attn(h_BTD, cos, sin, mask_B1TS, step)
        # the residual add and the FFN input's norm: one kernel at inference on CUDA (RMSNorm.add_forward)
        x_BTD, h_BTD = self.post_attention_layernorm.add_forward(x_BTD, attn_BTD)
        if self.is_moe:
            y_BTD, stats = self.mlp(h_BTD, forced_idx_BTK, with_losses, valid_BT, with_stats)
        else:
            y_BTD, stats = self.mlp(h_BTD), None
        return (x_BTD, y_BTD, stats) if defer_add else (x_BTD + y_BTD, stats)


class Backbone(nn.Module):
    """HF ``model``: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, moe) for i, moe in enumerate(cfg.is_moe_layer))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MoETransformer(nn.Module):
    """DeepSeek-V3-style causal LM.

    ``forward(input_ids_BT, targets=None, *, positions=None, attention_mask_BS=None, cache=None,
    cache_position=None, forced_routing=None, last_logits_only=False, return_hidden=False,
    return_router_choices=False) -> ModelOutput``

    - targets (B, T): next-token ids, -100 = ignore (also marks document boundaries for MTP).
    - positions (B, T): RoPE positions. Default: 0..T-1, or per row the count of earlier real
      tokens when ``attention_mask_BS`` is given (so left-padded rows start at position 0).
    - attention_mask_BS (B, T) or (B, cache.length + T) with 1 = real token: padded keys are masked
      (each query still sees itself, so fully padded rows stay finite). Without a cache and without
      a mask, attention is plain causal (the fast training path).
    - cache (``MLACache``, see ``new_cache``): selects the absorbed-MLA path; the new tokens are
      written at slots [cache.length, cache.length + T) (or at ``cache_position`` (T,) int64, the
      static CUDA-graph mode) and attend to every earlier real slot. Prefill = a call with the
      prompt, decode = calls with T = 1. Logits equal the full forward's.
    - decode: the call appends one generated token a row (a decode step of ``generate`` or the serving
      engine), not prompt tokens. Only such a call may take the fused MLA decode attention: the path of a
      token's attention must not depend on how its prompt was chunked (a 1-token prefill chunk is T = 1
      too, and would otherwise take the kernel where a whole-prompt prefill takes the formula).
    - document_ids_BT (B, T): packed rows of several documents (runs of equal ids): attention is
      block-diagonal causal and RoPE positions restart per document (no cache, no attention_mask_BS).
    - with_losses: compute the balancing losses (default: when targets are given); without targets
      they are only in ``terms["balance_loss"]`` (attached) and aux.
    - mtp_boundary_BT (B, T) bool: True where targets[j] begins a new document (e.g. the next
      document's BOS). Only the MTP depths treat those targets as chain breaks (-100 in
      ``mtp_targets``); the main LM loss keeps them, as validation does, so LM losses of MTP and
      non-MTP runs measure the same thing.
    - forced_routing: list (one per MoE layer, MTP excluded) of (B, T, K) expert ids to replay.
    - return_router_choices: aux["router_choices"] = (L_main, B, T, K) chosen expert ids.
    - router_stats=False leaves the router statistics (tokens_per_expert, maxvio, router_entropy) out of aux
      and does not compute them: a decode step's dozen small kernels a layer that no one reads.
    - MTP runs only when targets are given and no cache is used.
    """

    # a cache step adds each block's output to the residual stream in the next block's input norm (and the final
    # norm's): 1 launch instead of 2 a block boundary where the fused norm runs, bit-equal (rmsnorm.add_rms_norm);
    # False: the plain add (the benchmarks' "+noboundary" rows)
    defer_residual_add = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, DecoderLayer(cfg, cfg.num_layers + j, cfg.num_moe_layers > 0))
            for j in range(cfg.mtp_depth))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._loss_fn = _cross_entropy  # compile_blocks swaps in a compiled version
        # kernels.graph_step.make_capture_safe sets this: sync-free embedding backward (CUDA graphs)
        self.capture_safe_embedding = False
        self.init_weights()

    # ------------------------------------------------------------------ parameters
    def init_weights(self) -> None:
        """normal(0, init_std); residual-branch outputs / sqrt(2·layers); router ×0.5; norms 1; bias 0.

        Also recomputes the RoPE table, so a model built on the meta device can be materialised
        with ``model.to_empty(device=...)`` followed by ``model.init_weights()``.
        """
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * (self.cfg.num_layers + self.cfg.mtp_depth))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0)  # RMSNorm weights (the only 1-D parameters)
                elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                    p.normal_(0.0, resid_std)
                elif name.endswith("mlp.gate.weight"):
                    p.normal_(0.0, 0.5 * std)
                else:
                    p.normal_(0.0, std)
            for r in self.routers():
                r.e_score_correction_bias.zero_()
            inv_freq, _ = rope_inv_freq(self.cfg, device="cpu")
            self.rotary.inv_freq.copy_(inv_freq.to(self.rotary.inv_freq.device))

    def routers(self) -> list[Router]:
        """Every router, in the row order of aux["tokens_per_expert"] (main layers, then MTP)."""
        blocks = list(self.model.layers) + [m.block for m in self.mtp]
        return [b.mlp.gate for b in blocks if b.is_moe]

    def num_params(self, active: bool = False, embedding: bool = True) -> int:
        """Counted from the modules; same conventions as ``ModelConfig.num_params``."""
        cfg, total = self.cfg, 0
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if name.startswith("model.embed_tokens") and not embedding and not cfg.tie_embeddings:
                continue
            if active and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                n = n // cfg.num_routed_experts * cfg.num_experts_per_tok
            total += n
        return total

    @torch.no_grad()
    def apply_router_bias_update(self, counts_LE: torch.Tensor, gamma: float | None = None) -> None:
        """Aux-loss-free step: sign-rule update of every router bias from GLOBAL counts (L, E)."""
        routers = self.routers()
        if self.cfg.balancing != "aux_free" or not routers:
            return
        if counts_LE.shape != (len(routers), self.cfg.num_routed_experts):
            raise ValueError(f"apply_router_bias_update: counts_LE has shape {tuple(counts_LE.shape)}, "
                             f"expected ({len(routers)}, {self.cfg.num_routed_experts})")
        g = self.cfg.bias_update_gamma if gamma is None else gamma
        # one batched (L, E) update and one foreach copy: a handful of launches instead of ~9 per router
        biases = [r.e_score_correction_bias for r in routers]
        new_LE = balancing.update_router_bias(torch.stack(biases), counts_LE.to(biases[0].device), g)
        torch._foreach_copy_(biases, list(new_LE.unbind(0)))

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype | None = None) -> MLACache:
        p = self.lm_head.weight
        return MLACache.for_config(self.cfg, batch_size, max_len, device or p.device, dtype or p.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids_BT: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, attention_mask_BS: torch.Tensor | None = None,
                cache: MLACache | None = None, cache_position: torch.Tensor | None = None,
                forced_routing: list[torch.Tensor] | None = None, last_logits_only: bool = False,
                return_hidden: bool = False, return_router_choices: bool = False,
                document_ids_BT: torch.Tensor | None = None, with_losses: bool | None = None,
                mtp_boundary_BT: torch.Tensor | None = None, router_stats: bool = True,
                decode: bool = False) -> ModelOutput:
        cfg = self.cfg
        with_losses = targets is not None if with_losses is None else with_losses
        positions, mask, step = prepare_attention(input_ids_BT, positions, attention_mask_BS, cache, cache_position,
                                                  document_ids_BT, rotary=self.rotary, decode=decode)
        # a one-token cache step's cos/sin may come with it (kernels/cache_step.py: one launch for both)
        cos, sin = step.rope if step is not None and step.rope is not None else self.rotary(positions)
        x_BTD = self._embed(input_ids_BT)
        all_stats: list[MoEStats] = []
        moe_i = 0
        # a cache step (prefill / decode) defers each block's residual add to the next norm (one launch each where
        # the fused norm runs; DecoderLayer.forward): a block's output then is its residual input, not the sum,
        # so other forwards keep the plain contract (forward hooks on a block see the hidden state)
        defer = step is not None and self.defer_residual_add
        delta_BTD = None
        for layer in self.model.layers:
            forced = None
            if forced_routing is not None and layer.is_moe:
                forced, moe_i = forced_routing[moe_i], moe_i + 1
            if defer:
                x_BTD, delta_BTD, stats = layer(x_BTD, cos, sin, mask, step, forced, with_losses,
                                                with_stats=router_stats, delta_BTD=delta_BTD, defer_add=True)
            else:
                x_BTD, stats = layer(x_BTD, cos, sin, mask, step, forced, with_losses, with_stats=router_stats)
            if stats is not None:
                all_stats.append(stats)
        num_main_stats = len(all_stats)
        if delta_BTD is None:
            normed_BTD = self.model.norm(x_BTD)
        else:
            x_BTD, normed_BTD = self.model.norm.add_forward(x_BTD, delta_BTD)
        logits = self.lm_head(normed_BTD[:, -1:] if last_logits_only else normed_BTD)

        zero = logits.new_zeros((), dtype=torch.float32)
        lm_loss = mtp_loss = zero
        mtp_losses: list[torch.Tensor] = []
        if targets is not None:
            lm_loss = self._loss_fn(logits, targets)
            if self.mtp and cache is None:
                chain_BT = targets if mtp_boundary_BT is None else targets.masked_fill(mtp_boundary_BT, IGNORE_INDEX)
                mtp_losses = self._mtp_losses(x_BTD, input_ids_BT, chain_BT, cos, sin, mask, all_stats)
                mtp_loss = torch.stack(mtp_losses).mean()
        if with_losses:
            seq_aux = sum((s.seq_aux_loss for s in all_stats), zero)
            z = sum((s.z_loss for s in all_stats), zero)
            lb = sum((s.lb_loss for s in all_stats), zero)
        else:  # every block's are zeros (DeepSeekMoE._stats): no sums (3 adds a MoE layer in each decode step)
            seq_aux = z = lb = zero
        loss = None
        terms = {}
        if targets is not None:
            loss = lm_loss + cfg.mtp_loss_weight * mtp_loss + seq_aux + z + lb
            terms = {"lm_loss": lm_loss, "mtp_losses": mtp_losses, "balance_loss": seq_aux + z + lb}
        elif with_losses:  # e.g. a reward model or DPO: no LM targets, balancing losses still wanted
            terms = {"balance_loss": seq_aux + z + lb}
        aux = {"lm_loss": lm_loss.detach(), "mtp_loss": mtp_loss.detach(), "seq_aux_loss": seq_aux.detach(),
               "z_loss": z.detach(), "lb_loss": lb.detach()}
        if router_stats:
            aux.update(self._router_stats(all_stats))
        if return_router_choices:
            aux["router_choices"] = (torch.stack([s.topk_idx_BTK for s in all_stats[:num_main_stats]])
                                     if num_main_stats else None)
        return ModelOutput(logits, loss, aux, normed_BTD if return_hidden else None, terms)

    def _embed(self, ids_BT: torch.Tensor) -> torch.Tensor:
        if self.capture_safe_embedding and ids_BT.is_cuda:
            from .kernels.graph_step import sync_free_embedding

            return sync_free_embedding(ids_BT, self.model.embed_tokens.weight)
        return self.model.embed_tokens(ids_BT)

    def _mtp_losses(self, h_BTD, input_ids_BT, targets_BT, cos, sin, mask, all_stats) -> list[torch.Tensor]:
        """Mean CE of each MTP depth (attached), in depth order."""
        losses = []
        for j, module in enumerate(self.mtp):
            depth = j + 1
            emb_BTD = self._embed(shift_left(input_ids_BT, depth, 0))
            depth_targets_BT = mtp_targets(targets_BT, depth)
            # at depth d the last d positions see a padded input token and chains across a document
            # boundary have no target: they must not feed the MTP router's balancing-bias update,
            # MaxVio, entropy or balancing losses
            h_BTD, normed_BTD, stats = module(h_BTD, emb_BTD, cos, sin, mask, depth_targets_BT != IGNORE_INDEX)
            if stats is not None:
                all_stats.append(stats)
            losses.append(self._loss_fn(self.lm_head(normed_BTD), depth_targets_BT))
        return losses

    def _router_stats(self, all_stats: list[MoEStats]) -> dict:
        if not all_stats:
            dev = self.lm_head.weight.device
            empty = torch.zeros(0, device=dev)
            return {"tokens_per_expert": torch.zeros(0, self.cfg.num_routed_experts, device=dev),
                    "maxvio": empty, "router_entropy": empty}
        return {"tokens_per_expert": torch.stack([s.tokens_per_expert_E for s in all_stats]),
                "maxvio": torch.stack([s.maxvio for s in all_stats]),
                "router_entropy": torch.stack([s.router_entropy for s in all_stats])}


def _cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean CE over targets != -100 in fp32; 0 (not NaN) when every target is ignored."""
    flat_targets = targets_BT.reshape(-1)
    total = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), flat_targets,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (flat_targets != IGNORE_INDEX).sum().clamp_min(1)


def set_activation_checkpointing(model: MoETransformer, policy: str = "full",
                                 layers: list[int] | None = None) -> MoETransformer:
    """Checkpoint decoder blocks (and MTP blocks) with ``policy`` (see AC_POLICIES); ``layers``
    picks main-layer indices (default: all; MTP blocks follow the default). Call before
    ``compile_blocks`` or after: the policy is read at trace time, so set it before the first step."""
    if policy not in AC_POLICIES:
        raise ValueError(f"activation checkpointing policy {policy!r}: expected one of {AC_POLICIES}")
    blocks = list(model.model.layers)
    chosen = range(len(blocks)) if layers is None else layers
    for i in chosen:
        if not 0 <= i < len(blocks):
            raise ValueError(f"activation checkpointing: layer {i} out of range 0..{len(blocks) - 1}")
        blocks[i].checkpoint_policy = policy
    if layers is None:
        for module in model.mtp:
            module.block.checkpoint_policy = policy
    return model


def compile_blocks(model: MoETransformer, **compile_kwargs) -> MoETransformer:
    """torch.compile each decoder block (and MTP module) in place, plus the fp32 cross-entropy
    (fuses the upcast of the (B·T, V) logits). Parameter names and state_dict keys are unchanged."""
    for layer in model.model.layers:
        layer.compile(**compile_kwargs)
    for module in model.mtp:
        module.compile(**compile_kwargs)
    model._loss_fn = torch.compile(_cross_entropy, **compile_kwargs)
    return model
