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
