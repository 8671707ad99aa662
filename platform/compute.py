"""Compute: one Ray per machine, reused, and an order-preserving parallel map on it.

``ensure_ray`` connects, in this order, to ``settings.ray_address`` (a cluster), to the
local head that ``moeflow up`` started (its address is kept in ``$MOEFLOW_HOME/run``), or
starts an in-process local Ray once per process with a bounded object store. It never
starts a second Ray in a process that already has one: a Prefect flow run must not spawn
its own cluster (REFERENCES.md: a RayTaskRunner without an address does exactly that).

``parallel_map`` runs inline when one worker is asked for, so library code has one code
path and tests can compare 1 worker with N.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from .settings import Settings, get_settings

T = TypeVar("T")
R = TypeVar("R")

RAY_ADDRESS_FILE = "ray_address"


def local_head_address(settings: Settings) -> str | None:
    """Address of the Ray head started by ``moeflow up``, if its address file exists."""
    path = Path(settings.run_dir) / RAY_ADDRESS_FILE
    if path.is_file():
        address = path.read_text().strip()
        return address or None
    return None


def ensure_ray(settings: Settings | None = None) -> None:
    """Make sure this process is connected to a Ray cluster (idempotent)."""
    import ray  # heavy: imported only when compute is needed

    if ray.is_initialized():
        return
    settings = settings or get_settings()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = settings.ray_address or local_head_address(settings)
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
        return
    # address="local": never join whatever cluster /tmp/ray/ray_current_cluster happens to name
    ray.init(
        address="local",
        num_cpus=settings.ray_num_cpus,
        object_store_memory=settings.ray_object_store_mb * 1024 * 1024,
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=True,
    )


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    num_workers: int | None = None,
    desc: str = "",
    progress: bool = True,
    settings: Settings | None = None,
    num_cpus_per_task: float = 1,
) -> list[R]:
    """``[fn(x) for x in items]``, on Ray tasks when ``num_workers > 1``; results keep input order.

    At most ``num_workers`` tasks are in flight, so a long item list never floods the
    object store. ``num_workers=None`` means one per CPU of the cluster. An exception in
    any task is re-raised here (Ray wraps it; the original type is kept as the cause).
    """
    from tqdm.auto import tqdm

    items = list(items)
    bar = tqdm(total=len(items), desc=desc or getattr(fn, "__name__", "map"), disable=not progress, leave=False)
    if num_workers is not None and num_workers <= 1 or len(items) <= 1:
        results = []
        for item in items:
            results.append(fn(item))
            bar.update(1)
        bar.close()
        return results

    import ray

    ensure_ray(settings)
    if num_workers is None:
        num_workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    remote_fn = ray.remote(num_cpus=num_cpus_per_task, max_retries=2)(fn)
    results: list[Any] = [None] * len(items)
    pending: dict[Any, int] = {}
    next_index = 0
    try:
        while next_index < len(items) or pending:
            while next_index < len(items) and len(pending) < num_workers:
                pending[remote_fn.remote(items[next_index])] = next_index
                next_index += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # surface the task's own exception
                    cause = err.as_instanceof_cause() if hasattr(err, "as_instanceof_cause") else err
                    raise cause from None
                bar.update(1)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        bar.close()
    return results
