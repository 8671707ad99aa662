"""Token shards: the on-store layout, a streaming writer and a memory-mapped reader.

Layout of one token artefact (``datasets/<name>/tokens/<hash>/``, committed atomically
through ``store.write_artifact``)::

    tokenizer.json           the tokenizer that produced the ids
    meta.json                dtype, vocab_size, bos/eos/pad ids, doc_format, the inputs by
                             content (curated_content_hash, tokenizer_key), per split:
                             num_tokens, num_docs, shards [{bin, idx, offset, num_tokens, num_docs}]
    train-00000.bin          raw little-endian uint16/uint32 token ids, no header
    train-00000.idx.npy      int64 start offsets (local to the shard) of the documents
                             that *start* in this shard
    val-00000.bin ...        the same for the validation split

Choices:

* **Document format** ``[bos] + tokens + [eos]``: a BOS at every document start lets the
  pretraining loader pack sequences that begin on a document (BOS-aligned packing); the
  EOS keeps "end of document" in the loss, so a model learns to stop.
* **Dtype** uint16 when every id fits (vocab_size <= 65,536: ids 0..65,535), else uint32.
* **Shards have exactly ``shard_tokens`` tokens** (the last one fewer), so their size is
  bounded whatever the documents are (a 100 MB document does not make a 100 MB shard).
  A document may therefore continue into the next shard(s); readers use the *global*
  ``doc_starts`` and ``tokens(start, length)`` reads across shard boundaries, so nobody
  needs to care.

Shape suffixes: ``_N`` one entry per token, ``_D`` one per document.

``TokenDataset.open`` downloads one split into a local cache keyed by the artefact's
content hash (files verified against the manifest's sha256, a valid cached copy reused,
a corrupt one fetched again), then memory-maps the shards. A verified copy is stamped
with each file's size and mtime, so later opens skip re-hashing unless a file changed.
Pickling a TokenDataset (to ship it to a Ray worker) sends paths, not tokens; the worker
re-maps the same files (or downloads them, on a node without the cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DOC_FORMAT = "bos+text+eos"
META_NAME = "meta.json"
LINEAGE_KEYS = ("curated_uri", "tokenizer_uri")  # manifest metadata merged into TokenDataset.meta
TOKENIZER_NAME = "tokenizer.json"
SPLITS = ("train", "val")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 if every token id (0 .. vocab_size-1) fits in 16 bits, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size={vocab_size} does not fit in uint32 token ids")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_names(split: str, index: int) -> tuple[str, str]:
    return f"{split}-{index:05d}.bin", f"{split}-{index:05d}.idx.npy"


# ---------------------------------------------------------------- writer
@dataclass
class ShardInfo:
    bin: str
    idx: str
    offset: int  # global position of the shard's first token
    num_tokens: int
    num_docs: int  # documents that start in this shard


@dataclass
class ShardWriter:
    """Cuts a stream of documents into shards of exactly ``shard_tokens`` tokens.

    ``add(tokens_N, lengths_D)`` takes already-wrapped documents (bos..eos) in order.
    Each finished shard is written to ``tmp_dir`` and handed to ``on_shard(name, path)``
    (which uploads it and may delete it), so local disk holds at most one shard.
    """

    split: str
    shard_tokens: int
    dtype: np.dtype
    tmp_dir: Path
    on_shard: Callable[[str, Path], None]
    shards: list[ShardInfo] = field(default_factory=list)
    num_tokens: int = 0  # tokens handed to add() so far
    num_docs: int = 0
    _pending: list[np.ndarray] = field(default_factory=list)  # token arrays not yet in a shard
    _pending_starts: list[np.ndarray] = field(default_factory=list)  # their docs' global starts
    _num_pending: int = 0
    _closed: bool = False

    def __post_init__(self):
        if self.shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {self.shard_tokens}")
        self.dtype = np.dtype(self.dtype)
        self.tmp_dir = Path(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def add(self, tokens_N: np.ndarray, lengths_D: np.ndarray) -> None:
        if self._closed:
            raise RuntimeError(f"ShardWriter({self.split}) is closed")
        lengths_D = np.asarray(lengths_D, dtype=np.int64)
        if int(lengths_D.sum()) != len(tokens_N):
            raise ValueError(f"lengths sum to {int(lengths_D.sum())} but {len(tokens_N)} tokens were given")
        if len(lengths_D) == 0:
            return
        starts_D = self.num_tokens + np.concatenate([[0], np.cumsum(lengths_D)[:-1]]).astype(np.int64)
        self._pending.append(np.asarray(tokens_N))
        self._pending_starts.append(starts_D)
        self._num_pending += len(tokens_N)
        self.num_tokens += len(tokens_N)
        self.num_docs += len(lengths_D)
        while self._num_pending >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> dict:
        """Writes the last (short) shard; returns the split's entry for meta.json."""
        if not self._closed:
            if self._num_pending:
                self._flush(self._num_pending)
            self._closed = True
        return {
            "num_tokens": self.num_tokens,
            "num_docs": self.num_docs,
            "shards": [vars(s) for s in self.shards],
        }

    def _flush(self, count: int) -> None:
        tokens = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        starts = np.concatenate(self._pending_starts) if self._pending_starts else np.empty(0, np.int64)
        offset = self.num_tokens - self._num_pending  # global index of tokens[0]
        head, rest = tokens[:count], tokens[count:]
        in_shard = starts < offset + count
        local_starts = (starts[in_shard] - offset).astype(np.int64)
        self._pending = [rest] if len(rest) else []
        self._pending_starts = [starts[~in_shard]] if (~in_shard).any() else []
        self._num_pending = len(rest)

        bin_name, idx_name = shard_names(self.split, len(self.shards))
        bin_path, idx_path = self.tmp_dir / bin_name, self.tmp_dir / idx_name
        head.astype(self.dtype, copy=False).tofile(bin_path)
        np.save(idx_path, local_starts)
        self.shards.append(ShardInfo(bin_name, idx_name, int(offset), int(count), int(len(local_starts))))
        self.on_shard(bin_name, bin_path)
        self.on_shard(idx_name, idx_path)


# ---------------------------------------------------------------- reader
def _default_cache_root() -> Path:
    from moeflow.platform.settings import get_settings

    return Path(get_settings().home) / "cache"


@contextlib.contextmanager
def _dir_lock(directory: Path):
    """An exclusive lock on a cache folder: several ranks on one machine download once."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# A verified cache is stamped with (sha256, size, mtime) per file, so re-opening it (every
# rank, every resume) does not re-hash gigabytes; any rewrite of a file changes its mtime
# and sends it back through the checksum-verified download.
def _stamp_path(local_dir: Path, split: str) -> Path:
    return local_dir / f".verified-{split}.json"


def _file_state(local_dir: Path, art, names: list[str]) -> dict | None:
    state = {}
    for name in names:
        path = local_dir / name
        if not path.is_file():
            return None
        st = path.stat()
        state[name] = [art.files[name]["sha256"], st.st_size, st.st_mtime_ns]
    return state


def _stamp_matches(local_dir: Path, split: str, art, names: list[str]) -> bool:
    stamp = _stamp_path(local_dir, split)
    if not stamp.is_file():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except ValueError:
        return False
    state = _file_state(local_dir, art, names)
    return state is not None and state == recorded and all(
        state[n][1] == art.files[n]["size"] for n in names)


def _write_stamp(local_dir: Path, split: str, art, names: list[str]) -> None:
    state = _file_state(local_dir, art, names)
    tmp = _stamp_path(local_dir, split).with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(_stamp_path(local_dir, split))


class TokenDataset:
    """One split of a token artefact, memory-mapped; global random access over all its shards.

    ``tokens(start, length)`` returns int64 ids; ``doc_starts`` (num_docs,) holds global
    start offsets of documents (each starts with ``meta["bos_id"]``).
    """

    def __init__(self, uri: str, split: str, local_dir: Path, meta: dict, content_hash: str):
        self.uri = uri
        self.split = split
        self.local_dir = Path(local_dir)
        self.content_hash = content_hash
        self._meta_json = meta
        info = meta["splits"][split]
        # meta: meta.json's top level plus this split's numbers. "bytes_per_token" here is
        # text bytes per *stored* token (bos/eos included), the divisor that turns a mean
        # loss per token into bits per byte: bpb = loss_nats / ln(2) / bytes_per_token.
        self.meta = {
            **{k: v for k, v in meta.items() if k != "splits"},
            "split": split,
            "num_tokens": int(info["num_tokens"]),
            "num_docs": int(info["num_docs"]),
            "num_text_bytes": int(info.get("num_text_bytes", 0)),
            "bytes_per_token": int(info.get("num_text_bytes", 0)) / max(1, int(info["num_tokens"])),
        }
        self.dtype = np.dtype(meta["dtype"])
        self.shards: list[dict] = info["shards"]
        self.num_tokens = int(info["num_tokens"])
        self.num_docs = int(info["num_docs"])
        self.vocab_size = int(meta["vocab_size"])
        self.bos_id, self.eos_id, self.pad_id = int(meta["bos_id"]), int(meta["eos_id"]), int(meta["pad_id"])
        self._map()

    def _map(self) -> None:
        self._arrays = []
        starts = []
        for shard in self.shards:
            path = self.local_dir / shard["bin"]
            expected = shard["num_tokens"] * self.dtype.itemsize
            if path.stat().st_size != expected:
                raise ValueError(f"{path} holds {path.stat().st_size} bytes, meta.json says {expected}")
            self._arrays.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["num_tokens"],)))
            starts.append(np.load(self.local_dir / shard["idx"]).astype(np.int64) + int(shard["offset"]))
        # (num_shards + 1,) global offsets of shard boundaries
        self.shard_offsets = np.array([s["offset"] for s in self.shards] + [self.num_tokens], dtype=np.int64)
        self.doc_starts = np.concatenate(starts) if starts else np.empty(0, np.int64)
        if len(self.doc_starts) != self.num_docs:
            raise ValueError(f"{self.uri} split {self.split!r}: {len(self.doc_starts)} doc offsets, meta says {self.num_docs}")

    # ---- construction
    @classmethod
    def open(cls, uri: str, split: str = "train", cache_dir: str | Path | None = None,
             verify: bool = False) -> TokenDataset:
        """Downloads (or reuses a verified cached copy of) one split and memory-maps it.

        Files go to ``<cache_dir>/<content hash>/``; ``cache_dir`` defaults to
        ``<settings.home>/cache``.

        ``verify=True`` re-hashes every cached file even when its stamp matches (the stamp
        cannot see a change that keeps a file's size and mtime, such as silent bit rot).
        """
        from moeflow.platform.store import store_for_uri

        store, key = store_for_uri(uri)
        art = store.read_artifact(key)
        meta = art.get_json(META_NAME)
        # lineage by location (curated_uri, tokenizer_uri) lives in the manifest metadata, outside the
        # hashed content; artefacts written before that keep it in meta.json, which then wins
        meta = {**{k: art.metadata[k] for k in LINEAGE_KEYS if art.metadata.get(k)}, **meta}
        if split not in meta.get("splits", {}):
            raise ValueError(f"{uri} has no split {split!r}; it has {sorted(meta.get('splits', {}))}")
        info = meta["splits"][split]
        if int(info["num_tokens"]) == 0:
            raise ValueError(f"split {split!r} of {uri} is empty (0 tokens)")
        # one folder per artefact content, so a cache root shared by many datasets never mixes files
        local_dir = (Path(cache_dir) if cache_dir is not None else _default_cache_root()) / art.content_hash
        names = [META_NAME, TOKENIZER_NAME] + [n for s in info["shards"] for n in (s["bin"], s["idx"])]
        with _dir_lock(local_dir):
            if verify or not _stamp_matches(local_dir, split, art, names):
                art.download(local_dir, names=names)  # verifies sha256; re-fetches bad files
                _write_stamp(local_dir, split, art, names)
        return cls(art.uri, split, local_dir, meta, art.content_hash)

    def tokenizer(self):
        from moeflow.models.tokenizer import Tokenizer

        return Tokenizer.from_file(self.local_dir / TOKENIZER_NAME)

    # ---- access
    def __len__(self) -> int:
        return self.num_tokens

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Ids ``[start, start + length)`` as an int64 array (length,), across shard boundaries."""
        start, length = int(start), int(length)
        if length < 0 or start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens({start}, {length}) is outside [0, {self.num_tokens}) of {self.split!r}")
        out = np.empty(length, dtype=np.int64)
        if length == 0:
            return out
        shard = int(np.searchsorted(self.shard_offsets, start, side="right")) - 1
        pos, end = start, start + length
        while pos < end:
            lo = int(self.shard_offsets[shard])
            take = min(end, int(self.shard_offsets[shard + 1])) - pos
            out[pos - start : pos - start + take] = self._arrays[shard][pos - lo : pos - lo + take]
            pos += take
            shard += 1
        return out

    def doc_length(self, i: int) -> int:
        end = self.doc_starts[i + 1] if i + 1 < self.num_docs else self.num_tokens
        return int(end - self.doc_starts[i])

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (bos .. eos), int64."""
        if not -self.num_docs <= i < self.num_docs:
            raise IndexError(f"document {i} out of range ({self.num_docs} documents in {self.split!r})")
        i %= self.num_docs
        return self.tokens(int(self.doc_starts[i]), self.doc_length(i))

    # ---- pickling: ship paths, re-map on the other side
    def __getstate__(self) -> dict:
        return {"uri": self.uri, "split": self.split, "local_dir": self.local_dir, "meta": self._meta_json,
                "content_hash": self.content_hash}

    def __setstate__(self, state: dict) -> None:
        try:
            self.__init__(**state)
        except FileNotFoundError:  # another node without this cache: fetch it there
            other = TokenDataset.open(state["uri"], state["split"])
            self.__init__(other.uri, other.split, other.local_dir, other._meta_json, other.content_hash)

    def __repr__(self) -> str:
        return (f"TokenDataset({self.uri!r}, split={self.split!r}, num_tokens={self.num_tokens}, "
                f"num_docs={self.num_docs}, dtype={self.dtype.name})")
