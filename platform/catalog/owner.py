"""Which process owns a running catalog run, and whether that process is still alive.

A run is "running" until its process marks it finished; a process killed with SIGKILL (or by the
OOM killer) never does. The owner is written as ``host:pid:start-time`` when the run starts: the
start time (seconds since the epoch, from the kernel) tells a live owner from a new process that
reuses the pid. Only owners on this host can be checked; runs of other hosts are never judged.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start_time: float  # psutil's create_time, rounded to 10 ms

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.start_time:.2f}"

    @classmethod
    def parse(cls, text: str | None) -> "Owner | None":
        try:
            host, pid, start = str(text).rsplit(":", 2)
            return cls(host, int(pid), float(start))
        except (TypeError, ValueError):
            return None


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.Error, OSError):
        return None


def this_process() -> Owner:
    return Owner(socket.gethostname(), os.getpid(), _start_time(os.getpid()) or 0.0)


def is_dead(owner: Owner) -> bool:
    """True only when the owner is on this host and its process is gone (or the pid was reused)."""
    import psutil

    if owner.host != socket.gethostname():
        return False
    started = _start_time(owner.pid)
    if started is None:
        return True
    try:
        if psutil.Process(owner.pid).status() == psutil.STATUS_ZOMBIE:
            return True
    except (psutil.Error, OSError):
        return True
    return abs(started - owner.start_time) > 0.05
