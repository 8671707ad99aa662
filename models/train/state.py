"""Checkpoint state of a pretraining run: capture, save to / load from a local directory, restore.

A checkpoint directory holds

    model.pt       full (unsharded) model state dict, CPU tensors — includes the router-bias buffers
    optimizer.pt   full optimiser state dict keyed by parameter names (layout-independent)
    trainer.pt     loop state (step, tokens seen, balancing statistics, log history unless captured
                   with include_history=False: pretraining appends it to its train log), per-rank
                   RNG states (python, numpy, torch, cuda), per-rank data-loader positions and
                   per-rank partial log-interval sums,
                   plus any ``extra`` states (e.g. the expert-load recorder)
    meta.json      step, world size, configs — readable without torch

The model and optimiser go through ``torch.distributed.checkpoint.state_dict``
(``get_/set_model_state_dict``, ``get_/set_optimizer_state_dict`` with full state dicts), which
gives the same file for a plain module, DDP and FSDP2 — so a run checkpointed under FSDP2 can be
evaluated or exported in one process. Capturing is collective when distributed (every rank
calls it); only rank 0 gets the tensors and writes.

Exact resume needs the same world size (per-rank RNG and loader positions); ``restore`` refuses
a different one with a clear error.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

MODEL_FILE, OPTIM_FILE, TRAINER_FILE, META_FILE = "model.pt", "optimizer.pt", "trainer.pt", "meta.json"
FORMAT_VERSION = 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj: Any) -> list[Any]:
    """The object of every rank, in rank order (collective when distributed)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def capture(trainer, loader=None, extra: dict[str, Any] | None = None,
            include_history: bool = True) -> dict[str, Any] | None:
    """Everything needed to resume. Collective; returns the state on rank 0, None elsewhere.

    include_history=False leaves the metrics history out of the loop state: the pretraining worker
    appends it to the run's train log instead of re-pickling it into every checkpoint.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(trainer.model, options=options)
    optim_sd = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=options)
    rngs = _gather(rng_state())
    loaders = _gather(loader.state_dict() if loader is not None else None)
    intervals = _gather(trainer.interval_state())  # per rank: each holds its own partial log sums
    rank = dist.get_rank() if _distributed() else 0
    if rank != 0:
        return None
    loop = trainer.loop_state()
    if not include_history:
        loop.pop("history")
    return {"model": model_sd, "optimizer": optim_sd,
            "trainer": {"loop": loop, "rng": rngs, "loader": loaders, "intervals": intervals,
                        "extra": extra or {},
                        "world_size": len(rngs), "format_version": FORMAT_VERSION},
            "meta": {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "world_size": len(rngs),
                     "pretrain_config": trainer.cfg.to_dict(),
                     "model_config": trainer.model.cfg.to_dict() if hasattr(trainer.model, "cfg") else None,
                     "format_version": FORMAT_VERSION}}


def save(state: dict[str, Any], directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state["model"], directory / MODEL_FILE)
    torch.save(state["optimizer"], directory / OPTIM_FILE)
    torch.save(state["trainer"], directory / TRAINER_FILE)
    (directory / META_FILE).write_text(json.dumps(state["meta"], indent=2, sort_keys=True))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text())


def load_model_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)


def restore(trainer, directory: str | Path, loader=None) -> dict[str, Any]:
    """Load a checkpoint directory into a built trainer (every rank calls it); returns ``extra``."""
    directory = Path(directory)
    for name in (MODEL_FILE, OPTIM_FILE, TRAINER_FILE, META_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} misses {name}")
    t_state = torch.load(directory / TRAINER_FILE, map_location="cpu", weights_only=False)
    world_size = dist.get_world_size() if _distributed() else 1
    rank = dist.get_rank() if _distributed() else 0
    if t_state["world_size"] != world_size:
        raise ValueError(f"checkpoint {directory} was written by {t_state['world_size']} worker(s); this run has "
                         f"{world_size}. Exact resume needs the same number of data-parallel workers.")
    options = StateDictOptions(full_state_dict=True)
    model_sd = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    set_model_state_dict(trainer.model, model_sd, options=options)
    optim_sd = torch.load(directory / OPTIM_FILE, map_location="cpu", weights_only=False)
    set_optimizer_state_dict(trainer.model, trainer.optimizer, optim_sd, options=options)
    trainer.load_loop_state(t_state["loop"])
    if "intervals" in t_state:  # older checkpoints hold rank 0's sums only (in "loop")
        trainer.load_interval_state(t_state["intervals"][rank])
    set_rng_state(t_state["rng"][rank])
    if loader is not None and t_state["loader"][rank] is not None:
        loader.load_state_dict(t_state["loader"][rank])
    return t_state.get("extra", {})
