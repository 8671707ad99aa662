"""MinHash-LSH near-duplicate detection: signatures, banding, clusters and a persistent index.

Pipeline (DataTrove's recipe, vectorised with numpy):

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
5. Banding: ``bands x rows`` columns of the signature; each band's rows are hashed to one 64-bit
   key. Documents sharing a key in any band are candidates (sort + group per band, no dicts).
6. Optional verification: a candidate pair is kept only if the fraction of equal signature
   entries (the Jaccard estimate) is >= a threshold.
7. Connected components with an array union-find (hook larger root to smaller root, full path
   compression by pointer jumping, all in numpy); documents are ranked by id first, so each
   cluster's root is its smallest id (the one to keep) and the result does not depend on the
   input order.

S-curve ``P(candidate) = 1 - (1 - J^r)^b`` for the default 14 bands x 8 rows (112 hashes) next
to datasketch's choice for ``MinHashLSH(threshold=0.8, num_perm=128)`` (9 x 13):

    J      14x8    9x13
    0.50   0.053   0.001
    0.60   0.211   0.012
    0.70   0.565   0.084
    0.75   0.772   0.195
    0.80   0.924   0.399
    0.85   0.988   0.686
    0.90   1.000   0.929
    0.95   1.000   0.998

(14 x 8 has its 50% point at J ~ 0.68; ``near_duplicate_clusters`` therefore verifies candidates
against ``threshold - verify_margin`` to cut the false positives that the early S-curve admits.)

Shape suffixes: N documents, H hashes (num_perm), B bands, R rows per band, W words,
S shingles, C shingles in one chunk, D documents in one chunk, E candidate edges, Q queries.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import unicodedata
import zipfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "MinHashIndex",
    "choose_bands_rows",
    "clusters_from_signatures",
    "compute_signatures",
    "connected_components",
    "ids_to_drop",
    "near_duplicate_clusters",
    "s_curve",
    "shingle_hashes",
    "simplify_text",
]

EMPTY = np.uint64(2**64 - 1)  # signature entry of a document without shingles
DEFAULT_CHUNK_SIZE = 8192  # shingles per (S x H) block: 8192 * 112 * 8 B = 7.3 MB
_PIECE_BYTES = 1 << 20  # simplified text hashed per numpy pass (~40 MB of temporaries)
_SHINGLE_SALT = 0x9E3779B97F4A7C15  # fixes the shingle coefficients independently of `seed`
INDEX_FORMAT = 1

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


@lru_cache(maxsize=64)
def _band_coeffs(rows_per_band: int) -> np.ndarray:
    rng = np.random.default_rng([rows_per_band, 0xBA4D])
    return rng.integers(0, 2**63, size=rows_per_band, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


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
# Banding maths
# --------------------------------------------------------------------------------------------


def s_curve(j: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(a pair with Jaccard ``j`` shares at least one of ``bands`` bands of ``rows`` rows)."""
    return 1.0 - (1.0 - np.power(j, rows)) ** bands


def choose_bands_rows(threshold: float, num_perm: int, min_recall: float = 0.9) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm for a Jaccard ``threshold``.

    Takes the most rows per band (steepest curve, fewest false positives) whose S-curve still
    catches a pair exactly at ``threshold`` with probability >= ``min_recall``, using as many
    bands as fit. ``choose_bands_rows(0.8, 112) == (14, 8)``; for 128 hashes it is (16, 8).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if s_curve(threshold, bands, rows) >= min_recall:
            return bands, rows
    return num_perm, 1


def band_keys(sigs: np.ndarray, num_bands: int, rows_per_band: int) -> np.ndarray:
    """(N, B) uint64 key per band: the band's R signature values hashed to one word."""
    sigs = np.asarray(sigs, dtype=np.uint64)
    if sigs.ndim != 2 or sigs.shape[1] < num_bands * rows_per_band:
        raise ValueError(f"signatures of shape {sigs.shape} have fewer than "
                         f"{num_bands} x {rows_per_band} columns")
    sig_NBR = sigs[:, : num_bands * rows_per_band].reshape(len(sigs), num_bands, rows_per_band)
    coeffs_R = _band_coeffs(rows_per_band)
    keys_NB = np.zeros((len(sigs), num_bands), dtype=np.uint64)
    for r in range(rows_per_band):
        keys_NB += _mix64(sig_NBR[:, :, r].copy()) * coeffs_R[r]
    return _mix64(keys_NB)


# --------------------------------------------------------------------------------------------
# Candidate edges and union-find
# --------------------------------------------------------------------------------------------

_ALL_PAIRS_MAX_GROUP = 32  # with verification, buckets up to this size give all pairs, larger a star


def _bucket_edges(keys_N: np.ndarray, rank_N: np.ndarray, all_pairs: bool) -> tuple[np.ndarray, np.ndarray]:
    """Edges (u_E, v_E) between documents (given by rank) sharing a key, u < v.

    Without verification a star from the smallest member is enough for connectivity. With
    verification a failed star edge could cut off members that match each other, so small
    buckets yield all their pairs.
    """
    order = np.lexsort((rank_N, keys_N))
    keys_sorted, ranks_sorted = keys_N[order], rank_N[order]
    is_start = np.ones(len(order), dtype=bool)
    is_start[1:] = keys_sorted[1:] != keys_sorted[:-1]
    starts = np.flatnonzero(is_start)
    sizes = np.diff(np.append(starts, len(order)))
    us, vs = [], []
    star = sizes > (_ALL_PAIRS_MAX_GROUP if all_pairs else 1)
    if star.any():
        group_of = np.cumsum(is_start) - 1
        member = ~is_start & star[group_of]
        us.append(ranks_sorted[starts[group_of[member]]])
        vs.append(ranks_sorted[member])
    if all_pairs:
        for size in np.unique(sizes[(sizes >= 2) & ~star]):
            members_GK = ranks_sorted[starts[sizes == size][:, None] + np.arange(size)]
            iu, iv = np.triu_indices(int(size), k=1)
            us.append(members_GK[:, iu].ravel())
            vs.append(members_GK[:, iv].ravel())
    if not us:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(us), np.concatenate(vs)


def connected_components(num_nodes: int, u_E: np.ndarray, v_E: np.ndarray) -> np.ndarray:
    """(num_nodes,) root of each node = smallest node index of its component.

    Array union-find in rounds: every edge whose endpoints have different roots hooks the larger
    root under the smaller (union by index, ``np.minimum.at`` resolves races), then pointer
    jumping compresses every path. Parents only ever decrease, so no cycles; edges already
    inside one component are dropped for good after each round.
    """
    parent = np.arange(num_nodes, dtype=np.int64)
    u_E, v_E = np.asarray(u_E, np.int64), np.asarray(v_E, np.int64)
    while len(u_E):
        ru, rv = parent[u_E], parent[v_E]
        active = ru != rv
        if not active.any():
            break
        u_E, v_E, ru, rv = u_E[active], v_E[active], ru[active], rv[active]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
        while True:  # full path compression
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


def _estimated_jaccard(sigs: np.ndarray, u_E: np.ndarray, v_E: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    out = np.empty(len(u_E), dtype=np.float64)
    for lo in range(0, len(u_E), chunk):
        hi = lo + chunk
        out[lo:hi] = (sigs[u_E[lo:hi]] == sigs[v_E[lo:hi]]).mean(axis=1)
    return out


# --------------------------------------------------------------------------------------------
# Clusters
# --------------------------------------------------------------------------------------------


def _check_ids(ids: Sequence[str], num_rows: int) -> np.ndarray:
    ids_arr = np.asarray(list(ids), dtype=str) if len(ids) else np.empty(0, dtype="<U1")
    if len(ids_arr) != num_rows:
        raise ValueError(f"{len(ids_arr)} ids for {num_rows} signatures")
    order = np.argsort(ids_arr, kind="stable")
    sorted_ids = ids_arr[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(dup):
        raise ValueError(f"duplicate document id {str(sorted_ids[dup[0]])!r}")
    return order


def clusters_from_signatures(
    ids: Sequence[str],
    sigs: np.ndarray,
    num_bands: int = 14,
    rows_per_band: int = 8,
    threshold: float | None = None,
) -> list[set[str]]:
    """Near-duplicate clusters (sets of >= 2 ids) from (N, H) signatures.

    Candidates share a band key; with ``threshold`` a candidate pair is kept only when its
    estimated Jaccard (fraction of equal signature entries) is >= ``threshold``. Clusters are
    connected components; they come sorted by their smallest id, which is the one to keep.
    Documents without shingles (empty signature) are never clustered. The result does not
    depend on the order of ``ids``.
    """
    sigs = np.asarray(sigs)
    if sigs.dtype != np.uint64 or sigs.ndim != 2:
        raise ValueError(f"signatures must be a 2-d uint64 array, got {sigs.dtype} {sigs.shape}")
    order = _check_ids(ids, len(sigs))
    ids_sorted = np.asarray(list(ids), dtype=object)[order]
    sigs = sigs[order]  # row index == rank of the id, so the smallest index is the smallest id
    nonempty = np.flatnonzero(~(sigs == EMPTY).all(axis=1))
    keys_NB = band_keys(sigs[nonempty], num_bands, rows_per_band)
    u_parts, v_parts = [], []
    for b in range(num_bands):
        u, v = _bucket_edges(keys_NB[:, b], nonempty, all_pairs=threshold is not None)
        u_parts.append(u)
        v_parts.append(v)
    u_E = np.concatenate(u_parts)
    v_E = np.concatenate(v_parts)
    if len(u_E):
        codes = np.unique(u_E * len(sigs) + v_E)  # each pair once, whatever band found it
        u_E, v_E = codes // len(sigs), codes % len(sigs)
    if threshold is not None and len(u_E):
        keep = _estimated_jaccard(sigs, u_E, v_E) >= threshold
        u_E, v_E = u_E[keep], v_E[keep]
    roots = connected_components(len(sigs), u_E, v_E)
    members = np.flatnonzero(roots != np.arange(len(sigs)))
    if not len(members):
        return []
    by_root = np.lexsort((members, roots[members]))
    members = members[by_root]
    member_roots = roots[members]
    cut = np.flatnonzero(np.diff(member_roots)) + 1
    return [
        {ids_sorted[root], *ids_sorted[group].tolist()}
        for root, group in zip(member_roots[np.r_[0, cut]], np.split(members, cut))
    ]


def ids_to_drop(clusters: Iterable[set[str]]) -> set[str]:
    """Every member except the smallest id (the keeper) of each cluster."""
    return {doc_id for cluster in clusters for doc_id in cluster if doc_id != min(cluster)}


def near_duplicate_clusters(
    docs: Iterable[tuple[str, str]],
    threshold: float = 0.8,
    num_bands: int = 14,
    rows_per_band: int = 8,
    ngram: int = 5,
    seed: int = 0,
    verify_margin: float | None = 0.05,
) -> list[set[str]]:
    """Clusters of near-duplicate documents, each a set of >= 2 ids, sorted by smallest id.

    ``docs`` are ``(doc_id, text)`` pairs. Banding (``num_bands x rows_per_band`` hashes) finds
    candidates; with ``verify_margin`` set, candidates whose estimated Jaccard is below
    ``threshold - verify_margin`` are dropped. The estimate's standard deviation with 112 hashes
    is sqrt(J(1-J)/112), ~0.038 at J = 0.8, so the default margin of 0.05 keeps ~91% of pairs at
    exactly J = 0.8, > 99.9% at J >= 0.85, and ~1.5% of J = 0.65 pairs (the S-curve alone lets
    ~36% of those through). ``verify_margin=None`` keeps every banded candidate.
    """
    ids, texts = _unzip_docs(docs)
    if not ids:
        return []
    sigs = compute_signatures(texts, num_perm=num_bands * rows_per_band, ngram=ngram, seed=seed)
    verify = None if verify_margin is None else threshold - verify_margin
    return clusters_from_signatures(ids, sigs, num_bands, rows_per_band, threshold=verify)


# --------------------------------------------------------------------------------------------
# Persistent index (dedup a later dataset against an earlier one)
# --------------------------------------------------------------------------------------------


class MinHashIndex:
    """LSH index over earlier documents' signatures, saved as a deterministic ``.npz``.

    Holds the ids, the (N, B) band keys and, with ``keep_signatures``, the (N, H) signatures
    (needed for verified queries; 8 bytes per hash per document). Queries sort each band's keys
    once and answer with ``searchsorted``. The hashing parameters (bands, rows, ngram, seed) are
    stored in the file and checked on load and on merge: signatures made with other parameters
    would silently never match.
    """

    def __init__(self, num_bands: int = 14, rows_per_band: int = 8, *, ngram: int = 5, seed: int = 0,
                 keep_signatures: bool = True) -> None:
        if num_bands < 1 or rows_per_band < 1 or ngram < 1:
            raise ValueError(f"num_bands, rows_per_band, ngram must be >= 1, got "
                             f"{num_bands}, {rows_per_band}, {ngram}")
        self.num_bands, self.rows_per_band, self.ngram, self.seed = num_bands, rows_per_band, ngram, seed
        self.keep_signatures = keep_signatures
        self._ids = np.empty(0, dtype="<U1")
        self._keys_NB = np.empty((0, num_bands), dtype=np.uint64)
        self._sigs_NH = np.empty((0, self.num_perm), dtype=np.uint64) if keep_signatures else None
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None  # (keys_BN, rows_BN), built lazily

    # -- parameters ---------------------------------------------------------------------------
    @property
    def num_perm(self) -> int:
        return self.num_bands * self.rows_per_band

    def params(self) -> dict:
        return {"format": INDEX_FORMAT, "num_bands": self.num_bands, "rows_per_band": self.rows_per_band,
                "ngram": self.ngram, "seed": self.seed, "keep_signatures": self.keep_signatures,
                "hash_family": "poly-word/linear-shingle/a*x+b mod 2^64 v1"}

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        return self._ids.tolist()

    def _check_sigs(self, sigs: np.ndarray) -> np.ndarray:
        sigs = np.asarray(sigs)
        if sigs.dtype != np.uint64 or sigs.ndim != 2 or sigs.shape[1] != self.num_perm:
            raise ValueError(f"signatures must be uint64 of shape (N, {self.num_perm}), "
                             f"got {sigs.dtype} {sigs.shape}")
        return sigs

    # -- building -----------------------------------------------------------------------------
    def add(self, ids: Sequence[str], sigs: np.ndarray) -> None:
        """Index ``ids`` with their (N, H) signatures; ids must be new and unique."""
        sigs = self._check_sigs(sigs)
        new_ids = np.asarray(list(ids), dtype=str) if len(ids) else np.empty(0, dtype="<U1")
        _check_ids(new_ids, len(sigs))
        clash = np.intersect1d(self._ids, new_ids)
        if len(clash):
            raise ValueError(f"document id {str(clash[0])!r} is already in the index")
        self._ids = np.concatenate([self._ids, new_ids])
        self._keys_NB = np.concatenate([self._keys_NB, band_keys(sigs, self.num_bands, self.rows_per_band)])
        if self._sigs_NH is not None:
            self._sigs_NH = np.concatenate([self._sigs_NH, sigs])
        self._sorted = None

    def add_documents(self, docs: Iterable[tuple[str, str]]) -> None:
        """Signs ``(doc_id, text)`` pairs with the index's parameters and adds them."""
        ids, texts = _unzip_docs(docs)
        self.add(ids, compute_signatures(texts, self.num_perm, self.ngram, self.seed))

    def merge(self, other: MinHashIndex) -> MinHashIndex:
        """A new index holding this index's documents followed by ``other``'s."""
        _check_same_params(self.params(), other.params(), "merge")
        merged = MinHashIndex(self.num_bands, self.rows_per_band, ngram=self.ngram, seed=self.seed,
                              keep_signatures=self.keep_signatures)
        clash = np.intersect1d(self._ids, other._ids)
        if len(clash):
            raise ValueError(f"cannot merge: document id {str(clash[0])!r} is in both indexes")
        merged._ids = np.concatenate([self._ids, other._ids])
        merged._keys_NB = np.concatenate([self._keys_NB, other._keys_NB])
        if self._sigs_NH is not None:
            merged._sigs_NH = np.concatenate([self._sigs_NH, other._sigs_NH])
        return merged

    def _sorted_bands(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys_BN sorted per band, rows_BN): ties ordered by insertion, so saving is deterministic."""
        if self._sorted is None:
            n = len(self._ids)
            rows_BN = np.empty((self.num_bands, n), dtype=np.int64)
            keys_BN = np.empty((self.num_bands, n), dtype=np.uint64)
            for b in range(self.num_bands):
                rows_BN[b] = np.argsort(self._keys_NB[:, b], kind="stable")
                keys_BN[b] = self._keys_NB[rows_BN[b], b]
            self._sorted = (keys_BN, rows_BN)
        return self._sorted

    # -- querying -----------------------------------------------------------------------------
    def query(self, sigs: np.ndarray, threshold: float | None = None) -> list[list[str]]:
        """For each (H,) signature row: the sorted ids of indexed documents sharing a band.

        With ``threshold``, only matches whose estimated Jaccard is >= ``threshold`` (needs
        ``keep_signatures``). A query without shingles (empty signature) matches nothing.
        """
        sigs = self._check_sigs(sigs)
        if threshold is not None and self._sigs_NH is None:
            raise ValueError("threshold needs an index built with keep_signatures=True")
        keys_BN, rows_BN = self._sorted_bands()
        qkeys_QB = band_keys(sigs, self.num_bands, self.rows_per_band)
        q_parts, r_parts = [], []
        for b in range(self.num_bands):
            lo = np.searchsorted(keys_BN[b], qkeys_QB[:, b], side="left")
            hi = np.searchsorted(keys_BN[b], qkeys_QB[:, b], side="right")
            counts = hi - lo
            q = np.repeat(np.arange(len(sigs)), counts)
            pos = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
            q_parts.append(q)
            r_parts.append(rows_BN[b][pos])
        q_M = np.concatenate(q_parts) if q_parts else np.empty(0, np.int64)
        r_M = np.concatenate(r_parts) if r_parts else np.empty(0, np.int64)
        empty_q = (sigs == EMPTY).all(axis=1)
        keep = ~empty_q[q_M]
        q_M, r_M = q_M[keep], r_M[keep]
        pairs = np.unique(np.stack([q_M, r_M], axis=1), axis=0) if len(q_M) else np.empty((0, 2), np.int64)
        if threshold is not None and len(pairs):
            est = (sigs[pairs[:, 0]] == self._sigs_NH[pairs[:, 1]]).mean(axis=1)
            pairs = pairs[est >= threshold]
        out: list[list[str]] = [[] for _ in range(len(sigs))]
        for q, r in zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()):
            out[q].append(self._ids[r])
        return [sorted(map(str, hits)) for hits in out]

    def query_documents(self, docs: Iterable[tuple[str, str]], threshold: float | None = None) -> dict[str, list[str]]:
        """``{doc_id: [earlier ids it near-duplicates]}`` for the documents that have matches."""
        ids, texts = _unzip_docs(docs)
        hits = self.query(compute_signatures(texts, self.num_perm, self.ngram, self.seed), threshold)
        return {doc_id: h for doc_id, h in zip(ids, hits) if h}

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Writes the index atomically; the bytes depend only on the added documents."""
        path = Path(path)
        keys_BN, rows_BN = self._sorted_bands()
        arrays = {
            "params": np.asarray(json.dumps(self.params(), sort_keys=True)),
            "ids": self._ids.astype(str),
            "band_keys": keys_BN,
            "band_rows": rows_BN,
        }
        if self._sigs_NH is not None:
            arrays["signatures"] = self._sigs_NH
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                # A fixed timestamp keeps the file byte-identical across saves (np.savez uses "now").
                zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, **expected) -> MinHashIndex:
        """Reads an index; ``expected`` parameters (e.g. ``num_bands=14, seed=0``) must match."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                params = json.loads(data["params"].item())
                ids, keys_BN, rows_BN = data["ids"], data["band_keys"], data["band_rows"]
                sigs = data["signatures"] if "signatures" in data.files else None
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a readable MinHash index ({exc})") from exc
        if params.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path}: index format {params.get('format')!r}, expected {INDEX_FORMAT}")
        for name, value in expected.items():
            if name not in params:
                raise ValueError(f"unknown index parameter {name!r}")
            if params[name] != value:
                raise ValueError(f"{path}: index has {name}={params[name]!r}, expected {value!r}")
        index = cls(params["num_bands"], params["rows_per_band"], ngram=params["ngram"], seed=params["seed"],
                    keep_signatures=params["keep_signatures"])
        n = len(ids)
        if keys_BN.shape != (index.num_bands, n) or rows_BN.shape != (index.num_bands, n) or (
                sigs is not None and sigs.shape != (n, index.num_perm)):
            raise ValueError(f"{path}: array shapes do not match {n} documents x {index.num_bands} bands")
        keys_NB = np.empty((n, index.num_bands), dtype=np.uint64)
        for b in range(index.num_bands):
            keys_NB[rows_BN[b], b] = keys_BN[b]
        index._ids, index._keys_NB, index._sigs_NH = ids, keys_NB, sigs
        index._sorted = (keys_BN, rows_BN)
        return index


def _check_same_params(mine: dict, theirs: dict, what: str) -> None:
    for name in ("num_bands", "rows_per_band", "ngram", "seed", "keep_signatures", "hash_family"):
        if mine.get(name) != theirs.get(name):
            raise ValueError(f"cannot {what}: {name} differs ({mine.get(name)!r} vs {theirs.get(name)!r})")


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
