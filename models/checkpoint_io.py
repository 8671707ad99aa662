"""safetensors helpers: write a state dict as one file or as shards with an index, and read either back.

The on-disk layout is the Hugging Face one, so ``transformers`` and other tools read it unchanged:
- small models: ``model.safetensors``;
- large ones: ``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``
  (``{"metadata": {"total_size": bytes}, "weight_map": {key: file}}``).
Every file carries the metadata ``{"format": "pt"}`` (transformers refuses files without it).

Tensors that share storage (tied weights, views into a stacked parameter) are copied into
contiguous standalone tensors before writing, because safetensors rejects shared storage.
Files are written under a temporary name and renamed, so a crash never leaves a half-written
shard under its final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(state_dict: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Split keys (in insertion order) into shards of at most ``max_shard_bytes`` each.

    A single tensor larger than the limit gets a shard of its own (it cannot be split).
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    used = 0
    for key, t in state_dict.items():
        size = _nbytes(t)
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def _standalone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def save_state_dict(state_dict: dict[str, torch.Tensor], directory: str | os.PathLike,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write ``state_dict`` into ``directory``; returns the file names written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # a previous export with another shard count must not linger
    shards = plan_shards(state_dict, max_shard_bytes)
    if len(shards) == 1:
        _atomic_save({k: _standalone(state_dict[k]) for k in shards[0]}, out / SINGLE_FILE)
        return [SINGLE_FILE]
    names, weight_map = [], {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save({k: _standalone(state_dict[k]) for k in keys}, out / name)
        weight_map.update({k: name for k in keys})
        names.append(name)
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in state_dict.values())}, "weight_map": weight_map}
    tmp = out / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True))
    os.replace(tmp, out / INDEX_FILE)
    return names + [INDEX_FILE]


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a directory: the index's shards, else ``model.safetensors``."""
    d = Path(directory)
    if (d / INDEX_FILE).exists():
        weight_map = json.loads((d / INDEX_FILE).read_text())["weight_map"]
        files = [d / name for name in sorted(set(weight_map.values()))]
    elif (d / SINGLE_FILE).exists():
        files = [d / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{d}: no {SINGLE_FILE} or {INDEX_FILE} (not a safetensors checkpoint directory)")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{d}: shard(s) named in {INDEX_FILE} are missing: {missing}")
    return files


def load_state_dict(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint directory."""
    out: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(directory):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key in out:
                    raise ValueError(f"{directory}: key {key!r} appears in more than one shard")
                out[key] = f.get_tensor(key)
    return out
