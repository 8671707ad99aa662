"""The sandbox against hostile programs: each ends with the right status and leaves the host untouched."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from moeflow.platform.eval.sandbox import SandboxLimits, can_isolate, run_many, run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")
ISOLATED = can_isolate()
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="needs root + namespaces (network not isolated here)")


def _sandbox_pids() -> list[int]:
    """Processes of any sandbox uid (they start at 100000) still alive on the host."""
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                st = Path(f"/proc/{e}/status").read_text()
            except OSError:
                continue
            uid = int(next(line for line in st.splitlines() if line.startswith("Uid:")).split()[1])
            state = next(line for line in st.splitlines() if line.startswith("State:")).split()[1]
            if uid >= 100_000 and state != "Z":
                out.append(int(e))
    return out


@pytest.fixture(autouse=True)
def no_leftover_processes():
    # Compare with what ran before this test: sandboxes of an earlier test file (e.g. the HumanEval
    # pool) may still be being torn down and must not fail this one; a process this test started
    # must be gone within a few seconds of its run.
    before = set(_sandbox_pids())
    yield
    deadline = time.monotonic() + 5.0
    while (left := sorted(set(_sandbox_pids()) - before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], "a sandboxed process outlived its run"


def _code(s: str) -> str:
    return textwrap.dedent(s).lstrip()


def test_ok_and_error_and_captured_output():
    r = run_python("print('hi'); import sys; print('e', file=sys.stderr)", timeout_s=5)
    assert (r.status, r.stdout, r.stderr, r.returncode) == ("ok", "hi\n", "e\n", 0)
    r = run_python("raise SystemExit(3)", timeout_s=5)
    assert r.status == "error" and r.returncode == 3
    r = run_python("assert 1 == 2", timeout_s=5)
    assert r.status == "error" and "AssertionError" in r.stderr
    assert r.network_isolated == ISOLATED


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass\n", timeout_s=1.5)
    assert r.status == "timeout" and r.returncode is None
    assert time.monotonic() - t0 < 6


def test_cpu_limit_ends_a_busy_loop_even_with_a_long_wall_clock():
    r = run_python("while True:\n    pass\n", limits=SandboxLimits(timeout_s=30, cpu_s=1))
    assert r.status == "timeout" and r.duration_s < 15


def test_memory_bomb_is_stopped_by_the_address_space_limit():
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(50 * 1024 * 1024))\n", timeout_s=10, memory_mb=256)
    assert r.status == "memory", r.stderr[-500:]
    r = run_python("x = bytearray(8 * 1024 ** 3)", timeout_s=10, memory_mb=256)
    assert r.status == "memory"


@needs_isolation
def test_fork_bomb_is_bounded_and_every_child_is_killed():
    bomb = _code("""
        import os, time
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    """)
    r = run_python(bomb, limits=SandboxLimits(timeout_s=2, processes=16))
    assert r.status == "timeout"
    # the fixture checks that no process of the run survives


def test_huge_output_is_cut_at_the_cap():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                   limits=SandboxLimits(timeout_s=10, max_output_bytes=100_000))
    assert r.status == "output_limit" and len(r.stdout) == 100_000


@needs_isolation
def test_writing_outside_the_scratch_dir_never_reaches_the_host(tmp_path):
    victim_dir = Path(tempfile.mkdtemp(prefix="moeflow-sbx-victim-", dir="/run"))
    os.chmod(victim_dir, 0o755)
    targets = [victim_dir / "evil", tmp_path / "evil", Path("/var/tmp") / f"evil-{os.getpid()}",
               Path("/dev/shm") / f"evil-{os.getpid()}", Path("/etc") / f"evil-{os.getpid()}"]
    code = _code(f"""
        import os
        ok = []
        for p in {[str(t) for t in targets]!r}:
            try:
                with open(p, "w") as f:
                    f.write("pwned")
                ok.append(p)
            except OSError as e:
                pass
        open("inside.txt", "w").write("fine")  # the scratch dir itself is writable
        print(sorted(ok), os.path.exists("inside.txt"))
    """)
    try:
        r = run_python(code, timeout_s=10)
        assert r.status == "ok", r.stderr
        assert r.stdout.strip().endswith("True")
        for t in targets:
            assert not t.exists(), f"the sandbox wrote {t} on the host"
    finally:
        for t in targets:
            t.unlink(missing_ok=True)
        victim_dir.rmdir()


@needs_isolation
def test_deleting_host_files_fails():
    victim_dir = Path(tempfile.mkdtemp(prefix="moeflow-sbx-victim-", dir="/run"))
    os.chmod(victim_dir, 0o755)
    victim = victim_dir / "precious.txt"
    victim.write_text("keep me")
    victim.chmod(0o644)
    code = _code(f"""
        import os, shutil
        for attempt in (lambda: os.remove({str(victim)!r}), lambda: shutil.rmtree({str(victim_dir)!r}),
                        lambda: open({str(victim)!r}, "w").write("")):
            try:
                attempt()
                print("succeeded")
            except OSError as e:
                print(type(e).__name__)
    """)
    try:
        r = run_python(code, timeout_s=10)
        assert r.status == "ok" and "succeeded" not in r.stdout, r.stdout
        assert victim.read_text() == "keep me"
    finally:
        victim.unlink(missing_ok=True)
        victim_dir.rmdir()


def test_secrets_in_the_parent_environment_are_not_visible(monkeypatch):
    monkeypatch.setenv("MOEFLOW_TEST_SECRET", "s3cr3t-value")
    code = _code("""
        import os
        print(os.environ.get("MOEFLOW_TEST_SECRET"), sorted(os.environ))
        try:
            print("parent env:", "s3cr3t-value" in open(f"/proc/{os.getppid()}/environ").read())
        except OSError as e:
            print("parent env: denied")
    """)
    r = run_python(code, timeout_s=10)
    assert r.status == "ok" and "s3cr3t-value" not in r.stdout
    assert r.stdout.startswith("None ")
    if ISOLATED:
        assert "parent env: denied" in r.stdout


@needs_isolation
def test_no_network_not_even_to_a_listener_on_the_host_loopback():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = _code(f"""
            import socket
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", {port}))
                s.sendall(b"exfiltrated")
                print("connected")
            except OSError as e:
                print("blocked:", type(e).__name__)
        """)
        r = run_python(code, timeout_s=10)
        assert r.status == "ok" and r.stdout.startswith("blocked"), r.stdout + r.stderr
        assert r.network_isolated
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_a_spawned_child_sleeping_past_the_timeout_is_killed():
    code = _code("""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        child.wait()
    """)
    r = run_python(code, timeout_s=2)
    assert r.status == "timeout"
    assert r.stdout.strip().isdigit()


@needs_isolation
def test_a_detached_child_left_behind_is_killed_when_main_exits():
    code = _code("""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print("left a child")
    """)
    r = run_python(code, timeout_s=10)
    assert r.status == "ok" and r.duration_s < 5


def test_killed_by_a_signal():
    r = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", timeout_s=5)
    assert r.status == "killed" and r.returncode == -11


def test_run_many_runs_in_parallel_with_a_bounded_pool():
    code = "import time\nt0 = time.monotonic()\ntime.sleep(0.6)\nprint(t0, time.monotonic())\n"
    results = run_many([code] * 6, limits=SandboxLimits(timeout_s=10), max_workers=2)
    spans = [tuple(map(float, r.stdout.split())) for r in results]
    assert all(r.status == "ok" for r in results)
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak == 2
