"""The sandbox's first process: isolate, limit, drop privileges, then exec the untrusted program.

Run by ``sandbox.py`` as ``python -I -S _sandbox_exec.py <spec json>`` in a new session. It is a
separate program (not a ``preexec_fn``) because ``preexec_fn`` is unsafe in a threaded parent, and
the parallel runner is threaded. In order:

1. (root, ``isolate``) ``unshare(CLONE_NEWNET | CLONE_NEWNS)``: a network namespace with only a
   loopback device that is down (no route anywhere, not even to the host's 127.0.0.1), and a
   private mount namespace in which the scratch directory is bind-mounted over ``/tmp`` and fresh
   small tmpfs cover ``/var/tmp`` and ``/dev/shm``: the world-writable places of the host are
   out of reach.
2. rlimits: CPU seconds, address space, file size, open files, processes, no core files.
3. (root) drop to the run's own uid/gid (unique per run, so the process limit counts this run only
   and the parent can find every process the run made by its uid).
4. ``execve`` the interpreter on ``main.py`` with the scrubbed environment.

Exit code 125 + a message on stderr: the set-up itself failed (the program never ran).
Stdlib only: it runs under ``-S`` before anything of moeflow is importable.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def isolate(libc, scratch: str) -> None:
    _check(libc.unshare(CLONE_NEWNET | CLONE_NEWNS), "unshare(CLONE_NEWNET|CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    _check(libc.mount(scratch.encode(), b"/tmp", None, MS_BIND, None), "bind scratch over /tmp")
    for target in (b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(target):
            _check(libc.mount(b"tmpfs", target, b"tmpfs", 0, b"size=1m,mode=1777"), f"tmpfs on {target.decode()}")


def set_limits(lim: dict) -> None:
    mb = 1024 * 1024
    pairs = [(resource.RLIMIT_AS, int(lim["memory_mb"]) * mb),
             (resource.RLIMIT_FSIZE, int(lim["file_mb"]) * mb), (resource.RLIMIT_NOFILE, int(lim["open_files"])),
             (resource.RLIMIT_CORE, 0)]
    if lim.get("processes"):
        pairs.append((resource.RLIMIT_NPROC, int(lim["processes"])))
    for which, value in pairs:
        resource.setrlimit(which, (value, value))
    # CPU: SIGXCPU at the soft limit (a status the parent can name), SIGKILL one second later
    resource.setrlimit(resource.RLIMIT_CPU, (int(lim["cpu_s"]), int(lim["cpu_s"]) + 1))


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        if spec["probe"]:
            isolate(_libc(), spec["scratch"])
            os._exit(0)
        if spec["isolate"]:
            isolate(_libc(), spec["scratch"])
            os.chdir("/tmp")
        else:
            os.chdir(spec["scratch"])
        set_limits(spec["limits"])
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["uid"])
            os.setuid(spec["uid"])
    except Exception as exc:  # the program never ran: say why, with a code the parent knows
        sys.stderr.write(f"sandbox set-up failed: {exc}\n")
        sys.stderr.flush()
        os._exit(125)
    os.execve(spec["python"], [spec["python"], "-I", "main.py"], spec["env"])


if __name__ == "__main__":
    main()
