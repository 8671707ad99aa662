"""Token shards and the tokenize stage: layout, random access, splits, checksums, determinism, resume."""

from __future__ import annotations

import io
import json
import os
import pickle
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moeflow.platform.data.shards import ShardWriter, TokenDataset, dtype_for_vocab
from moeflow.platform.data.tokenize import TokenizeConfig, assign_val, run_tokenize, select_bpe_sample
from moeflow.platform.store import Artifact, ChecksumError, LocalStore

CJK = ["混合专家模型只激活一部分参数。", "東京は日本の首都です。", "한국어 문장입니다."]


def make_docs(num_docs: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    words = ["the", "model", "data", "token", "expert", "router", "def", "return", "x", "=", "(", ")", "42",
             "12345", "\n", "    ", "🚀", *CJK]
    docs = []
    for i in range(num_docs):
        n = int(rng.integers(1, 120))
        text = " ".join(rng.choice(words, size=n).tolist())
        docs.append((f"doc-{i:05d}", text))
    docs.append(("doc-special", "a page that literally says <|eos|> and <|bos|> inside"))
    return docs


def write_curated(store, docs, prefix="datasets/t/curated/abc", parts=2, empties=0) -> str:
    rows = [{"id": i, "text": t, "source": "test", "metadata": "{}", "domain": "prose", "ppl_bucket": "head"}
            for i, t in docs]
    rows += [{"id": f"empty-{k}", "text": "", "source": "test", "metadata": "{}", "domain": "prose",
              "ppl_bucket": "head"} for k in range(empties)]
    with store.write_artifact(prefix) as w:
        size = max(1, -(-len(rows) // parts))
        for p in range(parts):
            chunk = rows[p * size:(p + 1) * size]
            table = pa.Table.from_pylist(chunk, schema=pa.schema([(c, pa.string()) for c in
                                                                  ("id", "text", "source", "metadata", "domain",
                                                                   "ppl_bucket")]))
            buf = io.BytesIO()
            pq.write_table(table, buf)
            w.put_bytes(f"part-{p:05d}.parquet", buf.getvalue())
        w.put_json("stats.json", {"num_docs": len(rows)})
    return w.uri


@pytest.fixture
def store(moeflow_home):
    return LocalStore(moeflow_home / "store")


CFG = TokenizeConfig(vocab_size=400, shard_tokens=1000, val_fraction=0.1, batch_docs=16, max_train_bytes=200_000)


# ---------------------------------------------------------------- shard layout
def test_dtype_follows_vocab_size():
    assert dtype_for_vocab(400) == np.uint16
    assert dtype_for_vocab(2**16) == np.uint16  # ids 0..65535 fit
    assert dtype_for_vocab(2**16 + 1) == np.uint32
    assert dtype_for_vocab(200_000) == np.uint32
    with pytest.raises(ValueError):
        dtype_for_vocab(0)


def _write_raw_dataset(store, tmp_path, docs, dtype, shard_tokens, prefix="datasets/raw/tokens/x"):
    """A token artefact written with ShardWriter directly (no tokenizer training)."""
    with store.write_artifact(prefix) as w:
        writer = ShardWriter("train", shard_tokens, dtype, tmp_path / "shards", lambda n, p: w.put_file(n, p))
        for k in range(0, len(docs), 7):  # several add() calls of several docs each
            batch = docs[k:k + 7]
            writer.add(np.concatenate(batch), np.array([len(d) for d in batch]))
        split = writer.close()
        w.put_bytes("tokenizer.json", b"{}")
        w.put_json("meta.json", {"dtype": np.dtype(dtype).name, "vocab_size": 70_000, "bos_id": 0, "eos_id": 1,
                                 "pad_id": 2, "splits": {"train": split}})
    return w.uri


def test_random_access_equals_concatenation_across_shard_boundaries(store, tmp_path):
    rng = np.random.default_rng(1)
    # uint32 ids above 65,535 prove the wide dtype round-trips
    docs = [np.concatenate([[0], rng.integers(3, 70_000, size=int(rng.integers(1, 90))), [1]]).astype(np.int64)
            for _ in range(60)]
    docs.append(np.concatenate([[0], rng.integers(3, 70_000, size=700), [1]]))  # spans several shards
    uri = _write_raw_dataset(store, tmp_path, docs, np.uint32, shard_tokens=128)
    ds = TokenDataset.open(uri, "train")
    flat = np.concatenate(docs)
    assert ds.num_tokens == len(flat) and ds.num_docs == len(docs) and ds.dtype == np.uint32
    assert len(ds.shards) == -(-len(flat) // 128) and all(s["num_tokens"] == 128 for s in ds.shards[:-1])
    assert np.array_equal(ds.doc_starts, np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]]))
    assert ds.tokens(0, ds.num_tokens).dtype == np.int64
    assert np.array_equal(ds.tokens(0, ds.num_tokens), flat)
    for _ in range(300):
        start = int(rng.integers(0, len(flat)))
        length = int(rng.integers(0, min(400, len(flat) - start) + 1))
        assert np.array_equal(ds.tokens(start, length), flat[start:start + length])
    for i in (0, 5, len(docs) - 1, -1):
        assert np.array_equal(ds.document(i), docs[i])
    with pytest.raises(IndexError):
        ds.tokens(len(flat) - 2, 3)
    with pytest.raises(IndexError):
        ds.document(len(docs))
    clone = pickle.loads(pickle.dumps(ds))  # ships paths, re-maps
    assert np.array_equal(clone.tokens(100, 300), flat[100:400])


def test_shard_writer_rejects_mismatched_lengths(tmp_path):
    writer = ShardWriter("train", 10, np.uint16, tmp_path, lambda n, p: None)
    with pytest.raises(ValueError, match="lengths sum"):
        writer.add(np.arange(5), np.array([2, 2]))


# ---------------------------------------------------------------- the stage
def test_tokenize_round_trips_documents_and_splits_disjointly(store):
    docs = make_docs(150)
    curated_uri = write_curated(store, docs, empties=3)
    result = run_tokenize(CFG, store, curated_uri=curated_uri, output_prefix="datasets/t/tokens", num_workers=1,
                          progress=False)
    assert not result.reused and result.uri.startswith(store.uri("datasets/t/tokens") + "/")
    train, val = TokenDataset.open(result.uri, "train"), TokenDataset.open(result.uri, "val")
    tok = train.tokenizer()
    assert train.meta["dtype"] == "uint16" and train.meta["vocab_size"] == tok.vocab_size == 400
    assert len(train.shards) > 2 and all(s["num_tokens"] == CFG.shard_tokens for s in train.shards[:-1])

    texts = {}
    for ds in (train, val):
        assert (ds.tokens(0, ds.num_tokens)[ds.doc_starts] == tok.bos_id).all()
        texts[ds.split] = []
        for i in range(ds.num_docs):
            ids = ds.document(i)
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            body = ids[1:-1]
            assert not set(tok.special_ids.values()) & set(body.tolist())  # "<|eos|>" in text stays text
            texts[ds.split].append(tok.decode(body))
    by_text = {t: i for i, t in docs}
    assert sorted(texts["train"] + texts["val"]) == sorted(t for _, t in docs)  # empties skipped, nothing lost
    assert not {by_text[t] for t in texts["train"]} & {by_text[t] for t in texts["val"]}
    # the split is the id-hash rule, whatever the batching
    expected_val = {i for (i, _), v in zip(docs, assign_val([i for i, _ in docs], 0.1)) if v}
    assert {by_text[t] for t in texts["val"]} == expected_val and 0 < len(expected_val) < 50

    s = result.stats
    assert s["num_docs_train"] + s["num_docs_val"] == len(docs) and s["num_empty_docs_skipped"] == 3
    assert s["num_tokens_train"] == train.num_tokens and s["num_tokens_val"] == val.num_tokens
    assert s["bytes_per_token"] > 1.0 and s["compression_ratio"] > 0.5 and s["content_hash"] == result.content_hash
    assert set(result.metrics()) <= set(s) and "dtype" not in result.metrics()
    # the tokenizer is also its own artefact, identical to the copy in the shards
    tok_art = store.read_artifact(result.tokenizer_uri)
    assert result.tokenizer_uri.startswith(store.uri("tokenizers") + "/")
    assert tok_art.get_bytes("tokenizer.json") == store.read_artifact(result.uri).get_bytes("tokenizer.json")
    assert tok_art.metadata["curated_uri"] == curated_uri
    assert 0 < val.meta["bytes_per_token"] < 10


def test_split_and_sample_rules_depend_only_on_ids():
    ids = [f"d{i}" for i in range(500)]
    mask = dict(zip(ids, assign_val(ids, 0.2, seed=3)))
    shuffled = ids[::-1]
    assert dict(zip(shuffled, assign_val(shuffled, 0.2, seed=3))) == mask
    assert 50 < sum(mask.values()) < 150
    assert dict(zip(ids, assign_val(ids, 0.2, seed=4))) != mask
    assert assign_val(["a", "b"], 0.01).sum() == 1  # tiny corpora still get a validation document
    assert not assign_val(["a", "b"], 0.0).any()
    sizes = np.full(500, 100)
    sample = select_bpe_sample(ids, sizes, budget=1_000)
    assert len(sample) == 10 and sample == select_bpe_sample(shuffled, sizes, budget=1_000)


def test_resume_returns_committed_artifact_without_work(store, monkeypatch):
    curated_uri = write_curated(store, make_docs(40))
    first = run_tokenize(CFG, store, curated_uri=curated_uri, output_prefix="datasets/t/tokens", num_workers=1,
                         progress=False)

    def boom(*args, **kwargs):
        raise AssertionError("a resumed run must not tokenize again")

    monkeypatch.setattr("moeflow.platform.compute.parallel_map", boom)
    monkeypatch.setattr("moeflow.platform.data.tokenize.train_bpe", boom)
    again = run_tokenize(CFG, store, curated_uri=curated_uri, output_prefix="datasets/t/tokens", progress=False)
    assert again.reused and again.uri == first.uri and again.content_hash == first.content_hash
    assert again.stats["num_tokens_train"] == first.stats["num_tokens_train"]


def test_failed_run_leaves_nothing_visible_and_rerun_completes(store, monkeypatch):
    from moeflow.platform import compute

    curated_uri = write_curated(store, make_docs(80))
    real = compute.parallel_map
    calls = {"n": 0}

    def dies_on_second_window(fn, items, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")  # like a Ctrl-C mid-run
        return real(fn, items, **kwargs)

    monkeypatch.setattr(compute, "parallel_map", dies_on_second_window)
    cfg = TokenizeConfig(**{**CFG.to_dict(), "batch_docs": 4})
    with pytest.raises(KeyboardInterrupt):
        run_tokenize(cfg, store, curated_uri=curated_uri, output_prefix="datasets/t/tokens", num_workers=1,
                     progress=False)
    assert calls["n"] == 2
    assert not [k for k in store.list("datasets/t/tokens") if k.endswith("MANIFEST.json")]
    monkeypatch.setattr(compute, "parallel_map", real)
    result = run_tokenize(cfg, store, curated_uri=curated_uri, output_prefix="datasets/t/tokens", num_workers=1,
                          progress=False)
    assert not result.reused and store.artifact_exists(result.uri)


def test_batching_does_not_change_the_output(store):
    curated_uri = write_curated(store, make_docs(60))
    a = run_tokenize(CFG, store, curated_uri=curated_uri, output_prefix="datasets/t/a", num_workers=1, progress=False)
    cfg_b = TokenizeConfig(**{**CFG.to_dict(), "batch_docs": 5, "batch_bytes": 300})
    b = run_tokenize(cfg_b, store, curated_uri=curated_uri, output_prefix="datasets/t/b", num_workers=1,
                     progress=False)
    assert a.content_hash == b.content_hash
    # an output-relevant field changes the artefact
    c = run_tokenize(TokenizeConfig(**{**CFG.to_dict(), "shard_tokens": 500}), store, curated_uri=curated_uri,
                     output_prefix="datasets/t/a", num_workers=1, progress=False)
    assert c.uri != a.uri and c.content_hash != a.content_hash


def test_one_and_two_ray_workers_give_identical_shards(store):
    curated_uri = write_curated(store, make_docs(120))
    cfg = TokenizeConfig(**{**CFG.to_dict(), "batch_docs": 8})
    one = run_tokenize(cfg, store, curated_uri=curated_uri, output_prefix="datasets/t/w1", num_workers=1,
                       progress=False)
    two = run_tokenize(cfg, store, curated_uri=curated_uri, output_prefix="datasets/t/w2", num_workers=2,
                       progress=False)
    import ray

    assert ray.is_initialized()  # the two-worker run really went through Ray
    assert one.content_hash == two.content_hash
    assert one.stats["num_tokens_train"] == two.stats["num_tokens_train"]


def test_corrupt_cached_shard_is_fetched_again_and_corrupt_store_fails_clearly(store, tmp_path, monkeypatch):
    curated_uri = write_curated(store, make_docs(60))
    result = run_tokenize(CFG, store, curated_uri=curated_uri, output_prefix="datasets/t/tokens", num_workers=1,
                          progress=False)
    ds = TokenDataset.open(result.uri, "train")
    assert ds.local_dir.parent.name == "cache" and ds.local_dir.name == result.content_hash
    expected = ds.tokens(0, ds.num_tokens)
    shard = ds.local_dir / ds.shards[0]["bin"]
    del ds
    # a valid, stamped cache is reused without re-hashing or downloading
    monkeypatch.setattr(Artifact, "download", lambda *a, **k: pytest.fail("valid cache was downloaded again"))
    assert np.array_equal(TokenDataset.open(result.uri, "train").tokens(0, len(expected)), expected)
    monkeypatch.undo()

    time.sleep(0.02)  # the stamp compares mtimes; let the clock tick past the download's
    data = bytearray(shard.read_bytes())
    data[:8] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    assert np.array_equal(TokenDataset.open(result.uri, "train").tokens(0, len(expected)), expected)
    # verify=True catches corruption the stamp cannot see (same size and mtime)
    stat = shard.stat()
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert np.array_equal(TokenDataset.open(result.uri, "train", verify=True).tokens(0, len(expected)), expected)

    # corrupt the stored copy: a fresh cache cannot be filled, and says which file is bad
    stored = store.root / "/".join(result.uri.split("/")[-4:]) / "train-00000.bin"
    stored.write_bytes(b"\x00" * stored.stat().st_size)
    with pytest.raises(ChecksumError, match="train-00000.bin"):
        TokenDataset.open(result.uri, "train", cache_dir=tmp_path / "fresh")
    assert not (tmp_path / "fresh" / result.content_hash / "train-00000.bin").exists()  # nothing bad kept


def test_reusing_a_tokenizer_skips_training(store, monkeypatch):
    curated_uri = write_curated(store, make_docs(40))
    first = run_tokenize(CFG, store, curated_uri=curated_uri, output_prefix="datasets/t/tokens", num_workers=1,
                         progress=False)
    monkeypatch.setattr("moeflow.platform.data.tokenize.train_bpe",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("should reuse")))
    cfg = TokenizeConfig(**{**CFG.to_dict(), "tokenizer_uri": first.tokenizer_uri})
    second = run_tokenize(cfg, store, curated_uri=curated_uri, output_prefix="datasets/t/tokens", num_workers=1,
                          progress=False)
    assert second.tokenizer_uri == first.tokenizer_uri and second.uri != first.uri
    assert second.stats["num_tokens_train"] == first.stats["num_tokens_train"]


def test_bad_inputs_fail_clearly(store):
    empty_uri = write_curated(store, [], prefix="datasets/e/curated/x", parts=1, empties=2)
    with pytest.raises(ValueError, match="no non-empty documents"):
        run_tokenize(CFG, store, curated_uri=empty_uri, output_prefix="datasets/e/tokens", num_workers=1,
                     progress=False)
    assert not store.list("datasets/e/tokens")
    with store.write_artifact("datasets/n/curated/x") as w:
        w.put_json("stats.json", {})
    with pytest.raises(ValueError, match="no part-"):
        run_tokenize(CFG, store, curated_uri=w.uri, output_prefix="datasets/n/tokens", num_workers=1,
                     progress=False)
    with pytest.raises(ValueError, match="unknown field .vocab. \(did you mean .vocab_size.\?\)"):
        TokenizeConfig.from_dict({"vocab": 10})
    with pytest.raises(ValueError, match="val_fraction"):
        TokenizeConfig(val_fraction=0.7)
    # opening a split with no tokens
    curated_uri = write_curated(store, make_docs(10), prefix="datasets/z/curated/x")
    cfg = TokenizeConfig(**{**CFG.to_dict(), "val_fraction": 0.0})
    result = run_tokenize(cfg, store, curated_uri=curated_uri, output_prefix="datasets/z/tokens", num_workers=1,
                          progress=False)
    with pytest.raises(ValueError, match="empty"):
        TokenDataset.open(result.uri, "val")
    with pytest.raises(ValueError, match="no split 'test'"):
        TokenDataset.open(result.uri, "test")
    assert json.loads(store.read_artifact(result.uri).get_bytes("meta.json"))["splits"]["val"]["num_docs"] == 0


@pytest.mark.service
def test_tokenize_and_read_through_an_s3_server(moeflow_home, monkeypatch):
    from s3server import moto_s3_server

    from moeflow.platform.store import open_store

    with moto_s3_server() as moto:
        for key, value in {"MOEFLOW_S3_ENDPOINT": moto.endpoint, "MOEFLOW_S3_BUCKET": "tokens-test",
                           "MOEFLOW_S3_ACCESS_KEY": "k", "MOEFLOW_S3_SECRET_KEY": "s",
                           "MOEFLOW_S3_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        store = open_store(create_bucket=True)
        docs = make_docs(30)
        curated_uri = write_curated(store, docs)
        result = run_tokenize(CFG, store, curated_uri=curated_uri, output_prefix="datasets/t/tokens",
                              num_workers=1, progress=False)
        assert result.uri.startswith("s3://tokens-test/datasets/t/tokens/")
        train, val = TokenDataset.open(result.uri, "train"), TokenDataset.open(result.uri, "val")
        tok = train.tokenizer()
        decoded = [tok.decode(ds.document(i)) for ds in (train, val) for i in range(ds.num_docs)]
        assert sorted(decoded) == sorted(t for _, t in docs)
