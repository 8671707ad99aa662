"""ModelConfig: every knob of the DeepSeek-V3-family MoE transformer, its presets and its arithmetic.

The config sits beside the model (STYLE.md §5). Derived quantities (parameter counts, FLOPs per
token, the dense twin) are computed here, in one place, from the top-level fields, so that
benchmarks, the training loop and the HF exporter agree on them.

Field ↔ Hugging Face ``DeepseekV3Config`` (transformers 5.x) mapping, used by ``models/hf.py``:

    vocab_size               vocab_size
    hidden_size              hidden_size
    num_layers               num_hidden_layers
    first_k_dense            first_k_dense_replace
    dense_intermediate_size  intermediate_size
    num_heads                num_attention_heads (= num_key_value_heads)
    q_lora_rank (0 = none)   q_lora_rank (None = none)
    kv_lora_rank             kv_lora_rank
    qk_nope_head_dim         qk_nope_head_dim
    qk_rope_head_dim         qk_rope_head_dim
    v_head_dim               v_head_dim
    num_routed_experts       n_routed_experts
    num_experts_per_tok      num_experts_per_tok
    moe_intermediate_size    moe_intermediate_size
    num_shared_experts       n_shared_experts
    n_group / topk_group     n_group / topk_group
    score_func               (HF is always "sigmoid"; "softmax" has no HF equivalent)
    route_scale              routed_scaling_factor
    norm_topk_prob           norm_topk_prob
    rope_theta               rope_parameters["rope_theta"]
    rope_scaling (YaRN)      rope_parameters = {"rope_type": "yarn", "factor", "original_max_position_embeddings",
                             "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "rope_theta"}
    max_seq_len              max_position_embeddings
    tie_embeddings           tie_word_embeddings
    rms_norm_eps             rms_norm_eps
    mtp_depth                num_nextn_predict_layers (HF ignores the MTP weights)
    init_std                 initializer_range
    (always)                 rope_interleave = True, hidden_act = "silu", attention_bias = False

The balancing fields (balancing, bias_update_gamma, seq_aux_alpha, z_loss_weight, lb_loss_weight),
mtp_loss_weight and force_balanced_routing are training-only and have no HF counterpart.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

_SCORE_FUNCS = ("sigmoid", "softmax")
_BALANCING = ("aux_free", "none")


@dataclass(frozen=True)
class ModelConfig:
    # sizes
    vocab_size: int = 32768
    hidden_size: int = 1024
    num_layers: int = 8
    first_k_dense: int = 1
    dense_intermediate_size: int = 2816
    # Multi-head Latent Attention
    num_heads: int = 16
    q_lora_rank: int = 0
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    # DeepSeekMoE
    num_routed_experts: int = 64
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 512
    num_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    norm_topk_prob: bool = True
    # positions
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    # misc
    tie_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    # multi-token prediction
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    # load balancing
    balancing: str = "aux_free"
    bias_update_gamma: float = 1e-3
    seq_aux_alpha: float = 1e-4
    z_loss_weight: float = 0.0
    lb_loss_weight: float = 0.0
    force_balanced_routing: bool = False
    # dense twin only: width of the layers that are MoE in the original (0 = not a twin)
    twin_intermediate_size: int = 0
    # init
    init_std: float = 0.02
    # free-form provenance (e.g. which preset this came from); not used by the model
    notes: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise bad(name, "must be > 0")
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise bad("first_k_dense", f"must be in [0, num_layers={self.num_layers}]")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.q_lora_rank < 0:
            raise bad("q_lora_rank", "must be >= 0 (0 = plain q_proj)")
        if self.score_func not in _SCORE_FUNCS:
            raise bad("score_func", f"must be one of {_SCORE_FUNCS}")
        if self.balancing not in _BALANCING:
            raise bad("balancing", f"must be one of {_BALANCING}")
        if self.num_moe_layers:
            if self.num_routed_experts <= 0:
                raise bad("num_routed_experts", "MoE layers need routed experts (or first_k_dense=num_layers)")
            if not 0 < self.num_experts_per_tok <= self.num_routed_experts:
                raise bad("num_experts_per_tok", f"must be in [1, num_routed_experts={self.num_routed_experts}]")
            if self.n_group <= 0 or self.num_routed_experts % self.n_group:
                raise bad("n_group", f"must divide num_routed_experts={self.num_routed_experts}")
            if not 0 < self.topk_group <= self.n_group:
                raise bad("topk_group", f"must be in [1, n_group={self.n_group}]")
            if self.topk_group * (self.num_routed_experts // self.n_group) < self.num_experts_per_tok:
                raise bad("topk_group", "the kept groups hold fewer experts than num_experts_per_tok")
        if self.num_routed_experts == 0 and self.first_k_dense < self.num_layers and not self.twin_intermediate_size:
            raise bad("num_routed_experts", "0 routed experts needs first_k_dense=num_layers or a dense twin width")
        if self.first_k_dense and self.dense_intermediate_size <= 0:
            raise bad("dense_intermediate_size", "dense layers need a positive width")
        if self.mtp_depth < 0:
            raise bad("mtp_depth", "must be >= 0")
        if self.rope_scaling is not None:
            missing = {"factor", "original_max_position_embeddings"} - set(self.rope_scaling)
            if missing:
                raise bad("rope_scaling", f"YaRN dict misses {sorted(missing)}")

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense if self.num_routed_experts > 0 else 0

    @property
    def is_moe_layer(self) -> list[bool]:
        return [i >= self.first_k_dense and self.num_routed_experts > 0 for i in range(self.num_layers)]

    @property
    def kv_cache_values_per_token(self) -> int:
        """Values cached per token per layer by the absorbed MLA path."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, times YaRN mscale(factor, mscale_all_dim)^2 as in HF/DeepSeek."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    # ------------------------------------------------------------------ construction helpers
    def replace(self, **changes: Any) -> "ModelConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"ModelConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["rope_scaling"] is not None:
            out["rope_scaling"] = dict(out["rope_scaling"])
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return strict_from_dict(cls, d)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in _PRESETS:
            raise ValueError(f"unknown ModelConfig preset {name!r}; known: {sorted(_PRESETS)}")
        return cls(**_PRESETS[name], notes={"preset": name})

    def dense_twin(self) -> "ModelConfig":
        """Same active parameters per token, no routed experts.

        Every MoE layer becomes a dense SwiGLU of width (k + shared) × moe width (stored in
        ``twin_intermediate_size``); the first_k_dense layers keep their width. Only the router
        (E × D per MoE layer, ≈0.04 % of active params in bench_ref) has no counterpart.
        """
        if self.num_moe_layers == 0:
            return self
        width = (self.num_experts_per_tok + self.num_shared_experts) * self.moe_intermediate_size
        return self.replace(num_routed_experts=0, num_shared_experts=0, twin_intermediate_size=width,
                            notes={**self.notes, "dense_twin_of": self.notes.get("preset")})

    def dense_width(self, layer: int) -> int:
        """SwiGLU width of a dense layer (layers past first_k_dense are dense only in a dense twin)."""
        if layer < self.first_k_dense or not self.twin_intermediate_size:
            return self.dense_intermediate_size
        return self.twin_intermediate_size

    # ------------------------------------------------------------------ arithmetic
    def _attn_params(self) -> int:
        d, h = self.hidden_size, self.num_heads
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            q = d * h * self.qk_head_dim
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * d

    def _layer_params(self, moe: bool, active: bool, dense_width: int | None = None) -> int:
        d = self.hidden_size
        norms = 2 * d
        if not moe:
            return self._attn_params() + norms + 3 * d * (dense_width or self.dense_intermediate_size)
        expert = 3 * d * self.moe_intermediate_size
        n_routed = self.num_experts_per_tok if active else self.num_routed_experts
        routed = n_routed * expert + self.num_routed_experts * d  # router weight
        shared = self.num_shared_experts * expert
        return self._attn_params() + norms + routed + shared

    def num_params(self, active: bool = False, embedding: bool = True) -> int:
        """Parameter count (buffers excluded).

        active=True counts only the routed experts a token uses (k of E) — the "active" size.
        embedding=False drops the input embedding table; the LM head always counts (it is a
        matmul per token). With tied embeddings the one matrix counts as the head when
        embedding=False and once in total otherwise. MTP modules are included when mtp_depth>0.
        """
        d, v = self.hidden_size, self.vocab_size
        total = sum(self._layer_params(moe, active, self.dense_width(i))
                    for i, moe in enumerate(self.is_moe_layer))
        total += d  # final norm
        total += v * d  # LM head (or the tied embedding, counted here once)
        if embedding and not self.tie_embeddings:
            total += v * d
        total += self.mtp_depth * self._mtp_params(active)
        return total

    def _mtp_params(self, active: bool) -> int:
        d = self.hidden_size
        moe = self.num_moe_layers > 0
        block = self._layer_params(moe, active, self.dense_width(self.num_layers - 1))
        return block + 2 * d + 2 * d * d + d  # enorm, hnorm, eh_proj, own final norm

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """BENCHMARKS.md MFU numerator per token: 6 × active non-embedding params + causal attention.

        Causal attention (QKᵀ and AV) per token per layer, forward: H·(d_qk + d_v)·S (the average
        query sees S/2 keys; 2 flops per multiply-add). Training (fwd + bwd) is 3× forward, so
        3·L·H·(d_qk + d_v)·S. With training=False the total is divided by 3 (forward only).
        Each MTP depth applies the shared LM head once more (V·D multiply-adds per token), which a
        parameter count sees only once: it is added per depth. Checked against torch's
        FlopCounterMode on the executed matmuls (tests/test_train_flops.py).
        """
        n_attn_layers = self.num_layers + self.mtp_depth
        attn = 3.0 * n_attn_layers * self.num_heads * (self.qk_head_dim + self.v_head_dim) * seq_len
        head_reuse = self.mtp_depth * self.vocab_size * self.hidden_size
        total = 6.0 * (self.num_params(active=True, embedding=False) + head_reuse) + attn
        return total if training else total / 3.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


_PRESETS: dict[str, dict] = {
    # CPU, seconds. Callers usually set vocab_size to their tokenizer's via replace().
    "tiny": dict(
        vocab_size=1024, hidden_size=64, num_layers=3, first_k_dense=1, dense_intermediate_size=128,
        num_heads=4, q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        num_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, num_shared_experts=1,
        n_group=1, topk_group=1, route_scale=1.0, max_seq_len=256, init_std=0.02,
    ),
    # Exactly BENCHMARKS.md: ≈819 M parameters, ≈147 M active non-embedding (LM head included).
    "bench_ref": dict(
        vocab_size=32768, hidden_size=1024, num_layers=8, first_k_dense=1, dense_intermediate_size=2816,
        num_heads=16, q_lora_rank=0, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        num_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=512, num_shared_experts=1,
        n_group=1, topk_group=1, route_scale=1.0, max_seq_len=2048,
    ),
    # ≈1 GPU-hour on an H100 (~0.7 B tokens at ~200 k tok/s): 12 layers, 32 experts top-4.
    "small": dict(
        vocab_size=32768, hidden_size=768, num_layers=12, first_k_dense=1, dense_intermediate_size=2048,
        num_heads=12, q_lora_rank=0, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        num_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=384, num_shared_experts=1,
        n_group=1, topk_group=1, route_scale=1.0, max_seq_len=2048,
    ),
}


def strict_from_dict(cls, data: dict | None, required: tuple[str, ...] = ()):
    """``cls(**data)`` for a config dataclass, refusing unknown or missing fields by name.

    Configs arrive from YAML recipes, JSON files and Prefect forms: a typo must fail loudly
    instead of being dropped.
    """
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    missing = sorted(set(required) - set(data))
    if missing:
        raise ValueError(f"{cls.__name__}: missing field(s) {missing}")
    return cls(**data)
