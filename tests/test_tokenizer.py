"""Byte-level BPE: lossless round trips (code, CJK, emoji, any UTF-8), special tokens, determinism."""

from __future__ import annotations

import pickle
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from moeflow.models.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe

CJK = [
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "東京は日本の首都です。ひらがなとカタカナと漢字を使います。",
    "한국어 문장도 올바르게 처리되어야 합니다.",
    "深度学习模型需要大量的训练数据和计算资源。混合专家模型只激活一部分参数。",
]
EMOJI = ["Launch day 🚀🎉 — thanks 👍🏽 to the team 👩‍💻👨‍👩‍👧", "flags 🇯🇵🇩🇪 and math ∑ x² ≤ ∞"]


def corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8")[:20_000] for p in sorted(stdlib.glob("[a-c]*.py"))[:12]]
    return texts + CJK * 5 + EMOJI * 5


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(corpus(), vocab_size=800)


ROUND_TRIP = [
    "def f(x):\n    return x ** 2  # square\n",
    "\t\tindented\r\nwindows line\n\n\n   trailing   ",
    "Numbers 1234567890 and 3.14159, -42, 1e-9",
    *CJK,
    *EMOJI,
    "未见过的字：龘靐齉 𠀀𪚥 (astral CJK)",
    "control \x00\x01\x1b[31m and zero\u200bwidth, combining é vs é",
    "",
    " ",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text  # specials skipped by default
    assert tok.decode(ids, skip_special=False) == "<|bos|>" + text + "<|eos|>"


def test_random_unicode_round_trips(tok):
    rng = random.Random(0)
    for _ in range(50):
        chars = [chr(rng.choice([rng.randrange(32, 0x7F), rng.randrange(0xA0, 0xD7FF), rng.randrange(0xE000, 0x10FFFF)]))
                 for _ in range(rng.randrange(1, 40))]
        text = "".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF)
        assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_special_tokens_distinct_and_first(tok):
    ids = [tok.special_ids[t] for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    assert {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"} <= set(tok.special_ids)


def test_plain_text_never_produces_special_ids(tok):
    text = "a web page that says <|eos|> and <|bos|><|pad|> <|user|> hi <|assistant|>"
    specials = set(tok.special_ids.values())
    ids = tok.encode(text, add_bos=False)
    assert not specials & set(ids)
    assert tok.decode(ids) == text
    for ids in tok.encode_batch([text, "<|end|>"], add_bos=False):
        assert not specials & set(ids)
    flat, _ = tok.encode_batch_flat([text], add_bos=False, add_eos=False)
    assert not specials & set(flat.tolist())
    # templates opt in explicitly
    assert tok.encode("<|user|>hi<|end|>", add_bos=False, allow_special=True)[0] == tok.special_ids["<|user|>"]
    assert tok.encode("<|eos|>", add_bos=False, allow_special=True) == [tok.eos_id]


def test_training_is_deterministic_and_respects_vocab(tok):
    again = train_bpe(corpus(), vocab_size=800)
    assert again.to_str() == tok.to_str()
    assert tok.vocab_size == 800
    assert tok.bytes_per_token(corpus()) > 2.0  # it learned merges


def test_digits_split_in_groups_of_three(tok):
    pieces = [p for p, _ in tok._hf.pre_tokenizer.pre_tokenize_str("x=1234567")]
    assert pieces == ["x", "=", "123", "456", "7"]
    assert all(len(tok.decode([i])) <= 3 for i in tok.encode("99999999", add_bos=False))


def test_encode_batch_matches_encode(tok):
    texts = ROUND_TRIP[:6]
    assert tok.encode_batch(texts, add_eos=True) == [tok.encode(t, add_eos=True) for t in texts]
    flat, lengths = tok.encode_batch_flat(texts, dtype=np.uint16)
    assert flat.dtype == np.uint16 and lengths.sum() == len(flat)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for text, s, n in zip(texts, starts, lengths):
        assert flat[s:s + n].tolist() == tok.encode(text, add_bos=True, add_eos=True)


def test_save_load_and_pickle(tok, tmp_path):
    path = tok.save(tmp_path / "t" / "tokenizer.json")
    loaded = Tokenizer.from_file(path)
    text = CJK[0] + EMOJI[0]
    assert loaded.encode(text) == tok.encode(text) and loaded.vocab_size == tok.vocab_size
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.from_file(tmp_path / "missing.json")


def test_byte_budget_limits_training_text():
    tok = train_bpe(corpus(), vocab_size=400, max_train_bytes=5_000)
    assert 0 < tok.training_stats["num_train_bytes"] <= 5_000
    assert tok.training_stats["num_train_texts"] >= 1


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="no non-empty text"):
        train_bpe(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match="must include"):
        train_bpe(["abc"], vocab_size=300, special_tokens=["<|bos|>"])
    from tokenizers import Tokenizer as HF
    from tokenizers.models import BPE

    with pytest.raises(ValueError, match="lacks the special tokens"):
        Tokenizer(HF(BPE()))


def test_long_texts_encoded_in_pieces_give_identical_ids(tok):
    from moeflow.models.tokenizer import split_at_pretoken_boundaries

    texts = corpus()[:6] + ["  x  \n\n  y\r\n\tz " * 50, "nospace" * 200, " ".join(CJK * 20)]
    whole, whole_len = tok.encode_batch_flat(texts)
    pieces, pieces_len = tok.encode_batch_flat(texts, chunk_chars=37)
    assert np.array_equal(whole, pieces) and np.array_equal(whole_len, pieces_len)
    for text in texts:
        parts = split_at_pretoken_boundaries(text, 37)
        assert "".join(parts) == text
        assert len(text) < 1000 or len(parts) > 1 or " " not in text


def test_safe_cuts_hold_on_adversarial_whitespace_and_punctuation(tok):
    rng = random.Random(1)
    alphabet = [" ", " ", "\n", "\r", "\t", "a", "Ab", "中", "1", "(", "'", "s", "ll", "!", "_", "é", "🚀"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(20, 300))) for _ in range(200)]
    whole, _ = tok.encode_batch_flat(texts)
    pieces, _ = tok.encode_batch_flat(texts, chunk_chars=5)
    assert np.array_equal(whole, pieces)


def test_transformers_loads_the_same_tokenizer(tok, tmp_path):
    """The saved tokenizer.json is a plain HF file: transformers encodes and decodes identically."""
    from transformers import PreTrainedTokenizerFast

    path = tok.save(tmp_path / "tokenizer.json")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|bos|>", eos_token="<|eos|>",
                                 pad_token="<|pad|>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in ROUND_TRIP[:8]:
        ids = tok.encode(text, add_bos=False)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == text
