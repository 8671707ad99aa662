"""The tokenize stage as a library function: curated artefact -> tokenizer + token shards artefact.

``run_tokenize(config, store, curated_uri=..., output_prefix=...)``:

1. **Scan** the curated parquet parts once (ids and byte lengths only) and decide, per
   document id, the split and the tokenizer-training sample. Both are pure functions of
   the id (salted blake2b), so they do not depend on worker count, part order or batch
   size. ``val_fraction`` of the documents go to ``val`` (at least one when the fraction
   is positive and there are two documents or more). The BPE sample takes *train*
   documents in id-hash order until ``max_train_bytes``: a random-looking, reproducible
   sample with an exact byte budget, so a big corpus never has to fit in memory.
2. **Train** byte-level BPE (``moeflow.models.tokenizer.train_bpe``) on that sample, or
   load ``config.tokenizer_uri`` to reuse an existing tokenizer. The tokenizer is also
   written as its own small artefact ``tokenizers/<sha256 of tokenizer.json>[:16]/``.
3. **Encode** batches of documents with ``parallel_map`` (Ray when ``num_workers > 1``,
   inline otherwise) in windows, and append the results *in document order* to one
   ``ShardWriter`` per split: the shards are byte-identical for any worker count.
4. **Commit** one artefact ``<output_prefix>/<hash>/`` (``shards.py`` describes the
   layout) whose hash covers the curated content hash and every config field that can
   change the output. A re-run that finds it committed returns it without work; a killed
   run leaves only staging files, which readers never see.

Shape suffixes: ``_N`` one entry per token, ``_D`` one per document.

Empty documents are skipped and counted (they would only add bos+eos). The curated parts
are read here column-wise (``id``/``text`` only, pass 1 without building Documents) rather
than through ``documents.iter_artifact_documents``: the scan pass needs only ids and byte
lengths, and both passes read the same downloaded, checksum-verified local copies.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field

from moeflow.models.tokenizer import SPLIT_PATTERN, Tokenizer, tokenizer_info, train_bpe

from moeflow.platform.config import StageConfig, config_hash

from .documents import curated_parts
from .shards import DOC_FORMAT, META_NAME, TOKENIZER_NAME, ShardWriter, dtype_for_vocab

FORMAT_VERSION = 1  # bump when the shard layout or the encoding rules change
_PARQUET_BATCH_ROWS = 1024


PERF_FIELDS = ("batch_docs", "batch_bytes")  # performance only: not hashed into the output prefix


class TokenizeConfig(StageConfig):
    """What the tokenize stage does; every field except the performance knobs goes into the output hash."""

    vocab_size: int = Field(8192, ge=260, le=1 << 20, description="BPE vocabulary size (256 bytes + merges + specials)")
    min_frequency: int = Field(2, ge=1, le=1_000_000, description="a merge needs a pair seen at least this often")
    max_train_bytes: int = Field(64 * 2**20, ge=1, le=1 << 40, description="BPE training sample budget in bytes")
    shard_tokens: int = Field(2**20, ge=1, le=1 << 34, description="tokens per shard (the last one fewer)")
    val_fraction: float = Field(0.01, ge=0.0, lt=0.5, description="fraction of documents held out for validation")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="salt of the split and sample hashes")
    tokenizer_uri: Optional[str] = Field(None, description="reuse this tokenizer artefact instead of training one")
    batch_docs: int = Field(512, ge=1, le=1 << 24, description="documents per encode task (performance only)")
    batch_bytes: int = Field(2 * 2**20, ge=1, le=1 << 34, description="bytes per encode task (performance only)")

    @classmethod
    def from_dict(cls, data: dict | None) -> TokenizeConfig:
        return cls.model_validate(dict(data or {}))

    def output_dict(self) -> dict:
        """The fields that determine the output (hashed into the artefact prefix)."""
        return {k: v for k, v in self.to_dict().items() if k not in PERF_FIELDS}


@dataclass
class TokenizeResult:
    uri: str  # the token shards artefact
    tokenizer_uri: str  # the tokenizer artefact (folder holding tokenizer.json)
    content_hash: str  # of the token shards artefact
    stats: dict = field(default_factory=dict)
    reused: bool = False  # True when a committed artefact was returned without work

    def metrics(self) -> dict[str, float]:
        """The numeric stats (for MLflow metrics)."""
        return {k: float(v) for k, v in self.stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- hashing rules
def id_hash(doc_id: str, salt: str) -> int:
    """A 64-bit hash of a document id; the one rule for splits and samples."""
    return int.from_bytes(hashlib.blake2b(f"{salt}\0{doc_id}".encode(), digest_size=8).digest(), "little")


def assign_val(ids: list[str], val_fraction: float, seed: int = 0) -> np.ndarray:
    """Bool mask (num_docs,): which documents go to the validation split."""
    if not ids:
        return np.zeros(0, dtype=bool)
    u = np.array([id_hash(i, f"split:{seed}") for i in ids], dtype=np.uint64)
    threshold = np.uint64(min(int(val_fraction * 2.0**64), 2**64 - 1))
    is_val = u < threshold
    if val_fraction > 0 and len(ids) >= 2:
        if not is_val.any():  # tiny corpora: still give validation one document
            is_val[int(np.argmin(u))] = True
        if is_val.all():
            is_val[int(np.argmax(u))] = False
    return is_val


def select_bpe_sample(ids: list[str], nbytes: np.ndarray, budget: int, seed: int = 0) -> set[str]:
    """Ids of documents in id-hash order until their bytes reach ``budget`` (the crossing one included)."""
    if not ids:
        return set()
    u = np.array([id_hash(i, f"bpe:{seed}") for i in ids], dtype=np.uint64)
    order = np.argsort(u, kind="stable")
    cum = np.cumsum(np.asarray(nbytes, dtype=np.int64)[order])
    count = int(np.searchsorted(cum, budget, side="left")) + 1
    return {ids[i] for i in order[:count]}


def tokens_prefix(config: TokenizeConfig, curated_hash: str, output_prefix: str) -> str:
    digest = config_hash({"config": config.output_dict(), "curated": curated_hash, "format": FORMAT_VERSION,
                          "split_pattern": SPLIT_PATTERN, "doc_format": DOC_FORMAT}, length=16)
    return f"{output_prefix.strip('/')}/{digest}"


# ---------------------------------------------------------------- curated input
def _curated_parts(art) -> list[str]:
    parts = curated_parts(art)
    if not parts:
        raise ValueError(f"curated artefact {art.uri} has no part-*.parquet files (has {art.names()[:10]})")
    return parts


def _iter_columns(paths: list[Path], columns: list[str]) -> Iterator[dict[str, list]]:
    """Record batches of the curated parts as {column: list}, in part then row order."""
    import pyarrow.parquet as pq

    for path in paths:
        pf = pq.ParquetFile(path)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"curated part {path.name} lacks column(s) {missing}")
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            yield batch.to_pydict()


def _scan(paths: list[Path]) -> tuple[list[str], np.ndarray, int]:
    """(ids, utf-8 byte lengths) of the non-empty documents, and the number of empty ones."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids: list[str] = []
    sizes: list[np.ndarray] = []
    num_empty = 0
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS * 8, columns=["id", "text"]):
            nbytes = pc.fill_null(pc.binary_length(batch.column("text")), 0).to_numpy(zero_copy_only=False)
            keep = nbytes > 0
            num_empty += int((~keep).sum())
            ids.extend(i for i, k in zip(batch.column("id").to_pylist(), keep) if k)
            sizes.append(nbytes[keep].astype(np.int64))
    return ids, (np.concatenate(sizes) if sizes else np.empty(0, np.int64)), num_empty


# ---------------------------------------------------------------- encoding (runs in workers)
@lru_cache(maxsize=2)
def _tokenizer_from_json(tok_json: str) -> Tokenizer:
    # Cached per worker process: a Ray worker runs many batches with the same tokenizer.
    return Tokenizer.from_str(tok_json)


def _encode_texts(tok_json: str, texts: list[str], dtype_name: str) -> tuple[np.ndarray, np.ndarray]:
    tok = _tokenizer_from_json(tok_json)
    return tok.encode_batch_flat(texts, add_bos=True, add_eos=True, dtype=np.dtype(dtype_name))


def _doc_batches(paths: list[Path], config: TokenizeConfig) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, texts) batches of non-empty documents, bounded by batch_docs and batch_bytes."""
    ids: list[str] = []
    texts: list[str] = []
    size = 0
    for cols in _iter_columns(paths, ["id", "text"]):
        for doc_id, text in zip(cols["id"], cols["text"]):
            if not text:
                continue
            ids.append(doc_id)
            texts.append(text)
            size += len(text)
            if len(ids) >= config.batch_docs or size >= config.batch_bytes:
                yield ids, texts
                ids, texts, size = [], [], 0
    if ids:
        yield ids, texts


# ---------------------------------------------------------------- the stage
def _existing_result(store, prefix: str) -> TokenizeResult:
    art = store.read_artifact(prefix)
    md = art.metadata
    # the manifest metadata names the tokenizer; artefacts written before it did name it in meta.json
    tokenizer_uri = md.get("tokenizer_uri") or art.get_json(META_NAME).get("tokenizer_uri", "")
    return TokenizeResult(uri=art.uri, tokenizer_uri=tokenizer_uri, content_hash=art.content_hash,
                          stats={**md.get("stats", {}), "content_hash": art.content_hash}, reused=True)


def _get_tokenizer(config, store, paths, ids, nbytes, is_val, curated_uri) -> tuple[Tokenizer, dict]:
    if config.tokenizer_uri:  # a tokenizer artefact, or any artefact holding tokenizer.json (token shards)
        uri = config.tokenizer_uri
        if "://" in uri and not uri.startswith(store.root_uri + "/"):
            from moeflow.platform.store import read_artifact

            art = read_artifact(uri)  # another store
        else:
            art = store.read_artifact(uri)
        return Tokenizer.from_str(art.get_bytes(TOKENIZER_NAME)), {"tokenizer_source": uri}
    train_ids = [i for i, v in zip(ids, is_val) if not v]
    sample = select_bpe_sample(train_ids, nbytes[~is_val], config.max_train_bytes, config.seed)

    def sample_texts() -> Iterator[str]:
        for cols in _iter_columns(paths, ["id", "text"]):
            for doc_id, text in zip(cols["id"], cols["text"]):
                if text and doc_id in sample:
                    yield text

    tok = train_bpe(sample_texts(), config.vocab_size, min_frequency=config.min_frequency,
                    max_train_bytes=config.max_train_bytes)
    return tok, {"tokenizer_source": curated_uri, **{f"tokenizer_{k}": v for k, v in tok.training_stats.items()}}


def _write_tokenizer_artifact(store, tok: Tokenizer, extra: dict) -> str:
    data = tok.to_str().encode("utf-8")
    prefix = f"tokenizers/{hashlib.sha256(data).hexdigest()[:16]}"
    if not store.artifact_exists(prefix):
        info = tokenizer_info(tok)
        with store.write_artifact(prefix, metadata={**info, **extra}) as w:
            w.put_bytes(TOKENIZER_NAME, data)
            w.put_json("info.json", info)
    return store.uri(prefix)


def run_tokenize(
    config: TokenizeConfig,
    store,
    *,
    curated_uri: str,
    output_prefix: str,
    num_workers: int | None = None,
    progress: bool = True,
) -> TokenizeResult:
    """Tokenizes a curated artefact into ``<output_prefix>/<hash>/``; see the module docstring."""
    from moeflow.platform.compute import parallel_map

    if isinstance(config, dict):
        config = TokenizeConfig.from_dict(config)
    curated = store.read_artifact(curated_uri)
    prefix = tokens_prefix(config, curated.content_hash, output_prefix)
    if store.artifact_exists(prefix):
        return _existing_result(store, prefix)

    start_time = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moeflow-tokenize-") as tmp:
        tmp_dir = Path(tmp)
        parts = _curated_parts(curated)
        curated.download(tmp_dir / "curated", names=parts)
        paths = [tmp_dir / "curated" / p for p in parts]

        # 1. scan: split + BPE sample, decided by id hash
        ids, nbytes, num_empty = _scan(paths)
        if not ids:
            raise ValueError(f"curated artefact {curated.uri} holds no non-empty documents: nothing to tokenize")
        is_val = assign_val(ids, config.val_fraction, config.seed)
        val_ids = {i for i, v in zip(ids, is_val) if v}

        # 2. tokenizer
        tok, tok_extra = _get_tokenizer(config, store, paths, ids, nbytes, is_val, curated.uri)
        tokenizer_uri = _write_tokenizer_artifact(store, tok, {**tok_extra, "curated_uri": curated.uri,
                                                               "curated_content_hash": curated.content_hash})
        dtype = dtype_for_vocab(tok.vocab_size)
        tok_json = tok.to_str()

        def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
            return _encode_texts(tok_json, texts, dtype.name)

        # 3. encode in parallel, assemble in document order
        text_bytes = {"train": 0, "val": 0}
        with store.write_artifact(prefix) as writer:
            def upload(name: str, path: Path) -> None:
                writer.put_file(name, path)
                path.unlink()

            shard_writers = {split: ShardWriter(split, config.shard_tokens, dtype, tmp_dir / "shards", upload)
                             for split in ("train", "val")}
            window = max(1, num_workers or os.cpu_count() or 1) * 4  # batches per parallel_map call
            batches = _doc_batches(paths, config)
            while chunk := [b for _, b in zip(range(window), batches)]:
                results = parallel_map(encode, [texts for _, texts in chunk], num_workers=num_workers,
                                       desc="tokenize", progress=progress)
                for (batch_ids, texts), (tokens_N, lengths_D) in zip(chunk, results):
                    val_D = np.fromiter((i in val_ids for i in batch_ids), dtype=bool, count=len(batch_ids))
                    val_N = np.repeat(val_D, lengths_D)
                    sizes_D = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
                    for split, mask_D, mask_N in (("train", ~val_D, ~val_N), ("val", val_D, val_N)):
                        if mask_D.any():
                            shard_writers[split].add(tokens_N[mask_N], lengths_D[mask_D])
                            text_bytes[split] += int(sizes_D[mask_D].sum())
            splits = {split: w.close() for split, w in shard_writers.items()}

            # 4. meta + commit
            meta = {
                "format_version": FORMAT_VERSION,
                "doc_format": DOC_FORMAT,
                "dtype": dtype.name,
                "shard_tokens": config.shard_tokens,
                **{k: v for k, v in tokenizer_info(tok).items() if k != "training"},
                # inputs by content, never by location: meta.json is hashed into the artefact's
                # content_hash, which must be the same whether the inputs live in s3:// or file://
                # (the cluster and the embedded run of one recipe). The URIs are lineage: they go in
                # the manifest metadata below, which TokenDataset.open merges back into ``meta``.
                "tokenizer_key": store.key_for_uri(tokenizer_uri),  # tokenizers/<sha256[:16]>: by content
                "curated_content_hash": curated.content_hash,
                "config": config.output_dict(),
                "splits": {s: {**info, "num_text_bytes": text_bytes[s]} for s, info in splits.items()},
            }
            stats = _stats(meta, dtype, tok_extra, time.perf_counter() - start_time)
            stats["num_empty_docs_skipped"] = num_empty
            writer.put_bytes(TOKENIZER_NAME, tok_json.encode("utf-8"))
            writer.put_json(META_NAME, meta)
            writer.metadata.update({"kind": "tokens", "tokenizer_uri": tokenizer_uri, "curated_uri": curated.uri,
                                    "stats": stats})
    return TokenizeResult(uri=writer.uri, tokenizer_uri=tokenizer_uri, content_hash=writer.content_hash,
                          stats={**stats, "content_hash": writer.content_hash}, reused=False)


def _stats(meta: dict, dtype: np.dtype, tok_extra: dict, seconds: float) -> dict:
    splits = meta["splits"]
    num_tokens = sum(s["num_tokens"] for s in splits.values())
    num_docs = sum(s["num_docs"] for s in splits.values())
    num_text_bytes = sum(s["num_text_bytes"] for s in splits.values())
    num_content_tokens = num_tokens - 2 * num_docs  # without the bos/eos of every document
    stats = {
        "vocab_size": meta["vocab_size"],
        "dtype": dtype.name,
        "num_tokens": num_tokens,
        "num_docs": num_docs,
        "num_text_bytes": num_text_bytes,
        # text bytes per content token: the tokenizer's compression
        "bytes_per_token": num_text_bytes / max(1, num_content_tokens),
        # text bytes / stored shard bytes: what the shards cost relative to the raw text
        "compression_ratio": num_text_bytes / max(1, num_tokens * dtype.itemsize),
        "seconds": round(seconds, 3),
    }
    for split, info in splits.items():
        stats[f"num_tokens_{split}"] = info["num_tokens"]
        stats[f"num_docs_{split}"] = info["num_docs"]
        stats[f"num_shards_{split}"] = len(info["shards"])
    for key in ("tokenizer_num_train_texts", "tokenizer_num_train_bytes"):
        if key in tok_extra:
            stats[key] = tok_extra[key]
    return stats
