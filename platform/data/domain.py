"""Domain classifier: hashed character n-grams + multinomial logistic regression in numpy.

Labels are ``code``, ``prose``, ``math`` and ``dialogue``. The model is trained at run
time (well under a second) on the labelled seed set shipped in ``seed/domain_seed.jsonl``
(hand-written short examples, about 45 per label), so there is no weight file to version
and no download. Features are two hashed bags, each L2-normalised and log-scaled:

* raw character 2–4-grams (keywords, operators, LaTeX commands, "User:"),
* 3–5-grams over a *character-class* string (letter → ``a``, upper → ``A``, digit → ``0``,
  other characters kept), which captures layout — indentation, ``x = f(y)`` shapes,
  ``Name: text`` turns — independently of vocabulary.

Hashing is a numpy polynomial hash over code points, deterministic across processes
(Python's ``hash()`` is salted per process and must not be used here).
Training is full-batch gradient descent from zeros, so the model is deterministic.
Shape suffixes: ``_N`` examples, ``_D`` hashed feature dims, ``_C`` classes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from typing import Literal

from pydantic import Field, field_validator

from moeflow.platform.config import StageConfig

from .choices import check_choices
from .schema import BatchResult, Document, Excluded

STEP = "domain"
LABELS = ("code", "prose", "math", "dialogue")
SEED_PATH = Path(__file__).resolve().parent / "seed" / "domain_seed.jsonl"
_MULT = np.uint64(0x9E3779B97F4A7C15)


DomainLabel = Literal["code", "prose", "math", "dialogue"]  # == LABELS, the labels of the seed set


class DomainConfig(StageConfig):
    num_features: int = Field(1 << 12, ge=16, le=1 << 22, description="hashed feature dimensions (per bag x 2)")
    max_chars: int = Field(4000, ge=1, le=1 << 24, description="classify on the first max_chars characters")
    l2: float = Field(1e-3, ge=0.0, le=100.0, description="L2 penalty of the logistic regression")
    steps: int = Field(300, ge=1, le=100_000, description="full-batch gradient steps of training")
    learning_rate: float = Field(2.0, gt=0.0, le=1000.0, description="gradient-descent step size")
    drop_labels: list[DomainLabel] = Field(default_factory=list, description="labels to exclude; keep all by default")

    @field_validator("drop_labels", mode="before")
    @classmethod
    def _known_labels(cls, value):
        return check_choices(value, LABELS, "domain label")


def load_seed_examples(path: str | Path = SEED_PATH) -> list[tuple[str, str]]:
    """(text, label) pairs of the shipped seed set."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                out.append((rec["text"], rec["label"]))
    return out


def split_examples(examples: list[tuple[str, str]], holdout_fraction: float = 0.2) -> tuple[list, list]:
    """Deterministic train/held-out split by a hash of the text."""
    train, held = [], []
    for text, label in examples:
        h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < holdout_fraction else train).append((text, label))
    return train, held


def _char_classes(codes: np.ndarray) -> np.ndarray:
    out = codes.copy()
    lower = (codes >= ord("a")) & (codes <= ord("z"))
    upper = (codes >= ord("A")) & (codes <= ord("Z"))
    digit = (codes >= ord("0")) & (codes <= ord("9"))
    out[lower] = ord("a")
    out[upper] = ord("A")
    out[digit] = ord("0")
    out[codes > 127] = ord("a")  # non-ASCII letters behave like letters for layout purposes
    return out


def _hashed_ngrams(codes: np.ndarray, ns: range, salt: int, dims: int) -> np.ndarray:
    counts = np.zeros(dims, dtype=np.float64)
    for n in ns:
        m = len(codes) - n + 1
        if m <= 0:
            continue
        key = np.full(m, np.uint64(salt * 1000 + n), dtype=np.uint64)
        for j in range(n):
            key = (key ^ codes[j : j + m]) * _MULT
        key ^= key >> np.uint64(29)
        counts += np.bincount((key % np.uint64(dims)).astype(np.int64), minlength=dims)
    counts = np.log1p(counts)
    norm = float(np.sqrt(np.sum(counts * counts)))  # not linalg.norm: its BLAS call is slow on busy machines
    return counts / norm if norm > 0 else counts


def featurize(text: str, cfg: DomainConfig) -> np.ndarray:
    """(2 * num_features,) float64 feature vector."""
    codes = np.frombuffer(text[: cfg.max_chars].encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    raw = _hashed_ngrams(codes, range(2, 5), 1, cfg.num_features)
    shape = _hashed_ngrams(_char_classes(codes), range(3, 6), 2, cfg.num_features)
    return np.concatenate([raw, shape])


@dataclass
class DomainClassifier:
    weights_DC: np.ndarray
    bias_C: np.ndarray
    labels: tuple[str, ...]
    cfg: DomainConfig

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        feats_ND = np.stack([featurize(t, self.cfg) for t in texts]) if texts else np.zeros((0, self.weights_DC.shape[0]))
        return _softmax(feats_ND @ self.weights_DC + self.bias_C)

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        probs_NC = self.predict_proba(texts)
        return [(self.labels[int(i)], float(p[i])) for i, p in zip(probs_NC.argmax(axis=1), probs_NC)]


def _softmax(logits_NC: np.ndarray) -> np.ndarray:
    z = logits_NC - logits_NC.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train_domain_classifier(examples: list[tuple[str, str]], cfg: DomainConfig | None = None) -> DomainClassifier:
    cfg = cfg or DomainConfig()
    labels = tuple(sorted({label for _, label in examples}, key=lambda l: (LABELS + (l,)).index(l)))
    feats_ND = np.stack([featurize(t, cfg) for t, _ in examples])
    y_N = np.array([labels.index(l) for _, l in examples])
    onehot_NC = np.eye(len(labels))[y_N]
    # Gradient descent in the dual: with W = X^T A the primal update W -= lr (X^T G + l2 W)
    # is A -= lr (G + l2 A), and logits X W = K A with the small Gram matrix K = X X^T.
    # Same iterates as primal GD from zero, at (N x N) instead of (N x D) cost per step.
    gram_NN = feats_ND @ feats_ND.T
    dual_NC = np.zeros((len(examples), len(labels)))
    bias_C = np.zeros(len(labels))
    n = len(examples)
    for _ in range(cfg.steps):
        probs_NC = _softmax(gram_NN @ dual_NC + bias_C)
        grad_NC = (probs_NC - onehot_NC) / n
        dual_NC -= cfg.learning_rate * (grad_NC + cfg.l2 * dual_NC)
        bias_C -= cfg.learning_rate * grad_NC.sum(axis=0)
    weights_DC = feats_ND.T @ dual_NC
    return DomainClassifier(weights_DC, bias_C, labels, cfg)


def accuracy(clf: DomainClassifier, examples: list[tuple[str, str]]) -> float:
    preds = clf.predict([t for t, _ in examples])
    return sum(p == l for (p, _), (_, l) in zip(preds, examples)) / max(1, len(examples))


def domain_batch(docs: list[Document], clf: DomainClassifier, cfg: DomainConfig) -> BatchResult:
    out = BatchResult(kept=[])
    counts: dict[str, float] = {}
    preds = clf.predict([d.text for d in docs])
    for doc, (label, prob) in zip(docs, preds):
        counts[f"label.{label}"] = counts.get(f"label.{label}", 0) + 1
        doc = Document(doc.id, doc.text, doc.source, {**doc.metadata, "domain": label, "domain_prob": round(prob, 4)})
        if label in cfg.drop_labels:
            out.excluded.append(Excluded(doc, STEP, f"label_{label}", f"classified as {label} (p={prob:.2f})"))
        else:
            out.kept.append(doc)
    out.counters = counts
    return out
