"""The promotion gate: may a model version become the serving champion? Pure functions over metrics.

Inputs are the evaluation metrics attached to the model versions (the evaluate stage writes them
as MLflow model-version tags ``eval.<metric>``; ``registry.version_metrics`` reads them back).
Two kinds of checks, each reported with a one-line reason:

- absolute: ``min_scores`` (metric must be >= the bound, for higher-is-better metrics such as
  accuracies) and ``max_scores`` (<= the bound, e.g. ``val_loss``);
- relative to the current champion: ``max_regression`` — the candidate may be worse than the
  champion by at most x (absolute units of the metric) on each named metric; which direction is
  "worse" comes from ``lower_is_better`` (names ending in ``loss``, ``bpb``, ``perplexity`` or
  ``ppl`` by default). With no champion yet the relative checks pass (the first promotion).

A metric the gate names but the candidate lacks fails the gate (an unevaluated model is never
promoted by accident); a metric the champion lacks skips that relative check, with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import Field

from ..config import StageConfig

LOWER_IS_BETTER_SUFFIXES = ("loss", "bpb", "perplexity", "ppl")


class GateConfig(StageConfig):
    min_scores: dict[str, float] = Field(default_factory=dict, description="metric -> minimum (higher is better)")
    max_scores: dict[str, float] = Field(default_factory=dict, description="metric -> maximum (lower is better)")
    max_regression: dict[str, float] = Field(
        default_factory=lambda: {"val_loss": 0.0},
        description="metric -> how much worse than the current champion the candidate may be (absolute)")
    lower_is_better: list[str] = Field(default_factory=list,
                                       description="extra metric names where lower is better")


@dataclass
class Check:
    metric: str
    kind: str            # "min" | "max" | "regression"
    passed: bool
    reason: str
    candidate: float | None = None
    reference: float | None = None


@dataclass
class Decision:
    passed: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "checks": [c.__dict__ for c in self.checks]}


def lower_is_better(metric: str, extra: list[str] = ()) -> bool:
    base = metric.rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    return metric in extra or base.endswith(LOWER_IS_BETTER_SUFFIXES)


def decide(candidate: dict[str, float], champion: dict[str, float] | None, config: GateConfig) -> Decision:
    checks: list[Check] = []
    for metric, bound in sorted(config.min_scores.items()):
        v = candidate.get(metric)
        if v is None:
            checks.append(Check(metric, "min", False, f"{metric}: missing on the candidate (needs >= {bound:g})"))
        else:
            ok = v >= bound
            checks.append(Check(metric, "min", ok, f"{metric} = {v:.6g} {'>=' if ok else '<'} minimum {bound:g}",
                                v, bound))
    for metric, bound in sorted(config.max_scores.items()):
        v = candidate.get(metric)
        if v is None:
            checks.append(Check(metric, "max", False, f"{metric}: missing on the candidate (needs <= {bound:g})"))
        else:
            ok = v <= bound
            checks.append(Check(metric, "max", ok, f"{metric} = {v:.6g} {'<=' if ok else '>'} maximum {bound:g}",
                                v, bound))
    for metric, allowed in sorted(config.max_regression.items()):
        v = candidate.get(metric)
        if v is None:
            checks.append(Check(metric, "regression", False, f"{metric}: missing on the candidate"))
            continue
        if champion is None:
            checks.append(Check(metric, "regression", True, f"{metric}: no champion yet, nothing to regress from", v))
            continue
        ref = champion.get(metric)
        if ref is None:
            checks.append(Check(metric, "regression", True, f"{metric}: the champion has no value, check skipped", v))
            continue
        worse_by = (v - ref) if lower_is_better(metric, config.lower_is_better) else (ref - v)
        ok = worse_by <= allowed + 1e-12
        word = "worse" if worse_by > 0 else "better"
        checks.append(Check(metric, "regression", ok,
                            f"{metric} = {v:.6g} vs champion {ref:.6g}: {abs(worse_by):.4g} {word} "
                            f"({'within' if ok else 'beyond'} the allowed {allowed:g})", v, ref))
    return Decision(all(c.passed for c in checks), checks)
