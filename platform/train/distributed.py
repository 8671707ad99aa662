"""The distributed set-up every training worker shares: join the process group, barrier,
broadcast from rank 0, wrap a model in DDP or FSDP2, open the store.

``worker_context(device)`` is the one entry a worker function uses (pretraining, and the
post-training stages with their own step functions): it joins torch.distributed the way the
launcher started us — Ray Train has already done it; under torchrun it reads
``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` (gloo on CPU, NCCL on GPU); a lone process stays single —
picks the device, gives a scratch directory, and tears down what it created.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ray_ctx: Any | None  # Ray Train's context under Ray Train (ray.train.report needs it), else None
    tmp: Path            # this rank's scratch directory, removed on exit

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def ray_train_context():
    """Ray Train's context when this process is a Ray Train worker, else None."""
    if "ray" not in sys.modules:  # a Ray Train worker has imported ray long before calling us
        return None
    try:
        import ray.train

        ctx = ray.train.get_context()
        ctx.get_world_size()
        return ctx
    except Exception:  # not under Ray Train (or Ray not installed)
        return None


def init_distributed(use_cuda: bool) -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, we_created_the_group)."""
    if dist.is_available() and dist.is_initialized():  # Ray Train did it
        ctx = ray_train_context()
        local_rank = ctx.get_local_rank() if ctx is not None else int(os.environ.get("LOCAL_RANK", 0))
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # torchrun
        backend = "nccl" if use_cuda else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size(), local_rank, True
    return 0, 1, 0, False


@contextlib.contextmanager
def worker_context(device: str = "auto") -> Iterator[WorkerContext]:
    """Join the group, pick the device, make a scratch dir; undo what we created on exit."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world_size, local_rank, own_group = init_distributed(use_cuda)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    tmp = Path(tempfile.mkdtemp(prefix=f"moeflow-train-r{rank}-"))
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads())
    try:
        yield WorkerContext(rank, world_size, local_rank, dev, ray_train_context(), tmp)
    finally:
        torch.set_num_threads(threads)  # an in-process run hands the caller's setting back
        shutil.rmtree(tmp, ignore_errors=True)
        if own_group:
            dist.destroy_process_group()


def cpu_threads() -> int:
    """Intra-op threads of a CPU training worker: ``OMP_NUM_THREADS``, else 1.

    1 is what torchrun and our Ray workers (``ray_launch.worker_env``) give each worker. An
    in-process run used to keep torch's default (one per core): on a loaded 2-core machine
    the threads spin at every op's barrier and a tiny-model step took 10x longer (measured:
    benchmarks/bench_cpu_threads.py), which is how ``moeflow run pipeline`` sat silently
    for more than 8 minutes after tokenize.
    """
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity when single)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def open_store(store_uri: str | None):
    """The store rooted at ``store_uri`` (workers get the root as a string), else the settings' store."""
    from moeflow.platform.store import open_store as settings_store
    from moeflow.platform.store import store_for_uri

    if not store_uri:
        return settings_store()
    store, _key = store_for_uri(store_uri.rstrip("/") + "/_")  # the root: a key inside it, dropped
    return store


def wrap_model(model: torch.nn.Module, parallelism: str, dtype: str, world_size: int, device: torch.device,
               find_unused_parameters: bool = False, expert_parallel: int = 1) -> torch.nn.Module:
    """DDP or FSDP2 around the bare model (architecture stays separate from distribution);
    with ``expert_parallel`` > 1 the routed experts are first sharded over a (dp, ep) mesh
    (``expert_parallel.parallelize``)."""
    if world_size <= 1:
        return model
    if expert_parallel > 1:
        from .expert_parallel import build_mesh, parallelize

        mesh = build_mesh(device.type, world_size // expert_parallel, expert_parallel)
        return parallelize(model, mesh, parallelism, dtype, device, find_unused_parameters)
    if parallelism == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        for block in model.mtp:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
