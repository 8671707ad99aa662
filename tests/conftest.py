"""Shared pytest fixtures.

Every test session gets its own ``MOEFLOW_HOME`` (set before anything imports Prefect or
MLflow), offline settings for every library that might phone home, and session-scoped
real services started on demand: a Prefect test server, an S3 HTTP server (moto) and an
MLflow server. In CI (``CI=true``) a service that cannot be reached is a failure, never a
skip.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="moeflow-test-home-"))
_OFFLINE = {
    "MOEFLOW_HOME": str(_SESSION_HOME),
    "PREFECT_HOME": str(_SESSION_HOME / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MOEFLOW_RAY_OBJECT_STORE_MB": "256",
    "MOEFLOW_RAY_NUM_CPUS": "2",
}
for _key, _value in _OFFLINE.items():
    os.environ[_key] = _value
for _key in ("MOEFLOW_MLFLOW_TRACKING_URI", "MOEFLOW_S3_ENDPOINT", "MOEFLOW_CATALOG_URL", "PREFECT_API_URL",
             "MOEFLOW_RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_key, None)


def service_unavailable(reason: str) -> None:
    """Fail in CI, skip locally: a missing service must never pass silently in CI."""
    if IN_CI:
        pytest.fail(f"required service unavailable in CI: {reason}")
    pytest.skip(reason)


# Ports handed to servers a test starts later: below Linux's ephemeral range (32768-60999), where the OS puts
# every port-0 bind (Ray's agents of other tests' clusters among them: one took a port between free_port() and
# the dashboard's start in a CI run), and above Ray's worker ports (10002-19999).
_TEST_PORTS = range(20000, 32768)


def free_port() -> int:
    """A port free now on 127.0.0.1, picked at random outside the ranges other processes draw from."""
    import random

    for _ in range(200):
        port = random.choice(_TEST_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_TEST_PORTS}")


@pytest.fixture
def moeflow_home(tmp_path, monkeypatch) -> Path:
    """A fresh MOEFLOW_HOME for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("MOEFLOW_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _interpret_triton_without_a_gpu() -> None:
    """Without a GPU the project's Triton kernels (models/kernels/) run in Triton's interpreter. It must be on before
    triton.language is first imported (its own jit'd helpers, tl.sum & co., are made then): here, as the session
    starts, before any test module or torch.compile imports triton. Off a GPU nothing else runs triton."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_a_gpu()


def triton_kernels(module: str, *kernels: str):
    """``moeflow.models.kernels.<module>`` with runnable ``kernels`` (names of its @triton.jit functions): compiled
    on CUDA, interpreted on the CPU; the test skips where neither can be."""
    import importlib
    import importlib.util

    import torch

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not importable (optional accelerator)")
    import triton.language as tl

    mod = importlib.import_module(f"moeflow.models.kernels.{module}")
    interpreted = all("Interpreted" in type(f).__name__ for f in (tl.sum, *(getattr(mod, k) for k in kernels)))
    if not torch.cuda.is_available() and not interpreted:
        pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 could be set")
    return mod


def sm90_compile_report(script: str) -> dict:
    """Run ``script`` (it compiles kernels for sm_90 with Triton's own ptxas and prints a JSON report as its last
    line) in a fresh interpreter without TRITON_INTERPRET, so the kernels compile for real without a GPU; the
    report. Skips where triton has no NVIDIA backend."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kernel_test_model(device, dtype=None, *, norm_weights: bool = False, **cfg_kw):
    """The tiny model the fused-kernel modules decode with (vocabulary 128, init std 0.08, 64 positions), routing
    biases that are not zero (so choices are not ties), and with ``norm_weights`` RMSNorm weights that are not
    ones; ``cfg_kw`` changes the config (e.g. ``q_lora_rank``)."""
    import torch

    from moeflow.models import ModelConfig, MoETransformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=128, init_std=0.08, max_seq_len=64, **cfg_kw)
    model = MoETransformer(cfg).eval().to(device, dtype)
    with torch.no_grad():
        for router in model.routers():
            router.e_score_correction_bias.normal_(0.0, 0.05)
        if norm_weights:
            for name, p in model.named_parameters():
                if p.dim() == 1 and "bias" not in name:
                    p.uniform_(0.5, 1.5)
    return model


def dispatched_ops():
    """A dispatch mode recording the ops a call dispatches (``with dispatched_ops() as ops:``, then ``ops.names``,
    ``str(op)`` in order): which path ran, without patching anything."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    return _Ops()


def kernel_test_prompts(lengths, seed: int = 3) -> list[list[int]]:
    """Random prompts of the given lengths over the kernel test model's vocabulary (ids 1..127)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]


def assert_generate_equals(model, prompts: list[list[int]], got: list[list[int]], max_tokens: int) -> None:
    """Each prompt's greedy ``generate()`` tokens (one prompt a call) equal ``got`` (the engine's, in prompt order).
    A mismatch names the request and the first token that parts, and says how close a call it was: the margin
    between the two tokens in a teacher-forced forward without a cache (a third opinion: a near-tie of the model
    is a margin of rounding size; a wrong key, mask or position is a margin far above it)."""
    from moeflow.models.generation import generate

    for i, p in enumerate(prompts):
        want = generate(model, [p], max_tokens).tokens[0]
        if got[i] != want:
            raise AssertionError(f"request {i}: " + _parting_report(model, p, got[i], want))


def _parting_report(model, prompt: list[int], got: list[int], want: list[int]) -> str:
    import torch

    j = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if j >= min(len(got), len(want)):
        return f"lengths {len(got)} vs {len(want)} (equal up to the shorter)"
    ids = torch.tensor([prompt + want[:j]], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
    top2 = logits.topk(2)
    margin, gap = (logits[want[j]] - logits[got[j]]).item(), (top2.values[0] - top2.values[1]).item()
    return (f"parts at token {j} (engine {got[j]}, generate {want[j]}); teacher-forced logits there: generate's "
            f"token leads the engine's by {margin:.4g}, the top two differ by {gap:.4g} (top ids "
            f"{top2.indices.tolist()}); tokens so far {want[:j]}")


def engine_greedy_tokens(engine, prompts: list[list[int]], max_tokens: int, max_steps: int = 500) -> list[list[int]]:
    """Each prompt added to ``engine`` (a models.serving.Engine) as a greedy request, the engine stepped until idle:
    every request's generated token ids, in prompt order (to hold against ``generate()``'s)."""
    from moeflow.models.serving import SamplingParams

    for i, p in enumerate(prompts):
        engine.add(f"r{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for _ in range(max_steps):
        if not engine.has_work():
            return [got[f"r{i}"] for i in range(len(prompts))]
        for ev in engine.step():
            if ev.token_id is not None:
                got[ev.request_id].append(ev.token_id)
    raise AssertionError("engine did not finish")


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One intra-op thread: on the 2 shared cores it is ~10x faster for tiny tensors."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _keep_main_module():
    """Restore ``sys.modules['__main__']`` after every test: Streamlit's AppTest runs page scripts as
    ``__main__``, and a later ``torch.multiprocessing.spawn`` child would re-run that script (it
    re-imports the parent's main module by path) and die."""
    import sys

    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main
