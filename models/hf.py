"""Hugging Face ``DeepseekV3ForCausalLM`` interop: ``export_hf`` / ``import_hf`` (the state-dict adapter).

``export_hf(model, dir)`` writes ``config.json`` (model_type ``deepseek_v3``), ``generation_config.json``
and ``model.safetensors`` (sharded with an index above ``max_shard_bytes``); given the tokenizer and a
``ModelCardInfo`` it also writes the tokenizer files (``hf_tokenizer.py``) and ``README.md``
(``model_card.py``), so the folder is a complete Hugging Face model. Tensors are in the layout of the
DeepSeek-V3 checkpoints on the Hub, which is also what transformers 5.x ``save_pretrained`` writes:
routed experts one module per expert. transformers 5.x stacks them itself on load (its
``qwen2_moe`` conversion: ``experts.*.{gate,up}_proj`` → ``experts.gate_up_proj`` (E, 2F, D), gate
rows first; ``experts.*.down_proj`` → ``experts.down_proj`` (E, D, F)) — exactly our stacked layout.

Key map (ours → HF; every other key is identical, ``model.`` prefix included):

    model.layers.{i}.mlp.experts.gate_up_proj (E, 2F, D)  → model.layers.{i}.mlp.experts.{e}.gate_proj.weight = [e, :F]
                                                             model.layers.{i}.mlp.experts.{e}.up_proj.weight   = [e, F:]
    model.layers.{i}.mlp.experts.down_proj (E, D, F)      → model.layers.{i}.mlp.experts.{e}.down_proj.weight = [e]
    mtp.{j}.block.{rest}                                  → model.layers.{L+j}.{rest}  (same expert rule)
    mtp.{j}.{enorm,hnorm,eh_proj}.weight                  → model.layers.{L+j}.{enorm,hnorm,eh_proj}.weight
    mtp.{j}.norm.weight                                   → model.layers.{L+j}.shared_head.norm.weight
    (shared with the main model)                          → model.layers.{L+j}.embed_tokens.weight = model.embed_tokens.weight
                                                             model.layers.{L+j}.shared_head.head.weight = lm_head.weight
    lm_head.weight                                        → lm_head.weight (omitted when embeddings are tied)
    ``mlp.gate.e_score_correction_bias`` is our aux-loss-free bias, kept in fp32 (HF keeps it fp32 too).

MTP modules use DeepSeek-V3's own layout (extra layer indices after the main ones,
``num_nextn_predict_layers`` = depth). DeepSeek-V3's checkpoints give every MTP layer its own copy of the
embedding and the output head, and loaders of that layout (vLLM's MTP speculative decoder, DeepSeek's
``convert.py``) expect them there, so the export writes the shared tensors into each MTP layer too
(2 × vocab × hidden per depth); ``import_hf`` reads the main model's copies and ignores these. ``DeepseekV3ForCausalLM`` does not run them: it loads the main
model and reports those keys as unexpected; ``import_hf`` reads them back.

Refused on export (no HF equivalent, so the loaded model would compute something else):
softmax routing, forced-balanced routing, dense twins whose dense layers have two widths.
Refused on import: FP8 block-quantised checkpoints, biases on attention, activations other
than SiLU, num_key_value_heads != num_attention_heads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from .chat import stop_ids as stop_ids_of
from .checkpoint_io import DEFAULT_MAX_SHARD_BYTES, load_state_dict, save_state_dict
from .config import ModelConfig
from .hf_tokenizer import write_tokenizer_files
from .layers import RotaryEmbedding
from .model_card import ModelCardInfo, render_model_card
from .tokenizer import Tokenizer
from .transformer import MoETransformer


log = logging.getLogger(__name__)


class HFConversionError(ValueError):
    """A model or checkpoint feature that has no counterpart on the other side."""


_EXPERTS_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_HF_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_HF_STACKED_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_MTP_RE = re.compile(r"^mtp\.(?P<j>\d+)\.(?P<rest>.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(?P<i>\d+)\.(?P<rest>.+)$")
# Keys some HF/DeepSeek checkpoints carry that we do not need (recomputed or shared with the main model).
_IGNORABLE_HF = re.compile(r"(rotary_emb\.inv_freq$|\.shared_head\.head\.weight$|^model\.layers\.\d+\.embed_tokens\.weight$)")


# ============================================================================ config

def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32, *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 include_mtp: bool = True) -> dict:
    """The ``config.json`` dict of ``DeepseekV3Config``; raises HFConversionError where HF has no equivalent."""
    check_exportable(cfg)
    widths = {cfg.dense_width(i) for i in range(cfg.num_layers) if not cfg.is_moe_layer[i]}
    intermediate = widths.pop() if widths else cfg.dense_intermediate_size
    first_dense = cfg.first_k_dense if cfg.num_moe_layers else cfg.num_layers
    dtype_name = str(dtype).removeprefix("torch.")
    rope_parameters = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    legacy_scaling = None
    if cfg.rope_scaling is not None:
        extra = {k: v for k, v in cfg.rope_scaling.items() if k not in ("type", "rope_type")}
        rope_parameters = {"rope_type": "yarn", "rope_theta": float(cfg.rope_theta), **extra}
        legacy_scaling = {"type": "yarn", **extra}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": intermediate,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "n_shared_experts": cfg.num_shared_experts,
        "n_routed_experts": cfg.num_routed_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "routed_scaling_factor": float(cfg.route_scale),
        "norm_topk_prob": bool(cfg.norm_topk_prob),
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "first_k_dense_replace": first_dense,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        # transformers >= 5 reads rope_parameters; older readers (and vLLM) read rope_theta / rope_scaling.
        "rope_parameters": rope_parameters,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": legacy_scaling,
        "rope_interleave": True,
        "num_nextn_predict_layers": cfg.mtp_depth if include_mtp else 0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def check_exportable(cfg: ModelConfig) -> None:
    if cfg.num_moe_layers and cfg.score_func != "sigmoid":
        raise HFConversionError(
            f"cannot export score_func={cfg.score_func!r}: transformers' DeepseekV3 router always uses sigmoid "
            "scores, so the exported model would route differently")
    if cfg.num_moe_layers and cfg.force_balanced_routing:
        raise HFConversionError("cannot export force_balanced_routing=True (a benchmark mode with no HF equivalent)")
    widths = {cfg.dense_width(i) for i in range(cfg.num_layers) if not cfg.is_moe_layer[i]}
    if len(widths) > 1:
        raise HFConversionError(
            f"cannot export dense layers of different widths {sorted(widths)} (a dense twin with "
            "first_k_dense > 0): DeepseekV3Config has a single intermediate_size")


def config_from_hf(d: dict, has_mtp_weights: bool = True) -> ModelConfig:
    """ModelConfig from a DeepseekV3 ``config.json`` dict; raises HFConversionError on unsupported fields."""
    if d.get("model_type") not in ("deepseek_v3", None):
        raise HFConversionError(f"model_type {d.get('model_type')!r} is not 'deepseek_v3'")
    if d.get("hidden_act", "silu") != "silu":
        raise HFConversionError(f"hidden_act {d['hidden_act']!r} unsupported (only silu)")
    if d.get("attention_bias"):
        raise HFConversionError("attention_bias=True unsupported (MLA projections have no bias here)")
    heads = d["num_attention_heads"]
    if d.get("num_key_value_heads") not in (None, heads):
        raise HFConversionError(f"num_key_value_heads={d['num_key_value_heads']} != num_attention_heads={heads}")
    if d.get("quantization_config"):
        raise HFConversionError("quantised checkpoints (quantization_config) are not supported; dequantise first")
    rope = d.get("rope_parameters") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "yarn":
            raise HFConversionError(f"rope scaling type {kind!r} unsupported (only yarn)")
        scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta")}
    num_layers = d["num_hidden_layers"]
    first_dense = d.get("first_k_dense_replace") or 0
    routed = d.get("n_routed_experts") or 0
    if first_dense >= num_layers:
        routed = 0  # an all-dense model
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=num_layers,
        first_k_dense=min(first_dense, num_layers), dense_intermediate_size=d["intermediate_size"],
        num_heads=heads, q_lora_rank=d.get("q_lora_rank") or 0, kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"],
        num_routed_experts=routed,
        num_experts_per_tok=d.get("num_experts_per_tok") or 1 if routed else 0,
        moe_intermediate_size=d.get("moe_intermediate_size") or 0,
        num_shared_experts=d.get("n_shared_experts") or 0 if routed else 0,
        n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1, score_func="sigmoid",
        route_scale=float(d.get("routed_scaling_factor", 1.0)), norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        rope_theta=float(theta), rope_scaling=scaling, max_seq_len=d.get("max_position_embeddings", 4096),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        mtp_depth=(d.get("num_nextn_predict_layers") or 0) if has_mtp_weights else 0,
        init_std=float(d.get("initializer_range", 0.02)), balancing="aux_free",
        notes={"imported_from": "hf"},
    )


# ============================================================================ state dict

def _hf_name(key: str, num_layers: int) -> str:
    """1:1 rename of one of our keys (expert tensors are split separately)."""
    m = _MTP_RE.match(key)
    if m is None:
        return key
    layer, rest = num_layers + int(m["j"]), m["rest"]
    if rest.startswith("block."):
        return f"model.layers.{layer}.{rest[len('block.'):]}"
    if rest == "norm.weight":
        return f"model.layers.{layer}.shared_head.norm.weight"
    return f"model.layers.{layer}.{rest}"


def _our_name(hf_key: str, num_layers: int) -> str:
    m = _HF_LAYER_RE.match(hf_key)
    if m is None or int(m["i"]) < num_layers:
        return hf_key
    j, rest = int(m["i"]) - num_layers, m["rest"]
    if rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
        return f"mtp.{j}.{rest}"
    if rest == "shared_head.norm.weight":
        return f"mtp.{j}.norm.weight"
    return f"mtp.{j}.block.{rest}"


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype | None = None,
                     include_mtp: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict → HF checkpoint tensors (per-expert layout). Floating tensors cast to ``dtype``
    except the routing bias (fp32)."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor, keep_fp32: bool = False) -> None:
        if dtype is not None and t.is_floating_point() and not keep_fp32:
            t = t.to(dtype)
        out[name] = t

    for key, t in state_dict.items():
        if key.startswith("rotary.") or (key == "lm_head.weight" and cfg.tie_embeddings):
            continue
        if key.startswith("mtp.") and not include_mtp:
            continue
        if key.endswith("e_score_correction_bias"):
            bias = t.float() if cfg.balancing == "aux_free" else torch.zeros_like(t, dtype=torch.float32)
            put(_hf_name(key, cfg.num_layers), bias, keep_fp32=True)
            continue
        m = _EXPERTS_RE.match(key)
        if m is None:
            put(_hf_name(key, cfg.num_layers), t)
            continue
        prefix = _hf_name(m["prefix"], cfg.num_layers)
        F_ = cfg.moe_intermediate_size
        for e in range(t.shape[0]):
            if m["proj"] == "gate_up_proj":
                put(f"{prefix}.{e}.gate_proj.weight", t[e, :F_])
                put(f"{prefix}.{e}.up_proj.weight", t[e, F_:])
            else:
                put(f"{prefix}.{e}.down_proj.weight", t[e])
    if include_mtp and cfg.mtp_depth:
        embed = state_dict["model.embed_tokens.weight"]
        head = embed if cfg.tie_embeddings else state_dict["lm_head.weight"]
        for j in range(cfg.mtp_depth):
            put(f"model.layers.{cfg.num_layers + j}.embed_tokens.weight", embed)
            put(f"model.layers.{cfg.num_layers + j}.shared_head.head.weight", head)
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF checkpoint tensors (per-expert or stacked experts) → our state dict keys."""
    fp8 = [k for k in hf if k.endswith("weight_scale_inv")]
    if fp8:
        raise HFConversionError(f"FP8 block-quantised checkpoint ({fp8[0]} ...) is not supported; dequantise first")
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    max_layer = cfg.num_layers + cfg.mtp_depth
    for key, t in hf.items():
        if _IGNORABLE_HF.search(key):
            continue
        lm = _HF_LAYER_RE.match(key)
        if lm is not None and int(lm["i"]) >= max_layer:
            continue  # MTP layers of a checkpoint imported without MTP
        m = _HF_EXPERT_RE.match(key)
        if m is not None:
            per_expert.setdefault(m["prefix"], {}).setdefault(m["proj"], {})[int(m["e"])] = t
            continue
        s = _HF_STACKED_RE.match(key)
        if s is not None:  # a checkpoint that already stores stacked experts (E, 2F, D) / (E, D, F)
            out[f"{_our_name(s['prefix'], cfg.num_layers)}.{s['proj']}"] = t
            continue
        out[_our_name(key, cfg.num_layers)] = t
    E = cfg.num_routed_experts
    for prefix, projs in per_expert.items():
        ours = _our_name(prefix, cfg.num_layers)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got = sorted(projs.get(proj, {}))
            if got != list(range(E)):
                raise HFConversionError(f"{prefix}: {proj} experts {got[:8]}{'...' if len(got) > 8 else ''} "
                                        f"present, expected 0..{E - 1}")
        gate = torch.stack([projs["gate_proj"][e] for e in range(E)])
        up = torch.stack([projs["up_proj"][e] for e in range(E)])
        out[f"{ours}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{ours}.down_proj"] = torch.stack([projs["down_proj"][e] for e in range(E)])
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


# ============================================================================ public API

def export_hf(model: MoETransformer, directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, include_mtp: bool = True,
              bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None, tokenizer: Tokenizer | str | os.PathLike | None = None,
              card: ModelCardInfo | None = None) -> Path:
    """Write ``model`` as a transformers ``DeepseekV3ForCausalLM`` directory; returns its path.

    dtype: tensor dtype on disk (default: the model's); the routing bias stays fp32.
    include_mtp: keep MTP modules (DeepSeek layout, ignored by ``DeepseekV3ForCausalLM``).
    tokenizer: a Tokenizer or a ``tokenizer.json`` path; with it the folder is complete for
        ``AutoTokenizer`` (``hf_tokenizer.py``: config, special tokens, chat template), the token
        ids default to the tokenizer's, and generation also stops at the end of an assistant turn.
        A file that is not a moeflow tokenizer (a user's own, without the chat markers) is copied
        as it is, with a warning.
    card: what ``README.md`` (the model card) says beyond ``config.json``; no README without it.
    """
    cfg = model.cfg
    dtype = dtype or model.lm_head.weight.dtype
    stop_ids: list[int] = []
    foreign_tokenizer = None
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        try:
            tokenizer = Tokenizer.from_file(tokenizer)
        except Exception as err:  # not ours (no chat markers, or not a tokenizers file): ship it as it is
            log.warning("%s is not a moeflow tokenizer (%s): copied as is, without chat template or "
                        "special-token files", tokenizer, str(err).splitlines()[0][:200])
            foreign_tokenizer, tokenizer = Path(tokenizer), None
    if tokenizer is not None:
        if tokenizer.vocab_size > cfg.vocab_size:
            raise HFConversionError(f"tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary "
                                    f"only {cfg.vocab_size}")
        bos_token_id = tokenizer.bos_id if bos_token_id is None else bos_token_id
        eos_token_id = tokenizer.eos_id if eos_token_id is None else eos_token_id
        pad_token_id = tokenizer.pad_id if pad_token_id is None else pad_token_id
        stop_ids = [i for i in stop_ids_of(tokenizer) if i != eos_token_id]
    hf_cfg = config_to_hf(cfg, dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id, include_mtp=include_mtp)
    tensors = to_hf_state_dict(model.state_dict(), cfg, dtype, include_mtp=include_mtp)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(tensors, out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    gen = {k: v for k, v in (("bos_token_id", bos_token_id),
                             ("eos_token_id", [eos_token_id, *stop_ids] if stop_ids else eos_token_id),
                             ("pad_token_id", pad_token_id)) if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
    (out / "moeflow_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str))
    if tokenizer is not None:
        write_tokenizer_files(out, tokenizer, model_max_length=cfg.max_seq_len)
    elif foreign_tokenizer is not None:
        shutil.copy(foreign_tokenizer, out / "tokenizer.json")
    if card is not None:
        (out / "README.md").write_text(render_model_card(card, hf_cfg), encoding="utf-8")
    return out


def import_hf(directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
              device: str | torch.device = "cpu", include_mtp: bool = True) -> MoETransformer:
    """Read a DeepseekV3 directory (ours or one saved by transformers) into a MoETransformer.

    dtype: parameter dtype (default: the checkpoint's embedding dtype); the routing bias stays fp32.
    The training-only fields (balancing weights, MTP loss weight) are restored from our
    ``moeflow_config.json`` when present, else take ModelConfig defaults.
    """
    d = Path(directory)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d}: no config.json (not a Hugging Face model directory)")
    hf_cfg = json.loads((d / "config.json").read_text())
    hf = load_state_dict(d)
    L = hf_cfg["num_hidden_layers"]
    has_mtp = include_mtp and any((m := _HF_LAYER_RE.match(k)) and int(m["i"]) >= L for k in hf)
    cfg = config_from_hf(hf_cfg, has_mtp_weights=has_mtp)
    cfg = _restore_training_fields(cfg, d)
    ours = from_hf_state_dict(hf, cfg)
    dtype = dtype or ours["model.embed_tokens.weight"].dtype
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    expected = {k for k in model.state_dict() if not k.startswith("rotary.")}
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(ours)), sorted(set(ours) - expected)
    if missing or unexpected:
        raise HFConversionError(f"{d}: checkpoint does not match the config: missing {missing[:10]}, "
                                f"unexpected {unexpected[:10]}")
    for key, p in model.state_dict().items():
        if key in ours:
            src = ours[key]
            if src.shape != p.shape:
                raise HFConversionError(f"{d}: {key} has shape {tuple(src.shape)}, model expects {tuple(p.shape)}")
            p.copy_(src)  # state_dict tensors share storage with the parameters / buffers
    model.rotary = RotaryEmbedding(cfg).to(device)  # non-persistent table: recompute, to_empty left garbage
    return model


def _restore_training_fields(cfg: ModelConfig, d: Path) -> ModelConfig:
    path = d / "moeflow_config.json"
    if not path.exists():
        return cfg
    saved = json.loads(path.read_text())
    keep = ("balancing", "bias_update_gamma", "seq_aux_alpha", "z_loss_weight", "lb_loss_weight",
            "mtp_loss_weight", "notes")
    return cfg.replace(**{k: saved[k] for k in keep if k in saved})
