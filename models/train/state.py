"""Checkpoint state of a pretraining run: capture, save to / load from a local directory, restore.

A checkpoint directory (format 2, sharded) holds

    model/         the model state dict as a ``torch.distributed.checkpoint`` (DCP) folder:
                   ``.metadata`` (written by rank 0) and per rank ``__<rank>_0.distcp`` (whole
                   tensors and objects: everything under DDP or in one process; replicated buffers,
                   optimiser step counts and ``param_groups`` under FSDP2) and ``__<rank>_1.distcp``
                   (the chunks of tensors sharded over ranks: FSDP2/EP shards), each only when not
                   empty. Each rank writes only what it holds; replicated entries are de-duplicated by
                   DCP's planner, each written once, by any rank (``_RankFilesWriter``)
    optim/         the optimiser state dict (keyed by parameter names), the same way; a folder of
                   its own so inference and evaluation copy only ``model/`` (``model_refs``)
    trainer.pt     loop state (step, tokens seen, balancing statistics, log history unless captured
                   with include_history=False: pretraining appends it to its train log), per-rank
                   RNG states (python, numpy, torch, cuda), per-rank data-loader positions and
                   per-rank partial log-interval sums, plus any ``extra`` states — small, written by
                   rank 0 from what every rank sends it
    meta.json      step, world size, configs — readable without torch

Nothing is gathered to one rank: each rank writes its own files (into its own local folder; the
worker commits the union of every rank's folder as one artefact, ``CheckpointManager.save_sharded``).
Nor does a resuming rank need every file: ``restore(..., fetch=...)`` asks for the shard files its
DCP load plan reads just before it reads them (the worker fetches them from the store, verified), so
under FSDP2 on the same world size a rank fetches its own shards and the small ``_0`` files only.
Shards and replicated entries sit in separate files for that reason: DCP puts a de-duplicated
replicated entry (a router bias) into any rank's file, and one file holding both would make every
rank fetch every other rank's shards for a few bytes.

Format 1 (before sharding) held ``model.pt`` / ``optimizer.pt``: full state dicts that rank 0
gathered to its CPU. ``restore`` and ``load_model_weights`` read both formats.

Resuming on a different number of workers (resharding):

* model and optimiser: DCP reshards them (any world size, DDP or FSDP2; each rank reads the parts
  of the saved shards it now holds).
* data loader: a loader that can (``PackedLoader.load_resharded``) gets the saved positions of all
  old ranks and re-splits what the old ranks had not consumed yet; see that method for what exactly
  is guaranteed (nothing skipped, nothing repeated, at the granularity of packed rows).
* RNG: new rank ``r`` takes old rank ``r``'s state when there was one, else a fresh state seeded
  from (seed, step, r). Same world size: every rank gets its own state back (bit-identical resume).
  Different world size: deterministic (the same checkpoint resumed twice on W' workers gives the same
  run) but not equal to any uninterrupted run — which cannot exist, since the data order per rank differs.
* partial log-interval sums: every new rank gets the mean over the old ranks (the logged value is a
  mean over ranks; the interval's steps before the checkpoint then weigh as they did).

Async save (``dcp.async_save``) is not used, on purpose: it only overlaps the write to local disk
with training, but the checkpoint is not usable until every rank's files are uploaded to the store
and rank 0 has committed the manifest (a collective step); running that in a background thread
beside the training step's own collectives needs a second process group and a commit protocol that
survives a crash of one rank mid-upload. The local write is a small part of a checkpoint's time
next to the upload (benchmarks/RESULTS.md, "checkpoint save"), so it is not worth that today.
"""

from __future__ import annotations

import json
import queue
import random
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict, set_state_dict)

# format 1 (full state dicts; still read)
MODEL_FILE, OPTIM_FILE = "model.pt", "optimizer.pt"
# both formats
TRAINER_FILE, META_FILE = "trainer.pt", "meta.json"
# format 2 (DCP folders)
MODEL_DIR, OPTIM_DIR = "model", "optim"
DCP_METADATA = ".metadata"
FORMAT_VERSION = 2
# the files a checkpoint needs only to resume (inference and evaluation skip them)
RESUME_ONLY = (OPTIM_FILE, TRAINER_FILE, OPTIM_DIR)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _no_group() -> bool:
    """No process group: DCP then reads and writes in this process alone (no collectives)."""
    return not (dist.is_available() and dist.is_initialized())


def _dcp(call, state: dict, **kwargs) -> Any:
    """``dcp.save``/``dcp.load``; in one process without a group (evaluation, export, tests) DCP's
    "assuming the intent is to ... in a single process" warning is the intent, so it is not shown."""
    no_dist = _no_group()
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        return call(state, no_dist=no_dist, **kwargs)


class _RankFilesWriter(dcp.FileSystemWriter):
    """DCP's file writer with a rank's items in two files (see the module docstring): ``__<rank>_0``
    whole tensors and objects, ``__<rank>_1`` chunks of sharded tensors; a file only when not empty."""

    def write_data(self, plan, planner):
        if not hasattr(self, "_write_data"):  # a torch without the private loop: DCP's one file per rank (loads the same)
            return super().write_data(plan, planner)
        whole = [item for item in plan.items if not _is_shard_chunk(item)]
        chunks = [item for item in plan.items if _is_shard_chunk(item)]
        files: queue.Queue = queue.Queue()
        for index, items in enumerate((whole, chunks)):
            if items:
                name = f"{plan.storage_data.prefix}{index}{DEFAULT_SUFFIX}"
                files.put((self.fs.concat_path(self.path, name), name, items))
        return self._write_data(planner, files)  # torch's own writing loop, fed our file split


def _is_shard_chunk(item) -> bool:
    """A part of a tensor sharded over ranks (not the whole tensor, not an object)."""
    data = item.tensor_data
    return data is not None and tuple(data.chunk.sizes) != tuple(data.size)


class _FetchingReader(dcp.FileSystemReader):
    """DCP's file reader over a checkpoint folder that holds only the files fetched so far: before it
    reads, it hands ``fetch`` the names (relative to the checkpoint directory) of the files its load
    plan reads."""

    def __init__(self, directory: Path, folder: str, fetch: Callable[[list[str]], None]) -> None:
        super().__init__(directory / folder)
        self.folder, self.fetch = folder, fetch

    def read_data(self, plan, planner):
        files = {self.storage_data[item.storage_index].relative_path for item in plan.items}
        self.fetch([f"{self.folder}/{name}" for name in sorted(files)])
        return super().read_data(plan, planner)


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


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


def seed_fresh_rng(seed: int, step: int, rank: int) -> None:
    """A new rank of a resharded resume (no saved state of its own): seeded from (seed, step, rank)."""
    mixed = int(np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(1)[0])
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)  # the CUDA generators too


def _gather(obj: Any) -> list[Any]:
    """The object of every rank, in rank order (collective when distributed)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def checkpoint_format(directory: str | Path) -> int:
    """2 for a sharded (DCP) checkpoint, 1 for a full one; FileNotFoundError for neither."""
    directory = Path(directory)
    if (directory / MODEL_DIR / DCP_METADATA).is_file():
        return 2
    if (directory / MODEL_FILE).is_file():
        return 1
    raise FileNotFoundError(f"{directory} is not a checkpoint: it has neither {MODEL_DIR}/{DCP_METADATA} "
                            f"(sharded) nor {MODEL_FILE} (full)")


def capture(trainer, loader=None, extra: dict[str, Any] | None = None,
            include_history: bool = True) -> dict[str, Any]:
    """Everything needed to resume. Collective; call ``save`` right after (before the next step).

    Every rank returns its own ``model``/``optimizer`` state dicts — sharded ones (DTensor shards under
    FSDP2, this rank's tensors under DDP), views of the live tensors, not copies — and rank 0 also the
    small ``trainer`` and ``meta`` parts (None on the other ranks).

    include_history=False leaves the metrics history out of the loop state: the pretraining worker
    appends it to the run's train log instead of re-pickling it into every checkpoint.
    """
    flat = bool(getattr(trainer, "flat_optimizer_state", False))
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer,
                                        options=StateDictOptions(flatten_optimizer_state_dict=flat))
    rngs = _gather(rng_state())
    loaders = _gather(loader.state_dict() if loader is not None else None)
    intervals = _gather(trainer.interval_state())  # per rank: each holds its own partial log sums
    rank, _ = _rank_world()
    out: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd, "trainer": None, "meta": None}
    if rank != 0:
        return out
    loop = trainer.loop_state()
    if not include_history:
        loop.pop("history")
    out["trainer"] = {"loop": loop, "rng": rngs, "loader": loaders, "intervals": intervals, "extra": extra or {},
                      "world_size": len(rngs), "format_version": FORMAT_VERSION,
                      "seed": getattr(trainer.cfg, "seed", 0)}
    out["meta"] = {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "world_size": len(rngs),
                   "pretrain_config": trainer.cfg.to_dict(),
                   "model_config": trainer.model.cfg.to_dict() if hasattr(trainer.model, "cfg") else None,
                   "format_version": FORMAT_VERSION}
    return out


def save(state: dict[str, Any], directory: str | Path) -> Path:
    """Write a captured state into ``directory`` (collective when distributed: every rank calls it).

    Each rank writes its DCP shard files; rank 0 also the DCP ``.metadata`` and ``trainer.pt`` /
    ``meta.json``. Ranks may pass different (local) directories: the checkpoint is then the union of
    the folders (what ``CheckpointManager.save_sharded`` commits); one shared folder works as well.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _dcp(dcp.save, state["model"], storage_writer=_RankFilesWriter(directory / MODEL_DIR))
    _dcp(dcp.save, state["optimizer"], storage_writer=_RankFilesWriter(directory / OPTIM_DIR))
    if state.get("trainer") is not None:
        torch.save(state["trainer"], directory / TRAINER_FILE)
        (directory / META_FILE).write_text(json.dumps(state["meta"], indent=2, sort_keys=True))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text())


def _load_full_dcp(folder: Path) -> dict[str, Any]:
    """A whole DCP state dict into this process's CPU memory, without a process group: every tensor
    is allocated from the checkpoint's metadata at its global shape, then filled from the shards."""
    reader = dcp.FileSystemReader(folder)
    metadata = reader.read_metadata()
    state: dict[str, Any] = {}
    for key, info in metadata.state_dict_metadata.items():
        if not hasattr(info, "size"):
            raise ValueError(f"{folder}: entry {key!r} is not a tensor (a model state dict holds only tensors)")
        state[key] = torch.empty(tuple(info.size), dtype=info.properties.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def load_model_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict (CPU) of a checkpoint of either format, in one process (no process
    group needed): what evaluation, the HF export and post-training stages load."""
    directory = Path(directory)
    if checkpoint_format(directory) == 2:
        return _load_full_dcp(directory / MODEL_DIR)
    return torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)


def restore(trainer, directory: str | Path, loader=None,
            fetch: Callable[[list[str]], None] | None = None) -> dict[str, Any]:
    """Load a checkpoint directory into a built trainer (every rank calls it); returns ``extra``.

    Any world size: a checkpoint written by W workers resumes on W' (see the module docstring for
    what is resharded and what is exact). Without ``fetch`` every rank needs the whole checkpoint
    folder; with it, the folder needs every file but the DCP shard files (``*.distcp``), and
    ``fetch(names)`` is called with the ones this rank's load reads (``model/__1_1.distcp``, ...)
    before they are read.
    """
    directory = Path(directory)
    fmt = checkpoint_format(directory)
    needed = (TRAINER_FILE, META_FILE) + ((f"{OPTIM_DIR}/{DCP_METADATA}",) if fmt == 2 else (OPTIM_FILE,))
    for name in needed:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} misses {name}")
    t_state = torch.load(directory / TRAINER_FILE, map_location="cpu", weights_only=False)
    rank, world_size = _rank_world()
    saved_world = int(t_state["world_size"])
    same = saved_world == world_size
    states = t_state["loader"]
    if (loader is not None and not same and any(s is not None for s in states)
            and not hasattr(loader, "load_resharded")):  # before anything is loaded
        raise ValueError(f"checkpoint {directory} was written by {saved_world} worker(s); this run has "
                         f"{world_size}, and its data loader ({type(loader).__name__}) cannot re-split "
                         f"its position: resume with {saved_world} worker(s)")
    if fmt == 2:  # DCP: each rank reads the parts of the saved shards it holds now (resharding)
        options = StateDictOptions(flatten_optimizer_state_dict=_flat_optimizer_state(directory / OPTIM_DIR))
        model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer, options=options)  # allocates AdamW state
        for folder, sd in ((MODEL_DIR, model_sd), (OPTIM_DIR, optim_sd)):
            reader = (dcp.FileSystemReader(directory / folder) if fetch is None
                      else _FetchingReader(directory, folder, fetch))
            _dcp(dcp.load, sd, storage_reader=reader)
        set_state_dict(trainer.model, trainer.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=options)
    else:  # format 1: full state dicts, on every rank
        options = StateDictOptions(full_state_dict=True)
        model_sd = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
        set_model_state_dict(trainer.model, model_sd, options=options)
        optim_sd = torch.load(directory / OPTIM_FILE, map_location="cpu", weights_only=False)
        set_optimizer_state_dict(trainer.model, trainer.optimizer, optim_sd, options=options)
    trainer.load_loop_state(t_state["loop"])
    if "intervals" in t_state:  # older checkpoints hold rank 0's sums only (in "loop")
        trainer.load_interval_state(t_state["intervals"][rank] if same else _mean_intervals(t_state["intervals"]))
    if rank < saved_world:  # same world size: every rank its own stream (exact resume)
        set_rng_state(t_state["rng"][rank])
    else:  # a rank the checkpoint did not have
        seed_fresh_rng(int(t_state.get("seed", 0)), trainer.step, rank)
    if loader is not None:
        if same:
            if states[rank] is not None:
                loader.load_state_dict(states[rank])
        elif any(s is not None for s in states):
            loader.load_resharded(states)
    return t_state.get("extra", {})


def _flat_optimizer_state(folder: Path) -> bool:
    """Whether a DCP optimiser folder holds a flattened optimiser state dict (``param_groups.<fqn>.<key>``
    entries). The default (nested) layout saves ``param_groups`` as ONE object that DCP de-duplicates
    across ranks, keeping one rank's copy: right when every rank holds every parameter name (DDP, FSDP2,
    EP's DTensors), wrong when ranks hold different parameters (pipeline stages: a stage would get
    another stage's groups). Trainers whose ranks differ set ``flat_optimizer_state`` (read by ``capture``)."""
    keys = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    # nested: DCP itself flattens the list into "param_groups.<index>.<key>"; flattened: "param_groups.<fqn>.<key>"
    return any(k.startswith("param_groups.") and not k.split(".")[1].isdigit() for k in keys)


def _mean_intervals(intervals: list[dict[str, Any]]) -> dict[str, Any]:
    """The old ranks' partial log-interval sums averaged (what every new rank starts from)."""
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for state in intervals:
        for key, value in state.get("interval", {}).items():
            sums[key] = sums.get(key, 0) + value.double()
            dtypes[key] = value.dtype
    n = len(intervals)
    steps = {int(s.get("interval_steps", 0)) for s in intervals}
    return {"interval": {k: (v / n).to(dtypes[k]) for k, v in sums.items()},
            "interval_steps": max(steps) if steps else 0}
