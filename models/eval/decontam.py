"""Decontamination: n-gram (default 13-gram) overlap between evaluation items and training text.

Text is normalised to lowercase word tokens (``\\w+``: punctuation and whitespace differences do not
hide a copy), and every run of n consecutive words is hashed (blake2b, 8 bytes: stable across
processes, so an index can be built by one worker and read by another). An evaluation item is
*contaminated* when any of its n-grams occurs in the training index (GPT-3's and lm-eval's rule).

Short items (multiple-choice questions, arithmetic prompts) have fewer than n words. With
``min_words`` < n the index also keeps every m-gram for min_words <= m < n, and a short item of m
words is contaminated when its whole word sequence occurs in the training text (GPT-3 used the
whole example for short ones). That costs (n - min_words + 1) times the memory; items under
``min_words`` are counted as ``too_short`` rather than silently called clean.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngram_hashes(text: str, n: int = 13) -> np.ndarray:
    """uint64 hashes of the text's word n-grams (empty when it has fewer than n words)."""
    w = words(text)
    if len(w) < n:
        return np.zeros(0, dtype=np.uint64)
    grams = (" ".join(w[i:i + n]).encode("utf-8") for i in range(len(w) - n + 1))
    return np.fromiter((int.from_bytes(hashlib.blake2b(g, digest_size=8).digest(), "little") for g in grams),
                       dtype=np.uint64)


def _hash_words(w: list[str], n: int) -> list[int]:
    grams = (" ".join(w[i:i + n]).encode("utf-8") for i in range(len(w) - n + 1))
    return [int.from_bytes(hashlib.blake2b(g, digest_size=8).digest(), "little") for g in grams]


@dataclass
class NgramIndex:
    """The set of n-gram hashes of a training corpus (and m-grams, min_words <= m < n, for short items)."""

    n: int = 13
    min_words: int | None = None   # None: only n-grams (short items are 'too_short')
    _hashes: set = field(default_factory=set)
    _short: set = field(default_factory=set)
    num_documents: int = 0

    def __post_init__(self) -> None:
        if self.min_words is not None and not 1 <= self.min_words <= self.n:
            raise ValueError(f"min_words must be in [1, n={self.n}], got {self.min_words}")

    def add(self, text: str) -> None:
        w = words(text)
        self._hashes.update(_hash_words(w, self.n))
        for m in range(self.min_words or self.n, self.n):
            self._short.update((m, h) for h in _hash_words(w, m))
        self.num_documents += 1

    def add_all(self, texts: Iterable[str]) -> "NgramIndex":
        for t in texts:
            self.add(t)
        return self

    def __len__(self) -> int:
        return len(self._hashes)

    def overlap(self, text: str) -> int:
        """How many of the text's n-grams occur in the index."""
        return sum(1 for h in ngram_hashes(text, self.n).tolist() if h in self._hashes)

    def status(self, text: str) -> str:
        """'contaminated' | 'clean' | 'too_short'."""
        w = words(text)
        if len(w) >= self.n:
            return "contaminated" if self.overlap(text) else "clean"
        if self.min_words is None or len(w) < self.min_words:
            return "too_short"
        return "contaminated" if (len(w), _hash_words(w, len(w))[0]) in self._short else "clean"
