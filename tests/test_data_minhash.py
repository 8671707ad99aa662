"""MinHash-LSH near-duplicate detection: maths tables, hashing against naive references,
clustering properties, planted recall/precision, bounded-memory chunking and the index."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest

from moeflow.platform.data import minhash as mh
from moeflow.platform.data.lsh import (
    MinHashIndex,
    choose_bands_rows,
    clusters_from_signatures,
    connected_components,
    ids_to_drop,
    near_duplicate_clusters,
    s_curve,
)
from moeflow.platform.data.minhash import (
    EMPTY,
    compute_signatures,
    shingle_hashes,
    simplify_text,
)

M64 = (1 << 64) - 1


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))


def _vocab(seed: int = 0, size: int = 5000) -> list[str]:
    rng = random.Random(seed)
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))))
    return sorted(words)


def _doc(rng: random.Random, vocab: list[str], num_words: int = 200) -> list[str]:
    return [rng.choice(vocab) for _ in range(num_words)]


def _jaccard(a: list[str], b: list[str], n: int = 5) -> float:
    sa = {tuple(a[i : i + n]) for i in range(len(a) - n + 1)}
    sb = {tuple(b[i : i + n]) for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb)


# ---------------------------------------------------------------------------------- maths


@pytest.mark.parametrize(
    "j, bands, rows, expected",
    [
        (0.5, 14, 8, 0.0533),
        (0.6, 14, 8, 0.2111),
        (0.7, 14, 8, 0.5645),
        (0.8, 14, 8, 0.9235),
        (0.85, 14, 8, 0.9884),
        (0.9, 14, 8, 0.9996),
        (0.8, 9, 13, 0.3988),  # datasketch's choice for MinHashLSH(threshold=0.8, num_perm=128)
        (0.9, 9, 13, 0.9286),
        (0.0, 14, 8, 0.0),
        (1.0, 14, 8, 1.0),
    ],
)
def test_s_curve_table(j, bands, rows, expected):
    assert s_curve(j, bands, rows) == pytest.approx(expected, abs=5e-4)


def test_s_curve_vectorised_and_monotone():
    js = np.linspace(0, 1, 101)
    p = s_curve(js, 14, 8)
    assert p.shape == (101,) and np.all(np.diff(p) >= 0)


def test_choose_bands_rows():
    assert choose_bands_rows(0.8, 112) == (14, 8)
    assert choose_bands_rows(0.8, 128) == (16, 8)
    bands, rows = choose_bands_rows(0.5, 128)
    assert bands * rows <= 128 and s_curve(0.5, bands, rows) >= 0.9
    # one more row per band would miss the recall target
    assert s_curve(0.5, 128 // (rows + 1), rows + 1) < 0.9
    with pytest.raises(ValueError, match="threshold"):
        choose_bands_rows(1.5, 128)


# ----------------------------------------------------------------------------- simplification


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello,   World!", "hello world"),
        ("Call 555-1234 in 2024.", "call 000 0000 in 0000"),
        ("Café naïve RÉSUMÉ", "cafe naive resume"),
        ("tab\tnew\nline\r\nx", "tab new line x"),
        ("under_score (paren) [b] {c} \"q\" 'a'", "under score paren b c q a"),
        ("“Smart” quotes — dash… ﬁne", "smart quotes dash fine"),
        ("x² ½", "x0 0 0"),
        ("", ""),
        ("!!! ...", ""),
    ],
)
def test_simplify_text(text, expected):
    assert simplify_text(text) == expected


def test_unicode_and_ascii_paths_agree():
    a = compute_signatures(["Le café est très élégant, n'est-ce pas? Oui 42 fois."])
    b = compute_signatures(["le cafe est tres elegant n est ce pas oui 00 fois"])
    assert np.array_equal(a, b)


# ----------------------------------------------------------------------- hashing vs references


def _ref_word_hash(word: bytes) -> int:
    table = mh._byte_table().tolist()
    q, h, power = int(mh._POLY_Q), 0, 1
    for c in word:
        h = (h + table[c] * power) & M64
        power = (power * q) & M64
    return int(mh._mix64(np.array([h], dtype=np.uint64))[0])


def _ref_shingles(text: str, n: int) -> list[int]:
    words = [_ref_word_hash(w) for w in simplify_text(text).encode().split()]
    coeffs = [int(c) for c in mh._shingle_coeffs(n)]
    windows = [words[i : i + n] for i in range(len(words) - n + 1)] or ([words] if words else [])
    raw = [sum(c * w for c, w in zip(coeffs, win)) & M64 for win in windows]
    return mh._mix64(np.array(raw, dtype=np.uint64)).tolist() if raw else []


@pytest.mark.parametrize("n", [1, 3, 5])
def test_shingle_hashes_match_naive_reference(n):
    text = "The quick brown fox, jumps over the lazy dog; the QUICK brown fox again! Zürich 1999"
    assert shingle_hashes(text, n).tolist() == _ref_shingles(text, n)


def test_short_and_empty_documents():
    assert len(shingle_hashes("one two three", 5)) == 1  # fewer words than n: one shingle
    assert shingle_hashes("one two three", 5).tolist() == _ref_shingles("one two three", 5)
    assert len(shingle_hashes("", 5)) == 0 and len(shingle_hashes(" ,.; ", 5)) == 0
    sigs = compute_signatures(["", "a b", "...", "a b c d e f"])
    assert (sigs[0] == EMPTY).all() and (sigs[2] == EMPTY).all()
    assert not (sigs[1] == EMPTY).any() and not (sigs[3] == EMPTY).any()


def test_signature_matches_naive_min_over_permutations():
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    shingles = _ref_shingles(text, 5)
    a_h, b_h = mh._perm_params(16, 3)
    expected = [min((int(a) * x + int(b)) & M64 for x in shingles) for a, b in zip(a_h, b_h)]
    assert compute_signatures([text], num_perm=16, seed=3)[0].tolist() == expected


def test_estimated_jaccard_is_unbiased_with_binomial_spread():
    """The mod-2^64 multiply-add family behaves like random permutations on these keys."""
    rng = random.Random(1)
    vocab = _vocab(1)
    a_docs, b_docs, js = [], [], []
    for _ in range(600):
        a = _doc(rng, vocab, 150)
        b = list(a)
        for _ in range(rng.randint(1, 15)):
            b[rng.randrange(len(b))] = rng.choice(vocab)
        a_docs.append(" ".join(a))
        b_docs.append(" ".join(b))
        js.append(_jaccard(a, b))
    js = np.array(js)
    est = (compute_signatures(a_docs) == compute_signatures(b_docs)).mean(axis=1)
    z = (est - js) / np.sqrt(js * (1 - js) / 112)
    assert abs(z.mean()) < 0.15 and 0.85 < z.std() < 1.15


# --------------------------------------------------------------------------- chunking/batching


def test_chunked_signatures_equal_unchunked(monkeypatch):
    rng = random.Random(2)
    vocab = _vocab(2)
    texts = [" ".join(_doc(rng, vocab, rng.randint(0, 400))) for _ in range(40)]
    texts += ["", "tiny doc", " ".join(_doc(rng, vocab, 5000))]  # one doc spans many chunks
    whole = compute_signatures(texts, chunk_size=1 << 20, batch_docs=10_000)
    assert np.array_equal(whole, compute_signatures(texts, chunk_size=7, batch_docs=3))
    assert np.array_equal(whole, compute_signatures(texts, chunk_size=512, batch_docs=1))
    for i in (0, 17, len(texts) - 1):  # batch-independent
        assert np.array_equal(whole[i], compute_signatures([texts[i]])[0])
    # documents cut into pieces for word hashing give the same words and signatures
    monkeypatch.setattr(mh, "_PIECE_BYTES", 64)
    assert np.array_equal(whole, compute_signatures(texts))


def test_split_at_spaces_never_cuts_words():
    buf = b"aaa bbbb c " + b"x" * 50 + b" dd eee"
    pieces = mh._split_at_spaces(buf, 8)
    assert b" ".join(pieces).split() == buf.split()
    assert all(b"x" * 50 not in p or p == b"x" * 50 for p in pieces)


# ---------------------------------------------------------------------------------- union-find


def _naive_components(n: int, edges: list[tuple[int, int]]) -> list[int]:
    adj = [[] for _ in range(n)]
    for u, v in edges:
        adj[u].append(v)
        adj[v].append(u)
    root = [-1] * n
    for start in range(n):
        if root[start] >= 0:
            continue
        comp, stack = [], [start]
        root[start] = start
        while stack:
            x = stack.pop()
            comp.append(x)
            for y in adj[x]:
                if root[y] < 0:
                    root[y] = start
                    stack.append(y)
    return root  # start is the smallest node of its component (scanned in order)


@pytest.mark.parametrize("seed", range(5))
def test_connected_components_match_bfs(seed):
    rng = np.random.default_rng(seed)
    n = 300
    edges = rng.integers(0, n, size=(int(rng.integers(0, 400)), 2))
    roots = connected_components(n, edges[:, 0], edges[:, 1])
    assert roots.tolist() == _naive_components(n, [tuple(e) for e in edges.tolist()])


def test_connected_components_long_chain():
    n = 5000
    perm = np.random.default_rng(0).permutation(n)
    roots = connected_components(n, perm[:-1], perm[1:])  # one path visiting all nodes randomly
    assert (roots == 0).all()


def test_transitive_clusters_from_signatures():
    sigs = np.arange(5 * 16, dtype=np.uint64).reshape(5, 16)  # all different
    sigs[1, :8] = sigs[0, :8]  # d1 ~ d0 in band 0
    sigs[2, 8:] = sigs[1, 8:]  # d2 ~ d1 in band 1 (d2 and d0 share nothing)
    sigs[4] = sigs[3]
    clusters = clusters_from_signatures(["d0", "d1", "d2", "d3", "d4"], sigs, 2, 8)
    assert clusters == [{"d0", "d1", "d2"}, {"d3", "d4"}]
    # verification at 0.9 removes the half-matching edges but keeps the identical pair
    assert clusters_from_signatures(["d0", "d1", "d2", "d3", "d4"], sigs, 2, 8, threshold=0.9) == [{"d3", "d4"}]


# ------------------------------------------------------------------------------ clustering


def test_identical_cluster_and_disjoint_do_not():
    rng = random.Random(3)
    vocab = _vocab(3)
    texts = [" ".join(_doc(rng, vocab)) for _ in range(50)]
    docs = [(f"doc-{i:03d}", t) for i, t in enumerate(texts)]
    assert near_duplicate_clusters(docs) == []
    docs += [("copy-a", texts[7]), ("copy-b", texts[7].upper() + " !!!")]
    assert near_duplicate_clusters(docs) == [{"copy-a", "copy-b", "doc-007"}]


def test_empty_documents_never_cluster():
    docs = [("a", ""), ("b", ""), ("c", "..."), ("d", "some words here and more")]
    assert near_duplicate_clusters(docs) == []


def test_smallest_id_is_keeper_and_clusters_sorted():
    rng = random.Random(4)
    vocab = _vocab(4)
    t1, t2 = " ".join(_doc(rng, vocab)), " ".join(_doc(rng, vocab))
    docs = [("z9", t1), ("m5", t2), ("b2", t1), ("k0", t2), ("q1", t1)]
    clusters = near_duplicate_clusters(docs)
    assert clusters == [{"b2", "q1", "z9"}, {"k0", "m5"}]
    assert [min(c) for c in clusters] == ["b2", "k0"]
    assert ids_to_drop(clusters) == {"q1", "z9", "m5"}


def test_deterministic_across_calls_and_input_orders():
    rng = random.Random(5)
    vocab = _vocab(5)
    base = [_doc(rng, vocab) for _ in range(40)]
    docs = [(f"b{i}", " ".join(w)) for i, w in enumerate(base)]
    for i in range(40):
        w = list(base[i % 10])
        for _ in range(i % 6):
            w[rng.randrange(len(w))] = rng.choice(vocab)
        docs.append((f"n{i}", " ".join(w)))
    first = near_duplicate_clusters(docs)
    assert first and first == near_duplicate_clusters(docs)
    for seed in range(3):
        shuffled = list(docs)
        random.Random(seed).shuffle(shuffled)
        assert near_duplicate_clusters(shuffled) == first


def test_planted_recall_and_precision():
    """Word edits with exactly computed Jaccard: recall >= 0.9 at J >= 0.85, precision >= 0.95."""
    rng = random.Random(6)
    vocab = _vocab(6, 20_000)
    words = {f"b{i:04d}": _doc(rng, vocab, rng.randint(150, 300)) for i in range(400)}
    pairs = []
    for i in range(300):
        src = f"b{rng.randrange(400):04d}"
        w = list(words[src])
        for _ in range(rng.randint(0, 25)):  # J from 1.0 down to ~0.4
            pos = rng.randrange(len(w))
            if rng.random() < 0.6:
                w[pos] = rng.choice(vocab)
            else:
                w.insert(pos, rng.choice(vocab))
        words[f"n{i:04d}"] = w
        pairs.append((src, f"n{i:04d}", _jaccard(words[src], w)))
    clusters = near_duplicate_clusters([(k, " ".join(w)) for k, w in words.items()])
    cluster_of = {d: i for i, c in enumerate(clusters) for d in c}
    high = [(a, b) for a, b, j in pairs if j >= 0.85]
    assert len(high) > 50
    recall = sum(cluster_of.get(a, -1) == cluster_of.get(b, -2) for a, b in high) / len(high)
    removals = [(m, c) for c in clusters for m in c if m != min(c)]
    correct = sum(any(_jaccard(words[m], words[x]) >= 0.7 for x in c if x != m) for m, c in removals)
    assert recall >= 0.9
    assert correct / len(removals) >= 0.95


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="duplicate document id 'x'"):
        near_duplicate_clusters([("x", "a b c"), ("y", "d e f"), ("x", "g h i")])
    with pytest.raises(TypeError, match="'y': text must be str"):
        near_duplicate_clusters([("x", "a"), ("y", b"bytes")])
    with pytest.raises(ValueError, match="document 1: expected a"):
        near_duplicate_clusters([("x", "a"), "not-a-pair"])
    with pytest.raises(ValueError, match="uint64"):
        clusters_from_signatures(["a"], np.zeros((1, 112), dtype=np.int64))
    with pytest.raises(ValueError, match="2 ids for 3 signatures"):
        clusters_from_signatures(["a", "b"], np.zeros((3, 112), dtype=np.uint64))


# ----------------------------------------------------------------------------------- index


def _corpus(seed: int, n: int, prefix: str, vocab: list[str]) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"{prefix}{i:03d}", " ".join(_doc(rng, vocab))) for i in range(n)]


def test_index_save_load_query_round_trip(tmp_path):
    vocab = _vocab(7)
    old = _corpus(7, 60, "old", vocab)
    index = MinHashIndex()
    index.add_documents(old)
    # a later dataset: two edited copies of old docs, one exact copy, and new docs
    later = _corpus(8, 20, "new", vocab)
    w = old[3][1].split()
    w[10] = "changed"
    later += [("edit3", " ".join(w)), ("copy9", old[9][1].title() + "."), ("empty", "")]
    path = index.save(tmp_path / "index.npz")
    loaded = MinHashIndex.load(path, num_bands=14, rows_per_band=8, seed=0)
    assert len(loaded) == 60 and loaded.ids == [d for d, _ in old]
    expected = {"edit3": ["old003"], "copy9": ["old009"]}
    assert index.query_documents(later) == expected
    assert loaded.query_documents(later) == expected
    assert loaded.query_documents(later, threshold=0.8) == expected
    # byte-identical when saved again (no timestamps), and after a load
    again = loaded.save(tmp_path / "again.npz")
    assert again.read_bytes() == path.read_bytes()


def test_index_merge_and_checks(tmp_path):
    vocab = _vocab(9)
    part_a, part_b = _corpus(9, 30, "a", vocab), _corpus(10, 30, "b", vocab)
    ia, ib, iab = MinHashIndex(), MinHashIndex(), MinHashIndex()
    ia.add_documents(part_a)
    ib.add_documents(part_b)
    iab.add_documents(part_a + part_b)
    merged = ia.merge(ib)
    assert merged.save(tmp_path / "m.npz").read_bytes() == iab.save(tmp_path / "ab.npz").read_bytes()
    assert merged.query_documents([("q", part_b[4][1])]) == {"q": ["b004"]}
    with pytest.raises(ValueError, match="'a000' is in both"):
        ia.merge(ia)
    with pytest.raises(ValueError, match="seed differs"):
        ia.merge(MinHashIndex(seed=1))
    with pytest.raises(ValueError, match="already in the index"):
        ia.add_documents(part_a[:1])
    with pytest.raises(ValueError, match="expected 16"):
        MinHashIndex.load(ia.save(tmp_path / "a.npz"), num_bands=16)
    with pytest.raises(ValueError, match="shape"):
        ia.query(np.zeros((1, 64), dtype=np.uint64))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable MinHash index"):
        MinHashIndex.load(tmp_path / "bad.npz")
    assert MinHashIndex().query(compute_signatures(["any text at all here"])) == [[]]
    lean = MinHashIndex(keep_signatures=False)
    lean.add_documents(part_a)
    with pytest.raises(ValueError, match="keep_signatures"):
        lean.query(compute_signatures([part_a[0][1]]), threshold=0.8)
    assert lean.query(compute_signatures([part_a[0][1]])) == [["a000"]]
