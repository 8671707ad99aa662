"""Helpers of the serving tests: a tiny exported model with a real tokenizer, a loopback uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch

TEXTS = ["def add(a, b):\n    return a + b\n", "the quick brown fox jumps over the lazy dog. " * 3,
         "import os\nimport sys\nprint(os.getcwd())\n", "héllo wörld ünïcode ✓ 🚀 text\n",
         "for i in range(10):\n    print(i * i)\n"] * 20


def make_model_dir(directory: Path, seed: int = 0, vocab: int = 320, max_seq_len: int = 128) -> Path:
    """A tiny MoE exported in the HF layout plus its tokenizer.json (what ``ModelServer`` loads)."""
    from moeflow.models import ModelConfig, MoETransformer
    from moeflow.models.hf import export_hf
    from moeflow.models.tokenizer import train_bpe

    tok = train_bpe(TEXTS, vocab_size=vocab)
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, max_seq_len=max_seq_len, init_std=0.08)
    model = MoETransformer(cfg).eval()
    export_hf(model, directory, include_mtp=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
              pad_token_id=tok.pad_id)
    tok.save(Path(directory) / "tokenizer.json")
    return Path(directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """An ASGI app under uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class ScriptedEngine:
    """The ``Engine`` API that the serving loops use, without a model, for the process engine's tests: every
    ``step_s`` each running request gets its next token (prompt[0] + 1, + 2, ...), up to ``max_batch`` run at
    once, the rest wait; ``max_tokens`` ends one. A step while a request whose prompt starts with ``POISON``
    runs raises, as a failing model step would."""

    POISON = 13

    def __init__(self, step_s: float, max_batch: int) -> None:
        from collections import deque

        self.step_s, self.max_batch = step_s, max_batch
        self.context_len, self.vocab_size, self.decode = 1 << 20, 1000, None
        self.lock = threading.Lock()
        self.inbox: deque = deque()
        self.cancelled: set[str] = set()
        self.running: dict[str, list] = {}  # id -> [first token, max_tokens, made]

    def add(self, request_id, prompt_ids, params) -> None:
        with self.lock:
            self.inbox.append((request_id, prompt_ids[0], params.max_tokens))

    def cancel(self, request_id) -> None:
        with self.lock:
            self.cancelled.add(request_id)

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.inbox or self.running or self.cancelled)

    def num_running(self) -> int:
        return len(self.running)

    def num_waiting(self) -> int:
        return len(self.inbox)

    def step(self):
        from moeflow.models.serving import TokenOutput

        out = []
        with self.lock:
            cancelled, self.cancelled = self.cancelled, set()
            for rid in [r for r in self.inbox if r[0] in cancelled]:
                self.inbox.remove(rid)
                out.append(TokenOutput(rid[0], None, finish_reason="cancelled"))
            while self.inbox and len(self.running) < self.max_batch:
                rid, first, n = self.inbox.popleft()
                self.running[rid] = [first, n, 0]
        for rid in cancelled & set(self.running):
            del self.running[rid]
            out.append(TokenOutput(rid, None, finish_reason="cancelled"))
        if any(st[0] == self.POISON for st in self.running.values()):
            raise RuntimeError("poisoned request")
        time.sleep(self.step_s)
        for rid, st in list(self.running.items()):
            st[2] += 1
            done = st[2] >= st[1]
            out.append(TokenOutput(rid, st[0] + st[2], text="", finish_reason="length" if done else None,
                                   num_generated=st[2]))
            if done:
                del self.running[rid]
        return out


def scripted_engine_setup(step_s: float, max_batch: int):
    """``ProcessEngine``'s setup of a ``ScriptedEngine`` (module level: it is pickled into the child)."""
    import functools

    return functools.partial(ScriptedEngine, step_s, max_batch)


def scripted_engine_setup_once(step_s: float, max_batch: int, marker: str):
    """As ``scripted_engine_setup``, but a child started after ``marker`` exists fails to start (a restart that
    cannot load the model, say for lack of memory)."""
    import os

    if os.path.exists(marker):
        raise RuntimeError("cannot load the model (test)")
    open(marker, "w").close()
    return scripted_engine_setup(step_s, max_batch)
