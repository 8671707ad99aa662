"""MinHash signatures of documents.

Holds text simplification, word-shingle hashing and the MinHash signatures; banding,
clustering, ``near_duplicate_clusters`` and the persistent ``MinHashIndex`` live in ``lsh.py``,
which builds on this module (and this module never imports it: no import loop).

Pipeline (DataTrove's recipe, vectorised with numpy); steps 5-7 are in ``lsh.py``:

1. ``simplify_text``: lowercase, NFKD with combining marks dropped (accents stripped), every
   decimal digit -> ``0``, punctuation and symbols -> space, whitespace collapsed.
2. Word n-gram shingles (default 5). A document with 1..n-1 words yields one shingle of all its
   words; an empty document yields none and is never put in a cluster.
3. 64-bit shingle hashes without any Python call per word or shingle: the simplified bytes of a
   batch of documents go through numpy once; each word gets a 64-bit polynomial hash with a
   random byte table (``_word_hashes``), and a shingle is ``mix64(sum_k c_k * w_{j+k} mod 2^64)``
   with fixed random odd ``c_k``. For distinct shingles the difference is a non-trivial linear
   form in pseudo-random word hashes, so collisions have probability ~2^-64 (order matters
   because the ``c_k`` differ). Measured faster than a per-word ``hashlib.blake2b`` behind a word
   cache (ratio in benchmarks/RESULTS.md), and its memory does not grow with the vocabulary.
4. ``num_perm`` hash functions ``h_i(x) = a_i * x + b_i mod 2^64`` (``a_i`` odd), min over the
   shingles. Multiply-add mod 2^64 is Dietzfelbinger's multiply-shift family (universal for the
   top bits, which decide the minimum), and the keys are already pseudo-random 64-bit hashes, so
   by Mitzenmacher & Vadhan ("Why simple hash functions work", 2008) a 2-universal family
   behaves like a truly random one on them; the tests check the estimator empirically (unbiased,
   spread of the binomial law). Why not ``(a x + b) mod (2^61 - 1)``: it needs a 122-bit
   product, i.e. four partial products and several folds in numpy; a straightforward version
   measured ~20x slower per block (benchmarks/RESULTS.md; this CPU has no AVX-512, so even one
   uint64 multiply is emulated). The (num_perm x shingles) intermediate is computed in chunks of
   at most ``chunk_size`` shingles, so memory is bounded whatever a document's length (a long
   document spans chunks and its minimum is carried across them).

See ``lsh.py`` for the S-curve of the default 14 bands x 8 rows and why ``near_duplicate_clusters``
verifies candidates against ``threshold - verify_margin``.

Shape suffixes: N documents, H hashes (num_perm), W words, S shingles, C shingles in one chunk,
D documents in one chunk.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

__all__ = [
    "compute_signatures",
    "shingle_hashes",
    "simplify_text",
]

EMPTY = np.uint64(2**64 - 1)  # signature entry of a document without shingles
DEFAULT_CHUNK_SIZE = 8192  # shingles per (S x H) block: 8192 * 112 * 8 B = 7.3 MB
_PIECE_BYTES = 1 << 20  # simplified text hashed per numpy pass (~40 MB of temporaries)
_SHINGLE_SALT = 0x9E3779B97F4A7C15  # fixes the shingle coefficients independently of `seed`

# --------------------------------------------------------------------------------------------
# Text simplification
# --------------------------------------------------------------------------------------------


def _ascii_table() -> bytes:
    table = bytearray(range(256))
    for c in range(128):
        ch = chr(c)
        if ch.isupper():
            table[c] = ord(ch.lower())
        elif ch.isdigit():
            table[c] = ord("0")
        elif not ch.isalnum():  # punctuation, symbols, whitespace, control characters
            table[c] = ord(" ")
    return bytes(table)


_ASCII_TABLE = _ascii_table()
_NON_WORD_RE = re.compile(r"[\W_]+")  # everything that is not a letter/digit (Unicode-aware)
_DIGIT_RE = re.compile(r"\d")


@lru_cache(maxsize=1)
def _marks_re() -> re.Pattern:
    """All combining marks (category M*), built once on first non-ASCII text (~0.2 s).

    Only planes 0, 1 and 14 are scanned: no other plane has a mark (checked against a full
    scan for Unicode 14), and scanning all 1.1M code points takes ~1.5 s.
    """
    ranges: list[str] = []
    start = prev = None
    for cp in itertools.chain(range(0x20000), range(0xE0000, 0xF0000)):
        if unicodedata.category(chr(cp)).startswith("M"):
            if start is None:
                start = cp
            elif cp != prev + 1:
                ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
                start = cp
            prev = cp
    if start is not None:
        ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
    return re.compile("[" + "".join(ranges) + "]+")


def _simplified_words(text: str) -> list[bytes]:
    """Words of the simplified text as UTF-8 bytes (bytes hash and translate fastest)."""
    if text.isascii():
        # Fast path: one C-level pass maps case, digits and punctuation at once.
        return text.encode("ascii").translate(_ASCII_TABLE).split()
    text = unicodedata.normalize("NFKD", text.lower())
    text = _marks_re().sub("", text)  # strip accents (and other combining marks)
    text = _DIGIT_RE.sub("0", text)
    text = _NON_WORD_RE.sub(" ", text)
    return text.encode("utf-8").split()


def simplify_text(text: str) -> str:
    """The text as MinHash sees it: ``"Café No. 42!"`` -> ``"cafe no 00"``."""
    return " ".join(w.decode("utf-8") for w in _simplified_words(text))


# --------------------------------------------------------------------------------------------
# Hash parameters
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _shingle_coeffs(ngram: int) -> np.ndarray:
    """(ngram,) random odd uint64 weights of word position k inside a shingle."""
    rng = np.random.default_rng([_SHINGLE_SALT & 0xFFFFFFFF, ngram])
    return rng.integers(0, 2**63, size=ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


@lru_cache(maxsize=64)
def _perm_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a_H odd, b_H) uint64 parameters of the num_perm hash functions."""
    rng = np.random.default_rng([seed, num_perm, 0x5EED])
    a_H = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b_H = rng.integers(0, 2**64 - 1, size=num_perm, dtype=np.uint64, endpoint=True)
    return a_H, b_H


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (bijective), in place on a uint64 array; returns it."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


@lru_cache(maxsize=1)
def _byte_table() -> np.ndarray:
    """(256,) random uint64 per byte value, for the word hash."""
    return np.random.default_rng([_SHINGLE_SALT & 0xFFFFFFFF, 256]).integers(0, 2**64 - 1, 256, dtype=np.uint64,
                                                                            endpoint=True)


_POLY_Q = np.uint64(0xD6E8FEB86659FD93)  # odd multiplier of the per-word polynomial hash


def _simplified_bytes(text: str) -> bytes:
    """The simplified text as UTF-8 bytes, words separated by one or more b" " (nothing else)."""
    if text.isascii():
        # Fast path: one C-level pass maps case, digits, punctuation and whitespace at once.
        return text.encode("ascii").translate(_ASCII_TABLE)
    return b" ".join(_simplified_words(text))


def _word_hashes(buf: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the space-separated words of ``buf`` and each word's start offset in ``buf``.

    Vectorised over bytes, with no Python call per word: a word ``c_0..c_{L-1}`` hashes to
    ``mix64(sum_k T[c_k] * Q^k mod 2^64)`` with a random byte table ``T`` (a polynomial hash with
    random coefficients; two different words collide with probability ~L/2^64). Temporaries
    are ~40 bytes per byte of ``buf``, so callers pass at most ``_PIECE_BYTES``.
    Returns ((W,) uint64, (W,) int64).
    """
    arr = np.frombuffer(buf, dtype=np.uint8)
    is_char = arr != 32
    starts_mask = is_char.copy()
    starts_mask[1:] &= ~is_char[:-1]
    word_starts = np.flatnonzero(starts_mask)
    if not len(word_starts):
        return np.empty(0, np.uint64), word_starts
    chars = arr[is_char]
    # Start of each word in the compacted array of characters (spaces removed), from word
    # lengths (O(words), cheaper than a cumulative sum over every byte).
    ends_mask = is_char.copy()
    ends_mask[:-1] &= ~is_char[1:]
    word_len = np.flatnonzero(ends_mask) + 1 - word_starts
    comp_starts = np.cumsum(word_len) - word_len
    pos_in_word = np.arange(len(chars), dtype=np.int64) - np.repeat(comp_starts, word_len)
    powers = np.ones(int(word_len.max()), dtype=np.uint64)  # Q^0 .. Q^(L-1) mod 2^64
    powers[1:] = np.cumprod(np.full(len(powers) - 1, _POLY_Q, dtype=np.uint64))
    contrib = _byte_table()[chars]
    contrib *= powers[pos_in_word]
    return _mix64(np.add.reduceat(contrib, comp_starts)), word_starts


def _split_at_spaces(buf: bytes, limit: int) -> list[bytes]:
    """``buf`` cut into pieces of about ``limit`` bytes, only at spaces (no word is cut)."""
    pieces, lo = [], 0
    while len(buf) - lo > limit:
        cut = buf.rfind(b" ", lo, lo + limit)
        if cut <= lo:  # one giant "word": cut at the next space (or the end)
            cut = buf.find(b" ", lo + limit)
            if cut < 0:
                break
        pieces.append(buf[lo:cut])
        lo = cut + 1
    pieces.append(buf[lo:])
    return pieces


def _docs_word_hashes(parts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Word hashes of simplified documents: ((W,) uint64 concatenated, (N,) int64 words per doc).

    Documents are cut at spaces into pieces of <= ``_PIECE_BYTES`` and pieces are hashed in
    groups of about that size (joined by a space, so words never cross a piece), which bounds
    the temporaries whatever the size of one document.
    """
    pieces: list[bytes] = []
    piece_doc: list[int] = []
    for i, part in enumerate(parts):
        split = _split_at_spaces(part, _PIECE_BYTES) if len(part) > _PIECE_BYTES else [part]
        pieces.extend(split)
        piece_doc.extend([i] * len(split))
    hashes: list[np.ndarray] = []
    words_per_piece = np.zeros(len(pieces), dtype=np.int64)
    lo = 0
    while lo < len(pieces):
        hi, size = lo, 0
        while hi < len(pieces) and (hi == lo or size + len(pieces[hi]) <= _PIECE_BYTES):
            size += len(pieces[hi]) + 1
            hi += 1
        piece_starts = np.zeros(hi - lo + 1, dtype=np.int64)
        np.cumsum([len(p) + 1 for p in pieces[lo:hi]], out=piece_starts[1:])
        words_W, word_pos = _word_hashes(b" ".join(pieces[lo:hi]))
        words_per_piece[lo:hi] = np.diff(np.searchsorted(word_pos, piece_starts))
        hashes.append(words_W)
        lo = hi
    num_words = np.bincount(np.asarray(piece_doc, dtype=np.int64), weights=words_per_piece,
                            minlength=len(parts)).astype(np.int64)
    words_W = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
    return words_W, num_words


def _batch_shingles(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of a batch: (S,) uint64 concatenated, and (N+1,) int64 offsets into it."""
    parts: list[bytes] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"document {i} of the batch: text must be str, got {type(text).__name__}")
        parts.append(_simplified_bytes(text))
    words_W, num_words = _docs_word_hashes(parts)
    word_starts = np.zeros(len(parts), dtype=np.int64)
    np.cumsum(num_words[:-1], out=word_starts[1:])
    word_ends = word_starts + num_words
    coeffs = _shingle_coeffs(ngram)

    # Window hash at every word position of the concatenation (zero-padded at the very end).
    total = len(words_W)
    padded = np.concatenate([words_W, np.zeros(ngram, dtype=np.uint64)])
    comb_W = padded[:total] * coeffs[0]
    for k in range(1, ngram):
        comb_W += padded[k : k + total] * coeffs[k]
    # Keep windows that end inside their document: drop each document's last ngram-1 starts.
    valid = np.ones(total, dtype=bool)
    for k in range(1, ngram):
        pos = word_ends - k
        valid[pos[pos >= word_starts]] = False
    # Documents with 1..ngram-1 words: one shingle of all their words.
    for i in np.flatnonzero((num_words > 0) & (num_words < ngram)):
        w = words_W[word_starts[i] : word_ends[i]]
        comb_W[word_starts[i]] = np.sum(w * coeffs[: len(w)], dtype=np.uint64)
        valid[word_starts[i]] = True
    num_shingles = np.where(num_words >= ngram, num_words - ngram + 1, np.minimum(num_words, 1))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(num_shingles, out=offsets[1:])
    return _mix64(comb_W[valid]), offsets


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """(S,) uint64 hashes of one document's word n-gram shingles (with repeats)."""
    shingles_S, _ = _batch_shingles([text], ngram)
    return shingles_S


def _signatures_from_shingles(
    shingles_S: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int, chunk_size: int
) -> np.ndarray:
    """(N, H) uint64 min-hashes; the (H x chunk) block is the only large temporary."""
    a_H, b_H = _perm_params(num_perm, seed)
    a_H1, b_H1 = a_H[:, None], b_H[:, None]
    num_docs = len(offsets) - 1
    sig_HN = np.full((num_perm, num_docs), EMPTY, dtype=np.uint64)
    total = int(offsets[-1])
    doc_ends = offsets[1:]
    buf_HC = np.empty((num_perm, min(chunk_size, max(total, 1))), dtype=np.uint64)
    for lo in range(0, total, chunk_size):
        hi = min(lo + chunk_size, total)
        block_HC = buf_HC[:, : hi - lo]
        # uint64 arithmetic wraps mod 2^64, which is exactly the hash family we want.
        np.multiply(a_H1, shingles_S[lo:hi][None, :], out=block_HC)
        block_HC += b_H1
        # Documents with shingles in [lo, hi): first is the one containing shingle lo.
        first = int(np.searchsorted(doc_ends, lo, side="right"))
        last = int(np.searchsorted(doc_ends, hi - 1, side="right"))
        docs = np.arange(first, last + 1)
        docs = docs[offsets[docs + 1] > offsets[docs]]  # skip empty documents (no segment)
        seg_starts = np.maximum(offsets[docs], lo) - lo
        mins_HD = np.minimum.reduceat(block_HC, seg_starts, axis=1)
        np.minimum(sig_HN[:, docs], mins_HD, out=mins_HD)
        sig_HN[:, docs] = mins_HD
    return np.ascontiguousarray(sig_HN.T)


def compute_signatures(
    texts: Iterable[str],
    num_perm: int = 112,
    ngram: int = 5,
    seed: int = 0,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_docs: int = 2048,
) -> np.ndarray:
    """(N, num_perm) uint64 MinHash signatures of ``texts`` (empty documents: all 2^64-1).

    Deterministic: depends only on each text, ``num_perm``, ``ngram`` and ``seed`` (not on the
    batch it was computed in, nor on ``chunk_size``/``batch_docs``).
    """
    if num_perm < 1 or ngram < 1 or chunk_size < 1 or batch_docs < 1:
        raise ValueError(f"num_perm, ngram, chunk_size, batch_docs must be >= 1, got "
                         f"{num_perm}, {ngram}, {chunk_size}, {batch_docs}")
    parts: list[np.ndarray] = []
    batch: list[str] = []
    batch_chars = 0

    def flush() -> None:
        shingles_S, offsets = _batch_shingles(batch, ngram)
        parts.append(_signatures_from_shingles(shingles_S, offsets, num_perm, seed, chunk_size))
        batch.clear()

    for text in texts:
        batch.append(text)
        batch_chars += len(text) if isinstance(text, str) else 0
        # The per-word arrays of a batch cost ~50 bytes per character: cap a batch at ~4M chars.
        if len(batch) >= batch_docs or batch_chars >= 4 * _PIECE_BYTES:
            flush()
            batch_chars = 0
    if batch or not parts:
        flush()
    return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _unzip_docs(docs: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    texts: list[str] = []
    for i, item in enumerate(docs):
        try:
            doc_id, text = item
        except (TypeError, ValueError):
            raise ValueError(f"document {i}: expected a (doc_id, text) pair, got {type(item).__name__}") from None
        if not isinstance(doc_id, str):
            raise TypeError(f"document {i}: id must be str, got {type(doc_id).__name__}")
        if not isinstance(text, str):
            raise TypeError(f"document {doc_id!r}: text must be str, got {type(text).__name__}")
        ids.append(doc_id)
        texts.append(text)
    return ids, texts
