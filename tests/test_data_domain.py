"""Domain classifier (hashed char n-grams + logistic regression) on the shipped seed set."""

from __future__ import annotations

from collections import Counter

from moeflow.platform.data.domain import (
    LABELS,
    DomainConfig,
    accuracy,
    domain_batch,
    load_seed_examples,
    split_examples,
    train_domain_classifier,
)
from moeflow.platform.data.schema import Document


def test_seed_set_shape():
    counts = Counter(label for _, label in load_seed_examples())
    assert set(counts) == set(LABELS)
    assert all(40 <= n <= 80 for n in counts.values()), counts


def test_held_out_accuracy():
    train, held = split_examples(load_seed_examples(), holdout_fraction=0.25)
    assert len(held) >= 30 and {l for _, l in held} == set(LABELS)
    clf = train_domain_classifier(train)
    acc = accuracy(clf, held)
    print(f"domain classifier held-out accuracy: {acc:.3f} on {len(held)} examples")
    assert acc >= 0.85
    # chance-level labels would score ~0.25: the model learned something
    assert accuracy(clf, train) >= 0.95


def test_unseen_examples_and_batch_metadata():
    clf = train_domain_classifier(load_seed_examples())
    docs = [
        Document("p", "The harbour was quiet that morning, and the fishermen talked about the storm coming from the west.", "s", {}),
        Document("c", "def area(r):\n    return 3.14159 * r ** 2\n\nprint(area(2.0))\n", "s", {}),
        Document("m", "Let $n \\ge 1$. Then $\\sum_{k=1}^{n} (2k - 1) = n^2$, by induction on $n$.", "s", {}),
        Document("d", "Anna: Is the shop still open?\nBen: Until six, I think.\nAnna: Great, let's go.", "s", {}),
    ]
    out = domain_batch(docs, clf, DomainConfig())
    assert [d.metadata["domain"] for d in out.kept] == ["prose", "code", "math", "dialogue"]
    assert all(0.25 < d.metadata["domain_prob"] <= 1 for d in out.kept)
    dropped = domain_batch(docs, clf, DomainConfig(drop_labels=["code"]))
    assert [e.doc.id for e in dropped.excluded] == ["c"] and dropped.excluded[0].rule == "label_code"


def test_training_is_deterministic():
    examples = load_seed_examples()[::3]
    a = train_domain_classifier(examples, DomainConfig(steps=50))
    b = train_domain_classifier(examples, DomainConfig(steps=50))
    assert (a.weights_DC == b.weights_DC).all()
