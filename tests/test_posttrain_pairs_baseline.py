"""The generated preference pairs cannot be told apart by the reply's length or format alone.

A reward model that reached 0.8 on pairs whose rejected side is always shorter (a bare truncation) or
always differently shaped would have learnt a tell, not a preference. So a scorer that sees only the
REPLY's surface — characters, words, tokens-ish, digits, commas, brackets, end punctuation, "is a
number", "is a list" — and is fitted on the training pairs (logistic regression on feature differences,
both orientations of every pair) must stay near chance on the held-out pairs, per corruption kind.
A control shows the scorer is able to find a tell when one exists: the old bare truncation (rejected =
the summary's first third) is caught almost always.
"""

from __future__ import annotations

import random

import pytest
import torch

from moeflow.platform.posttrain.generated import GeneratedDataConfig, build_sets, stdlib_texts


def surface(reply: str) -> list[float]:
    words = reply.split()
    return [len(reply), len(words), sum(c.isdigit() for c in reply), reply.count(","), reply.count("["),
            float(reply.rstrip().endswith(".")), float(reply.strip().lstrip("-").isdigit()),
            float(reply.startswith("[")), sum(len(w) for w in words) / max(1, len(words)), float(reply[:1].isupper())]


def fit_surface_scorer(pairs: list[dict], steps: int = 300) -> torch.Tensor:
    """Weights w of r(reply) = w · standardised surface(reply), fitted by Bradley–Terry on ``pairs``."""
    diff = torch.tensor([[c - r for c, r in zip(surface(p["chosen"]), surface(p["rejected"]))] for p in pairs])
    scale = diff.std(dim=0).clamp_min(1e-6)
    x = torch.cat([diff, -diff]) / scale  # both orientations: no bias term can help
    y = torch.cat([torch.ones(len(diff)), torch.zeros(len(diff))])
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (w / scale).detach()


def surface_accuracy(w: torch.Tensor, pairs: list[dict]) -> float:
    """Share of pairs the surface scorer ranks right; a tie counts half (chance)."""
    score = 0.0
    for p in pairs:
        d = float(torch.tensor(surface(p["chosen"])) @ w - torch.tensor(surface(p["rejected"])) @ w)
        score += 1.0 if d > 1e-9 else 0.5 if abs(d) <= 1e-9 else 0.0
    return score / len(pairs)


def kind(p: dict) -> str:
    if p["prompt"].startswith("What does the function"):
        return "docstring"
    return "list" if p["chosen"].startswith("[") else "number"


@pytest.fixture(scope="module")
def sets():
    cfg = GeneratedDataConfig(max_functions=200, max_files=60, num_arithmetic=800, heldout_fraction=0.2)
    return build_sets(cfg, stdlib_texts(cfg.max_files))["preference"]


def test_a_surface_only_scorer_stays_near_chance_on_every_kind_of_generated_pair(sets):
    """Measured 2026-12-07 (this config): held-out surface-scorer accuracy 0.576 overall; wrong numbers 0.573 (the
    generator's offsets lean positive, 4 of 7, so "the smaller number" wins slightly more often), lists 0.491,
    docstrings 0.619 (swapped and truncated-then-continued); the old bare cut: 1.0 (test below)."""
    w = fit_surface_scorer(sets["train"])
    held = sets["heldout"]
    overall = surface_accuracy(w, held)
    per_kind = {k: surface_accuracy(w, [p for p in held if kind(p) == k]) for k in ("number", "list", "docstring")}
    print("surface-only scorer, held-out:", round(overall, 3), {k: round(v, 3) for k, v in per_kind.items()})
    assert 0.4 <= overall <= 0.6
    for k, acc in per_kind.items():
        assert 0.35 <= acc <= 0.65, (k, acc)
    # every length is possible on both sides: the rejected docstring is not shorter by construction
    docs = [p for p in sets["train"] if kind(p) == "docstring"]
    shorter = sum(len(p["rejected"].split()) < len(p["chosen"].split()) for p in docs) / len(docs)
    assert shorter < 0.6, shorter


def test_the_surface_scorer_finds_a_tell_when_there_is_one(sets):
    """Control: with the rejected docstring cut to its first third (the old corruption), the same scorer,
    fitted the same way, separates those pairs almost always."""
    rng = random.Random(0)

    def bare_cut(rows):
        out = []
        for p in rows:
            if kind(p) == "docstring":
                words = p["chosen"].split()
                p = {**p, "rejected": " ".join(words[: max(1, len(words) // 3)])}
                if p["rejected"] == p["chosen"]:
                    continue
            out.append(p)
        rng.shuffle(out)
        return out

    train, held = bare_cut(sets["train"]), bare_cut(sets["heldout"])
    w = fit_surface_scorer(train)
    acc = surface_accuracy(w, [p for p in held if kind(p) == "docstring"])
    print("surface-only scorer on bare truncations:", round(acc, 3))
    assert acc >= 0.75
