"""AdamW with parameter groups: which tensors get weight decay, and the fused kernel on CUDA.

Decay policy (decided here, one place):

* **no decay** on every tensor with fewer than 2 dimensions: RMSNorm gains and any bias
  vector. Shrinking a norm gain towards 0 only rescales activations and fights the norm.
* **no decay** on parameters that do not require grad. The router balancing bias is a
  buffer in our model (no gradient, never in the optimiser); this rule also covers a model
  that registers it as a frozen parameter.
* **decay** on all matrices, including the token embedding, the LM head, the router weight
  and the stacked expert weights ``(E, ...)``. We keep decay on the embedding as nanoGPT/
  nanochat and torchtitan do: with tied embeddings the table *is* the LM head, and leaving
  it undecayed would exempt the output projection too. ``decay_embeddings=False`` is there
  for experiments.

Fused AdamW is used when every parameter lives on CUDA (``fused="auto"``); on CPU the
default for-each implementation keeps CPU runs bit-reproducible across torch builds.

``impl="triton"`` builds ``models/kernels/adamw.TritonAdamW`` instead: torch's AdamW (same groups, same state
dict) whose CUDA step is one Triton launch over all tensors (issue 16); off CUDA it is torch's step, unless
Triton's interpreter is on (tests).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def split_decay_groups(model: nn.Module, decay_embeddings: bool = True) -> tuple[list[str], list[str]]:
    """Names of the parameters (decay, no_decay); shared (tied) parameters appear once."""
    embedding_params = set()
    if not decay_embeddings:
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                embedding_params.add(id(module.weight))
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embedding_params:
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


ADAMW_IMPLS = ("torch", "triton")


def build_adamw(model: nn.Module, *, lr: float, weight_decay: float = 0.1, betas: Iterable[float] = (0.9, 0.95),
                eps: float = 1e-8, fused: str | bool = "auto", decay_embeddings: bool = True,
                impl: str = "torch") -> torch.optim.AdamW:
    """AdamW over two groups; each group carries ``initial_lr`` so schedules can scale it.

    ``impl``: "torch" (torch.optim.AdamW, fused on CUDA per ``fused``) or "triton" (``TritonAdamW``; ``fused``
    is then ignored)."""
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"build_adamw: impl must be one of {ADAMW_IMPLS}, got {impl!r}")
    decay_names, no_decay_names = split_decay_groups(model, decay_embeddings)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay_names], "weight_decay": weight_decay, "name": "decay"},
        {"params": [params[n] for n in no_decay_names], "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("build_adamw: the model has no trainable parameters")
    if impl == "triton":
        from ..kernels.adamw import TritonAdamW

        opt = TritonAdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    else:
        if fused == "auto":
            fused = all(p.is_cuda for g in groups for p in g["params"])
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=bool(fused) or None)
    for group in opt.param_groups:
        group["initial_lr"] = lr
    return opt


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, *, apply: bool = True) -> torch.Tensor:
    """Clip to the global gradient norm; returns the norm before clipping (a plain scalar tensor).
    ``apply=False`` only measures: the caller scales the gradients by ``clip_coefficient`` itself (TritonAdamW
    does it inside its kernel, saving a read and a write of every gradient).

    Gradients may be plain tensors (one process, DDP) or DTensors on different meshes (FSDP2 over
    the world, expert shards on the ``ep`` or ``(dp, ep)`` mesh). torch's ``clip_grad_norm_`` refuses
    such a mix (torch 2.13: "aten._foreach_norm.Scalar got mixed torch.Tensor and DTensor"), and a
    norm of the local shards would differ between ranks holding different experts (and then so would
    the clipped replicated weights). So the norm is taken per mesh (DTensor reduces a sharded
    gradient's norm over its mesh; ``full_tensor`` then only unwraps it) and the groups combined.
    """
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.Tensor]] = {}  # mesh (None: plain tensors) -> parameters
    for p in params:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.zeros(())
    # one mesh (one process, DDP, FSDP2 alone): that norm as is, bit for bit what clip_grad_norm_ gave
    total = norms[0] if len(norms) == 1 else torch.stack([n.float().to(norms[0].device) for n in norms]).pow(2).sum().sqrt()
    if max_norm != float("inf") and apply:
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total.to(group[0].grad.device), foreach=True)
    return total


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor ``clip_grads_with_norm_`` multiplies the gradients by: min(1, max_norm / (norm + 1e-6)), in
    the norm's dtype as there."""
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """A device-tensor lr (the CUDA-graphed step's) is written in place: the graph reads it."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
