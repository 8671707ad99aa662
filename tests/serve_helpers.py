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
