"""Quality rules (Gopher quality/repetition, C4, FineWeb, code) on small hand-made docs.

Each test isolates one rule: the other rule groups are switched off (or the text passes
them), and the exclusion reason must name exactly the rule under test.
"""

from __future__ import annotations

import base64
import random

import pytest

from moeflow.platform.data.filters import (
    C4Config,
    CodeQualityConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    QualityConfig,
    c4_document,
    c4_filter_lines,
    check_document,
    code_quality,
    doc_kind,
    dup_ngram_char_fraction,
    fineweb,
    gopher_quality,
    gopher_repetition,
    quality_batch,
    top_ngram_char_fraction,
)
from moeflow.platform.data.schema import Document

GOOD_PROSE = (
    "The river widens as it reaches the plain, and the old town was built on its northern bank.\n"
    "She had never liked the smell of the harbour, but after ten years away she missed it.\n"
    "The committee met on Tuesday to discuss the budget, and most members agreed with the plan.\n"
    "Bees communicate the location of flowers through movements that other workers can read.\n"
    "In the late afternoon the light turned golden and the shadows stretched across the road.\n"
    "The museum reopened after a long renovation, with new rooms devoted to the history of printing.\n"
)

GOOD_CODE = '''import os


def list_text_files(root):
    """Return the text files below root, sorted."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".txt"):
                out.append(os.path.join(dirpath, name))
    return sorted(out)
'''


def only(group: str, **kw) -> QualityConfig:
    """A QualityConfig with every prose group off except ``group`` (C4 line removal off)."""
    cfg = QualityConfig()
    for name in ("gopher_quality", "gopher_repetition", "c4", "fineweb"):
        getattr(cfg, name).enabled = name == group
    cfg.c4.remove_lines = False
    for key, value in kw.items():
        setattr(getattr(cfg, group), key, value)
    return cfg


def rule_of(text: str, cfg: QualityConfig, ext: str = "") -> str | None:
    return check_document(Document("d", text, "t", {"ext": ext} if ext else {}), cfg)[1]


def test_good_prose_and_code_pass_every_rule():
    assert rule_of(GOOD_PROSE, QualityConfig()) is None
    assert rule_of(GOOD_CODE, QualityConfig(), ext=".py") is None


# ---------------------------------------------------------------- Gopher quality
def test_gopher_min_and_max_words():
    cfg = GopherQualityConfig()
    assert gopher_quality("The cat sat on the mat with the dog.", cfg).startswith("min_doc_words")
    assert gopher_quality(GOOD_PROSE, cfg.model_copy(update={"max_doc_words": 20})).startswith("max_doc_words")


def test_gopher_mean_word_length():
    long_words = " ".join(["extraordinarilyconvoluted"] * 30 + ["the", "and"] * 10)
    assert gopher_quality(long_words, GopherQualityConfig()).startswith("max_avg_word_length")
    short_words = " ".join(["a", "to", "of", "the", "is", "an"] * 12)
    assert gopher_quality(short_words, GopherQualityConfig()).startswith("min_avg_word_length")


def test_gopher_symbol_ratio_bullets_ellipsis():
    hashes = GOOD_PROSE + " ".join(["#tag"] * 12)
    assert rule_of(hashes, only("gopher_quality")) == "gopher_quality.max_symbol_word_ratio"
    bullets = "\n".join(f"- the item number {w} is with us and that is fine" for w in "abcdefghij")
    assert rule_of(bullets, only("gopher_quality")) == "gopher_quality.max_bullet_lines_ratio"
    ellipsis = "\n".join(f"and then the {w} story went on and on with us..." for w in "abcdefghij")
    assert rule_of(ellipsis, only("gopher_quality", max_symbol_word_ratio=1.0)) == "gopher_quality.max_ellipsis_lines_ratio"


def test_gopher_alpha_words_and_stop_words():
    numbers = GOOD_PROSE + " " + " ".join(str(i * 7919) for i in range(200))
    assert rule_of(numbers, only("gopher_quality")) == "gopher_quality.max_non_alpha_words_ratio"
    no_stops = " ".join(random.Random(0).choice(["cats", "run", "fast", "dogs", "sleep", "well"]) for _ in range(80))
    assert rule_of(no_stops, only("gopher_quality")) == "gopher_quality.min_stop_words"


# ---------------------------------------------------------------- Gopher repetition
def test_gopher_duplicate_lines_and_paragraphs():
    line = "The same sentence is written here again and again for the test."
    dup_lines = GOOD_PROSE + "\n".join([line] * 6)
    assert rule_of(dup_lines, only("gopher_repetition")).startswith("gopher_repetition.dup_")
    paras = "\n\n".join(["A paragraph that repeats itself with the same words in it."] * 4 + [GOOD_PROSE])
    assert rule_of(paras, only("gopher_repetition")) == "gopher_repetition.dup_para_frac"


def test_gopher_top_and_duplicated_ngrams():
    words = ["alpha", "beta"] * 20 + GOOD_PROSE.split()
    assert top_ngram_char_fraction([w.lower() for w in words], 2) > 0.2
    assert gopher_repetition(" ".join(words), GopherRepetitionConfig()).startswith("top_2_gram")
    # a 5-gram repeated with different fillers: not a top-2-gram problem, a duplicated-5-gram one
    rng = random.Random(1)
    vocab = [f"w{i}x" for i in range(400)]
    parts = []
    for _ in range(12):
        parts += ["one", "two", "three", "four", "five"] + rng.sample(vocab, 6)
    assert dup_ngram_char_fraction(parts, 5) > 0.15
    cfg = GopherRepetitionConfig(top_n_grams=[])
    assert gopher_repetition(" ".join(parts), cfg).startswith("dup_5_gram")


# ---------------------------------------------------------------- C4
def test_c4_document_rules():
    cfg = C4Config()
    assert c4_document(GOOD_PROSE + "Lorem ipsum dolor sit amet.", cfg) == "lorem_ipsum"
    assert c4_document(GOOD_PROSE + "Use the {placeholder} here.", cfg) == "curly_bracket"
    assert c4_document("One sentence here. Two sentences here.", cfg).startswith("min_num_sentences")
    assert c4_document(GOOD_PROSE, cfg) is None


def test_c4_line_filters_rewrite_text():
    text = GOOD_PROSE + "Please enable JavaScript to view this page.\nMenu\nRead our cookie policy and terms of use.\n"
    kept, removed = c4_filter_lines(text, C4Config())
    assert removed == 3
    assert "JavaScript" not in kept and "Menu" not in kept and "cookie" not in kept
    doc = Document("d", text, "t", {})
    new_text, rule, _ = check_document(doc, QualityConfig())
    assert rule is None and new_text == GOOD_PROSE.strip()
    only_junk = "Menu\nHome\nContact us"
    assert rule_of(only_junk, QualityConfig(gopher_quality={"enabled": False}, gopher_repetition={"enabled": False})) == "c4.all_lines_removed"


# ---------------------------------------------------------------- FineWeb
def test_fineweb_rules():
    cfg = FineWebConfig()
    no_punct = "\n".join(f"this line has no final mark number {i} for the reader" for i in range(10))
    assert fineweb(no_punct, cfg).startswith("line_punct_ratio")
    short = GOOD_PROSE + "\n".join(f"Item {i}." for i in range(20))
    assert fineweb(short, cfg).startswith("short_line_ratio")
    dup = GOOD_PROSE + "The museum reopened after a long renovation, with new rooms devoted to the history of printing.\n"
    assert fineweb(dup, cfg).startswith("char_dup_ratio")
    newlines = "\n".join(f"Word{i} and more." for i in range(30))
    assert fineweb(newlines, cfg.model_copy(update={"short_line_thr": 1.0})).startswith("new_line_ratio")
    assert fineweb(GOOD_PROSE, cfg) is None


# ---------------------------------------------------------------- code
def test_code_rules():
    cfg = CodeQualityConfig()
    assert code_quality(GOOD_CODE, cfg) is None
    assert code_quality(GOOD_CODE + "x = '" + "a" * 1200 + "'\n", cfg).startswith("max_line_length")
    assert code_quality("\n".join(["#" * 60 + " " + "=" * 30] * 20), cfg).startswith("min_alnum_fraction")
    gen = "# This file is auto-generated by protoc. DO NOT EDIT.\n" + GOOD_CODE
    assert code_quality(gen, cfg).startswith("autogenerated")
    blob = base64.b64encode(random.Random(0).randbytes(6000)).decode()
    lines = [blob[i : i + 76] for i in range(0, len(blob), 76)]
    encoded = "DATA = (\n" + "\n".join(f'    "{ln}"' for ln in lines) + "\n)\n"
    assert code_quality(encoded, cfg).startswith("encoded_blob")


def test_rules_follow_doc_kind():
    assert doc_kind(Document("a", "", "s", {"ext": ".py"})) == "code"
    assert doc_kind(Document("a", "", "s", {"ext": ".md"})) == "prose"
    assert doc_kind(Document("a", "", "s", {"domain": "code"})) == "code"
    assert doc_kind(Document("a", "", "s", {"domain": "dialogue"})) == "prose"
    # code judged by prose rules would fail (no terminal punctuation); by code rules it passes
    assert rule_of(GOOD_CODE, QualityConfig()) is not None
    assert rule_of(GOOD_CODE, QualityConfig(), ext=".py") is None
    assert check_document(Document("a", GOOD_CODE, "s", {"domain": "code"}), QualityConfig())[1] is None


def test_quality_batch_accounts_for_every_doc():
    docs = [
        Document("a", GOOD_PROSE, "s", {}),
        Document("b", "too short.", "s", {}),
        Document("c", GOOD_CODE, "s", {"ext": ".py"}),
        Document("d", "x" * 2000, "s", {"ext": ".py"}),
    ]
    out = quality_batch(docs, QualityConfig())
    assert [d.id for d in out.kept] == ["a", "c"]
    assert {e.doc.id: e.rule for e in out.excluded} == {"b": "gopher_quality.min_doc_words", "d": "code.max_line_length"}
    assert len(out.kept) + len(out.excluded) == len(docs)
    assert out.counters["code_docs"] == 2 and out.counters["prose_docs"] == 2


@pytest.mark.parametrize("text", ["", "   \n  "])
def test_rules_survive_empty_text(text):
    check_document(Document("e", text, "s", {}), QualityConfig())
    check_document(Document("e", text or "\n", "s", {"ext": ".py"}), QualityConfig())
