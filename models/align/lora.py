"""LoRA for the MoE transformer: attention and dense projections AND the routed experts' 3-D weights.

``apply_lora(model, LoRAConfig(...))`` freezes the base model and adds low-rank updates
ΔW = (α / r) · B A with B = 0 at the start (so the adapted model starts as the base model):

* ``nn.Linear`` targets (attention ``q_proj``/``q_a_proj``/``q_b_proj``/``kv_a_proj_with_mqa``/
  ``kv_b_proj``/``o_proj``; the dense FFN's and the shared experts' ``gate_proj``/``up_proj``/
  ``down_proj``) become ``LoRALinear``: the same module class hierarchy (a subclass of nn.Linear
  keeping the same ``weight`` tensor, so its key stays ``...q_proj.weight``) plus ``lora_A`` (r, in),
  ``lora_B`` (out, r) and input dropout: y = x Wᵀ + (α/r) · dropout(x) Aᵀ Bᵀ.
* The routed experts' stacked weights ``experts.gate_up_proj`` (E, 2F, D) and ``experts.down_proj``
  (E, D, F) get one adapter PER EXPERT through ``torch.nn.utils.parametrize``: the tensor the
  expert kernels read is W + (α/r) · B_e A_e for every e (A (E, r, in), B (E, out, r)), so
  models/moe.py (its grouped-GEMM and looped paths alike) needs no change. Many tools skip these
  3-D weights silently and adapt only nn.Linear; here they are a first-class target. Dropout is not
  applied to them (it cannot be factored out of a weight update; PEFT refuses it too).

``merge_lora`` folds every update into its base weight and restores plain modules, in place, and
``merged_copy`` builds a new merged model leaving the adapted one as it is (never deep-copy an adapted
model: the copy would share parametrize's per-module classes); then the HF export is the ordinary one; ``lora_state_dict`` holds only the adapters; ``export_peft_adapter``
writes them as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) under the HF
DeepseekV3 module names, which ``peft.PeftModel.from_pretrained`` loads onto our HF export:

* linear targets → ``base_model.model.<name>.lora_{A,B}.weight``;
* routed experts → PEFT ``target_parameters`` (its ParamWrapper): ``lora_A.weight`` (E·r, in) holds
  expert e's A in rows [e·r, (e+1)·r), ``lora_B.weight`` (out, r·E) holds B_e[:, j] at column j·E + e;
  with both expert tensors adapted, ``gate_up_proj`` is the inner wrapper (``experts.base_layer.lora_*``)
  and ``down_proj`` the outer (``experts.lora_*``);
* dense FFN / shared-expert projections → ``modules_to_save`` with the merged weights: PEFT, with
  transformers 5, reads ``gate_proj``/``up_proj``/``down_proj`` in ``target_modules`` as the fused
  routed experts of deepseek_v3 (its v4→v5 conversion), so those can only travel merged.

``freeze_except_last_layers(model, k)`` is the cheaper "train only the last k layers" variant of full
fine-tuning (last k decoder layers, the final norm and the LM head stay trainable).

Shape suffixes: E experts, R rank, I in features, O out features.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
DENSE_TARGETS = ("gate_proj", "up_proj", "down_proj")  # dense FFN layers and the shared experts
EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")  # routed experts, stacked 3-D
ALL_TARGETS = ATTENTION_TARGETS + DENSE_TARGETS + EXPERT_TARGETS
TARGET_GROUPS = {"attention": ATTENTION_TARGETS, "dense": DENSE_TARGETS, "experts": EXPERT_TARGETS,
                 "all": ALL_TARGETS}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)(\.|$)")


@dataclass
class LoRAConfig:
    """What to adapt and how. ``targets`` are names from ALL_TARGETS or groups from TARGET_GROUPS."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all",)
    last_k_layers: int | None = None  # adapt only the last k decoder layers (None: all)
    init_seed: int = 0

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank={self.rank}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout={self.dropout}: must be in [0, 1)")
        self.resolved_targets()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def resolved_targets(self) -> tuple[str, ...]:
        out: list[str] = []
        for t in self.targets:
            names = TARGET_GROUPS.get(t, (t,))
            for n in names:
                if n not in ALL_TARGETS:
                    raise ValueError(f"LoRA target {t!r}: choose from {', '.join(ALL_TARGETS)} or "
                                     f"{', '.join(TARGET_GROUPS)}")
                if n not in out:
                    out.append(n)
        return tuple(out)


# ------------------------------------------------------------------ modules
class LoRALinear(nn.Linear):
    """nn.Linear + a low-rank update; shares the base ``weight`` tensor (frozen)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float, generator: torch.Generator) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        with torch.no_grad():  # kaiming-uniform A as nn.Linear does, B = 0: ΔW = 0 at the start
            bound = 1.0 / math.sqrt(self.in_features)
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
        self.scale = scale
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale
        return F.linear(x, self.weight, self.bias) + lora

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class ExpertLoRA(nn.Module):
    """Parametrization of a stacked expert weight W (E, O, I): W + scale · B_e A_e for every expert e."""

    def __init__(self, weight_EOI: torch.Tensor, rank: int, scale: float, generator: torch.Generator) -> None:
        super().__init__()
        E, O, I = weight_EOI.shape
        self.lora_A = nn.Parameter(torch.empty(E, rank, I, dtype=weight_EOI.dtype, device=weight_EOI.device))
        self.lora_B = nn.Parameter(torch.zeros(E, O, rank, dtype=weight_EOI.dtype, device=weight_EOI.device))
        with torch.no_grad():
            bound = 1.0 / math.sqrt(I)
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
        self.scale = scale

    def delta_weight(self) -> torch.Tensor:
        return torch.bmm(self.lora_B, self.lora_A) * self.scale  # (E, O, I)

    def forward(self, weight_EOI: torch.Tensor) -> torch.Tensor:
        return weight_EOI + self.delta_weight().to(weight_EOI.dtype)


# ------------------------------------------------------------------ applying, merging
def _layer_index(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _selected(name: str, cfg: LoRAConfig, num_layers: int) -> bool:
    if _layer_index(name) is None:
        return False  # MTP blocks, embeddings, head: not adapted
    if cfg.last_k_layers is not None:
        return _layer_index(name) >= num_layers - cfg.last_k_layers
    return True


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze ``model`` and add adapters in place; returns the adapted names (HF module/parameter names)."""
    targets = cfg.resolved_targets()
    linear_leaves = {t for t in targets if "." not in t}
    expert_params = [t.split(".")[1] for t in targets if t.startswith("experts.")]
    num_layers = len(model.model.layers)
    gen = torch.Generator().manual_seed(cfg.init_seed)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted: list[str] = []
    for name, module in list(model.named_modules()):
        if not _selected(name, cfg, num_layers):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and leaf in linear_leaves \
                and not name.endswith(".mlp.gate"):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, leaf, LoRALinear(module, cfg.rank, cfg.scale, cfg.dropout, gen))
            adapted.append(name)
        elif leaf == "experts" and hasattr(module, "gate_up_proj"):
            for pname in expert_params:
                if parametrize.is_parametrized(module, pname):
                    continue
                weight = getattr(module, pname)
                parametrize.register_parametrization(module, pname, ExpertLoRA(weight, cfg.rank, cfg.scale, gen),
                                                     unsafe=True)
                module.parametrizations[pname].original.requires_grad_(False)
                adapted.append(f"{name}.{pname}")
    if not adapted:
        raise ValueError(f"apply_lora: no module matched the targets {targets}")
    return adapted


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters only (our names), detached CPU copies."""
    return {n: p.detach().cpu().clone() for n, p in lora_parameters(model).items()}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_parameters(model))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model is a plain MoETransformer again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), leaf, module.merged())
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for pname in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the merged model (plain keys), computed without touching ``model``."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{name}.weight"] = (module.weight + module.delta_weight().to(module.weight.dtype)).detach().clone()
        elif parametrize.is_parametrized(module):
            for pname in module.parametrizations.keys():
                out[f"{name}.{pname}"] = getattr(module, pname).detach().clone()
    for key, value in model.state_dict().items():
        if "lora_" in key or ".parametrizations." in key:
            continue
        out.setdefault(key, value.detach().clone())
    return out


def merged_copy(model: nn.Module) -> nn.Module:
    """A new plain model with the adapters folded in; ``model`` keeps its adapters.

    Not ``merge_lora(copy.deepcopy(model))``: a deep copy shares the class that parametrize creates
    for each adapted module, and removing the parametrization from the copy removes it from that
    class, breaking the original.
    """
    fresh = type(model)(model.cfg).to(next(model.parameters()).device, next(model.parameters()).dtype)
    fresh.load_state_dict(merged_state_dict(model))
    return fresh.train(model.training)


def freeze_except_last_layers(model: nn.Module, k: int) -> list[str]:
    """Full fine-tuning of only the last k decoder layers (+ final norm and LM head); returns trainable names."""
    num_layers = len(model.model.layers)
    if not 1 <= k <= num_layers:
        raise ValueError(f"last_k_layers={k}: must be in [1, {num_layers}]")
    trainable = []
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for name, p in model.named_parameters():
        layer = _layer_index(name)
        keep = (layer is not None and layer >= num_layers - k) or name.startswith(("model.norm.", "lm_head."))
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if tied:  # the head is the embedding table: training it trains the embedding too
        model.lm_head.weight.requires_grad_(True)
    return trainable


# ------------------------------------------------------------------ PEFT export
def _peft_expert_tensors(module_name: str, pnames: list[str], loras: dict[str, ExpertLoRA]) -> dict[str, torch.Tensor]:
    out = {}
    for pname in pnames:
        lora = loras[pname]
        A_ERI, B_EOR = lora.lora_A.detach().float().cpu(), lora.lora_B.detach().float().cpu()
        E, R, I = A_ERI.shape
        # gate_up_proj is PEFT's inner ParamWrapper when both are adapted (it wraps parameters in module order)
        where = "base_layer." if (pname == "gate_up_proj" and len(pnames) == 2) else ""
        prefix = f"base_model.model.{module_name}.{where}"
        out[prefix + "lora_A.weight"] = A_ERI.reshape(E * R, I).contiguous()
        out[prefix + "lora_B.weight"] = B_EOR.permute(1, 2, 0).reshape(B_EOR.shape[1], R * E).contiguous()
    return out


def export_peft_adapter(model: nn.Module, directory: str | Path, cfg: LoRAConfig,
                        base_model_name_or_path: str = "") -> Path:
    """Write the adapters of ``model`` (from ``apply_lora``) as a PEFT LoRA folder; see the module docstring."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    target_modules, target_parameters, modules_to_save = set(), set(), []
    for name, module in model.named_modules():
        if not name.startswith("model.layers."):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, LoRALinear):
            if leaf in DENSE_TARGETS:
                continue  # travels merged, with its parent module (below)
            target_modules.add(leaf)
            tensors[f"base_model.model.{name}.lora_A.weight"] = module.lora_A.detach().float().cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = module.lora_B.detach().float().cpu().contiguous()
        elif leaf == "experts" and parametrize.is_parametrized(module):
            pnames = [p for p in ("gate_up_proj", "down_proj") if parametrize.is_parametrized(module, p)]
            loras = {p: module.parametrizations[p][0] for p in pnames}
            target_parameters.update(f"mlp.experts.{p}" for p in pnames)
            tensors.update(_peft_expert_tensors(name, pnames, loras))
        elif any(isinstance(getattr(module, n, None), LoRALinear) for n in DENSE_TARGETS):
            modules_to_save.append(name)  # e.g. model.layers.0.mlp, model.layers.3.mlp.shared_experts
            for n in DENSE_TARGETS:
                sub = getattr(module, n)
                w = sub.weight + sub.delta_weight() if isinstance(sub, LoRALinear) else sub.weight
                tensors[f"base_model.model.{name}.{n}.weight"] = w.detach().float().cpu().contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(target_modules), "target_parameters": sorted(target_parameters) or None,
        "modules_to_save": modules_to_save or None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


@dataclass
class LoRASummary:
    adapted: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0


def summarize(model: nn.Module, adapted: list[str]) -> LoRASummary:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoRASummary(adapted, trainable, sum(p.numel() for p in model.parameters()))
