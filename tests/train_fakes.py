"""Small in-memory stand-ins shared by the training tests (a TokenDataset look-alike)."""

from __future__ import annotations

import numpy as np


class ArrayTokens:
    """``TokenDataset``-compatible: ``tokens(start, length)``, ``doc_starts``, ``num_tokens``, ``meta``."""

    def __init__(self, docs: list[list[int]], bos_id: int = 1, vocab_size: int = 64) -> None:
        self._data = np.array([t for d in docs for t in d], dtype=np.uint16)
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.num_tokens = int(len(self._data))
        self.num_docs = len(docs)
        self.meta = {"bos_id": bos_id, "vocab_size": vocab_size, "bytes_per_token": 3.0}

    @property
    def doc_starts(self) -> np.ndarray:
        return self._starts

    def tokens(self, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens({start}, {length}) outside [0, {self.num_tokens})")
        return self._data[start:start + length].astype(np.int64)


def random_docs(num_docs: int, *, seed: int = 0, bos_id: int = 1, vocab: int = 64,
                min_len: int = 3, max_len: int = 40) -> list[list[int]]:
    """Documents that start with BOS; the body token ids encode (doc, position) loosely."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(min_len, max_len + 1))
        docs.append([bos_id] + rng.integers(2, vocab, size=n - 1).tolist())
    return docs


def pattern_docs(num_docs: int, *, seed: int = 0, bos_id: int = 1, vocab: int = 64,
                 min_len: int = 8, max_len: int = 48) -> list[list[int]]:
    """Learnable documents: BOS then a modular arithmetic run (start, stride from a small set)."""
    rng = np.random.default_rng(seed)
    body = vocab - 2
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(min_len, max_len + 1))
        start, stride = int(rng.integers(0, body)), int(rng.choice([1, 2, 3]))
        docs.append([bos_id] + [2 + (start + stride * i) % body for i in range(n - 1)])
    return docs


def tiny_model_overrides(vocab: int = 64) -> dict:
    return {"vocab_size": vocab, "hidden_size": 32, "num_layers": 2, "first_k_dense": 1,
            "dense_intermediate_size": 64, "num_heads": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 8, "v_head_dim": 8, "num_routed_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "max_seq_len": 64}


def one_thread():
    """Context for tests: one intra-op thread (2 shared cores; oversubscription makes steps 10x slower)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def _ctx():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return _ctx()


def write_token_artifact(store, prefix: str, train_docs: list[list[int]], val_docs: list[list[int]], *,
                         vocab_size: int = 64, bos_id: int = 1, eos_id: int = 0, pad_id: int = 63,
                         shard_tokens: int = 4096, bytes_per_token: float = 3.0, tokenizer_json: str | None = None,
                         extra_meta: dict | None = None) -> str:
    """A real token-shards artefact (``platform.data.shards`` layout, written by its ShardWriter).

    ``tokenizer_json``: a real tokenizer's file (default: a placeholder, for tests that need only ids).
    """
    import json
    import tempfile
    from pathlib import Path

    from moeflow.platform.data.shards import DOC_FORMAT, ShardWriter, dtype_for_vocab

    dtype = dtype_for_vocab(vocab_size)
    with tempfile.TemporaryDirectory() as tmp, store.write_artifact(prefix, overwrite=True) as writer:
        splits = {}
        for split, docs in (("train", train_docs), ("val", val_docs)):
            def upload(name, path, _w=writer):
                _w.put_file(name, path)
            sw = ShardWriter(split, shard_tokens, dtype, Path(tmp) / split, upload)
            sw.add(np.array([t for d in docs for t in d], dtype=dtype), np.array([len(d) for d in docs]))
            info = sw.close()
            info["num_text_bytes"] = int(round(info["num_tokens"] * bytes_per_token))
            splits[split] = info
        meta = {"format_version": 1, "doc_format": DOC_FORMAT, "dtype": dtype.name, "shard_tokens": shard_tokens,
                "vocab_size": vocab_size, "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id, "splits": splits,
                **(extra_meta or {})}
        writer.put_bytes("tokenizer.json", (tokenizer_json or json.dumps({"note": "test fixture: ids only"})).encode())
        writer.put_json("meta.json", meta)
        writer.metadata["kind"] = "tokens"
    return writer.uri
