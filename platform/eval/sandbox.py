"""Run untrusted Python (generated code, its tests) in a separate, limited, network-less process.

``run_python(code, *, timeout_s, memory_mb, files=None, ...) -> SandboxResult`` writes ``code`` as
``main.py`` (and ``files``) into a fresh scratch directory and runs it through ``_sandbox_exec.py``
(see there for the isolation steps). What each guard is for:

| guard | how | status when it trips |
| --- | --- | --- |
| wall clock | the parent's deadline, then SIGKILL to the process group and every process of the run's uid | ``timeout`` |
| CPU time | RLIMIT_CPU (SIGXCPU, then SIGKILL) | ``timeout`` |
| memory | RLIMIT_AS (allocations fail: MemoryError) | ``memory`` |
| output | stdout/stderr read up to ``max_output_bytes`` each, then the run is killed | ``output_limit`` |
| processes | RLIMIT_NPROC on the run's own uid (root) | (a fork bomb just fails to fork) |
| files | RLIMIT_FSIZE, RLIMIT_NOFILE; cwd = scratch; scratch over /tmp, tmpfs over /var/tmp, /dev/shm; a uid that owns nothing else on the host | ``error`` (the write fails) |
| network | a new network namespace whose loopback is down (root) | ``error`` (connect fails) |
| environment | a minimal env (PATH, LANG, HOME=scratch): no secret of the parent is passed on | — |
| stdin | /dev/null | — |

Without root (or where namespaces are refused), the run still gets the rlimits, the timeout, the
scratch cwd and the scrubbed env, but ``network_isolated`` / ``fs_isolated`` are False in the
result and a warning is logged once: the caller can see that the network was reachable.

Other statuses: ``ok`` (exit 0), ``error`` (non-zero exit), ``killed`` (ended by a signal not
explained above). When ``main.py`` exits, every process it left behind is killed too.

``run_many(jobs, max_workers)`` runs several in parallel with a bounded pool of threads (each
thread only waits on its child process).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "killed")
_EXEC = Path(__file__).with_name("_sandbox_exec.py")
_SETUP_FAILED = 125
_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc")


@dataclass
class SandboxResult:
    status: str                 # one of STATUSES
    stdout: str
    stderr: str
    duration_s: float
    returncode: int | None      # None when the parent killed it
    network_isolated: bool
    fs_isolated: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    memory_mb: int = 512
    cpu_s: float | None = None   # default: ceil(timeout_s) + 1
    file_mb: int = 16
    open_files: int = 64
    processes: int = 32
    max_output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s <= 3600:
            raise ValueError(f"timeout_s must be in (0, 3600], got {self.timeout_s}")
        if not 32 <= self.memory_mb <= 1 << 20:
            raise ValueError(f"memory_mb must be in [32, 1048576], got {self.memory_mb}")
        if self.processes < 1 or self.open_files < 16 or self.file_mb < 1 or self.max_output_bytes < 1:
            raise ValueError("processes >= 1, open_files >= 16, file_mb >= 1, max_output_bytes >= 1")


# ============================================================================ environment of the host

def _world_executable(path: str) -> bool:
    """True when a uid that owns nothing can reach and run ``path`` (every parent dir o+x)."""
    p = Path(os.path.realpath(path))
    if not p.is_file() or not p.stat().st_mode & stat.S_IXOTH:
        return False
    return all(d.stat().st_mode & stat.S_IXOTH for d in p.parents)


@lru_cache(maxsize=1)
def sandbox_python() -> str:
    """The interpreter for sandboxed code: ours if a foreign uid can run it, else the system's."""
    for cand in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if cand and (os.geteuid() != 0 or _world_executable(cand)):
            return os.path.realpath(cand)
    raise RuntimeError("no Python interpreter that an unprivileged uid can execute (need one outside 0700 dirs)")


@lru_cache(maxsize=1)
def can_isolate() -> bool:
    """Whether this host lets us make network + mount namespaces (root on Linux, not refused)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    scratch = tempfile.mkdtemp(prefix="moeflow-sbx-probe-")
    try:
        spec = {"probe": True, "scratch": scratch}
        proc = subprocess.run([sys.executable, "-I", "-S", str(_EXEC), json.dumps(spec)], capture_output=True,
                              timeout=30, stdin=subprocess.DEVNULL)
        ok = proc.returncode == 0
        if not ok:
            log.warning("sandbox: namespaces refused (%s): the network is NOT isolated",
                        proc.stderr.decode(errors="replace").strip())
        return ok
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scrubbed_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    env.update(extra or {})
    return env


# ============================================================================ killing what a run left

def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith(("Z", "X")):
                pids.append(int(entry))
        except (OSError, KeyError, ValueError):
            continue
    return pids


def _kill_run(proc: subprocess.Popen, uid: int | None) -> None:
    """SIGKILL the process group, then (root) every process of the run's uid until none is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    for _ in range(200):  # a fork bomb may fork between a scan and a kill: repeat until empty
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    log.error("sandbox: processes of uid %d survive repeated SIGKILL", uid)


# ============================================================================ one run

def _read_capped(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Read both pipes until EOF; returns (stdout, stderr, 'timeout' | 'output_limit' | None)."""
    sel = selectors.DefaultSelector()
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    reason = None
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            reason = "timeout"
            break
        if proc.poll() is not None:
            left = min(left, 0.05)  # main.py is gone: drain what is buffered, do not wait for orphans
        events = sel.select(timeout=left)
        if not events and proc.poll() is not None:
            break
        for key, _ in events:
            chunk = key.fileobj.read(65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = bufs[key.fileobj]
            buf += chunk
            if len(buf) > cap:
                del buf[cap:]
                reason = "output_limit"
        if reason:
            break
    sel.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), reason


def _classify(returncode: int | None, reason: str | None, stderr: str) -> str:
    if reason:
        return reason
    if returncode == 0:
        return "ok"
    if any(m in stderr[-4000:] for m in _MEMORY_MARKERS):
        return "memory"
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig in (signal.SIGXCPU,):
            return "timeout"
        return "killed"
    return "error"


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 512, files: Mapping[str, str] | None = None,
               limits: SandboxLimits | None = None, env: Mapping[str, str] | None = None,
               scratch_root: str | None = None) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a fresh scratch directory under the sandbox (see module docstring)."""
    lim = limits or SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    isolated = can_isolate()
    root = os.geteuid() == 0
    uid = 100_000 + secrets.randbelow(1_000_000_000) if root else None
    scratch = Path(tempfile.mkdtemp(prefix="moeflow-sbx-", dir=scratch_root))
    try:
        for rel, text in {"main.py": code, **(files or {})}.items():
            target = (scratch / rel).resolve()
            if scratch.resolve() not in target.parents:
                raise ValueError(f"sandbox file {rel!r} escapes the scratch directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        if uid is not None:
            for p in [scratch, *scratch.rglob("*")]:
                os.chown(p, uid, uid)
        cpu_s = lim.cpu_s or int(lim.timeout_s) + 1
        spec = {"probe": False, "isolate": isolated, "scratch": str(scratch), "uid": uid,
                "python": sandbox_python(), "env": _scrubbed_env(env),
                "limits": {"cpu_s": cpu_s, "memory_mb": lim.memory_mb, "file_mb": lim.file_mb,
                           "open_files": lim.open_files, "processes": lim.processes if root else 0}}
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(_EXEC), json.dumps(spec)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                cwd=str(scratch), env=_scrubbed_env(None))
        try:
            out, err, reason = _read_capped(proc, start + lim.timeout_s, lim.max_output_bytes)
        finally:
            _kill_run(proc, uid)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        duration = time.monotonic() - start
        stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        if proc.returncode == _SETUP_FAILED and stderr.startswith("sandbox set-up failed"):
            raise RuntimeError(stderr.strip())
        returncode = None if reason else proc.returncode
        return SandboxResult(_classify(returncode, reason, stderr), stdout, stderr, duration, returncode,
                             network_isolated=isolated, fs_isolated=isolated and uid is not None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class SandboxJob:
    code: str
    files: Mapping[str, str] | None = None


def run_many(jobs: Sequence[SandboxJob | str], *, limits: SandboxLimits | None = None, max_workers: int | None = None,
             scratch_root: str | None = None) -> list[SandboxResult]:
    """Run jobs in parallel, at most ``max_workers`` at once (default: the CPU count); results in input order."""
    lim = limits or SandboxLimits()
    workers = max(1, min(max_workers or os.cpu_count() or 1, len(jobs) or 1))
    normalized = [j if isinstance(j, SandboxJob) else SandboxJob(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        futures = [pool.submit(run_python, j.code, files=j.files, limits=lim, scratch_root=scratch_root)
                   for j in normalized]
        return [f.result() for f in futures]
