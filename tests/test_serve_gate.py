"""The promotion gate on small tables: absolute bounds, regression vs the champion, missing metrics."""

from __future__ import annotations

import pytest

from moeflow.platform.serve.gate import GateConfig, decide, lower_is_better


@pytest.mark.parametrize("metric, lower", [("val_loss", True), ("val_bpb", True), ("hellaswag.acc", False),
                                           ("wiki.perplexity", True), ("pass_at_1", False)])
def test_direction_of_metrics(metric, lower):
    assert lower_is_better(metric) is lower


@pytest.mark.parametrize("candidate, champion, passed, failing", [
    ({"val_loss": 2.00, "acc": 0.50}, {"val_loss": 2.10, "acc": 0.48}, True, []),      # better on both
    ({"val_loss": 2.14, "acc": 0.50}, {"val_loss": 2.10, "acc": 0.48}, True, []),      # loss worse by 0.04 <= 0.05
    ({"val_loss": 2.16, "acc": 0.50}, {"val_loss": 2.10, "acc": 0.48}, False, ["val_loss"]),  # 0.06 > 0.05
    ({"val_loss": 2.00, "acc": 0.45}, {"val_loss": 2.10, "acc": 0.48}, False, ["acc"]),  # acc 0.03 worse > 0.01
    ({"val_loss": 2.00, "acc": 0.39}, {"val_loss": 2.10, "acc": 0.38}, False, ["acc"]),  # under the minimum 0.4
    ({"val_loss": 2.00, "acc": 0.50}, None, True, []),                                  # first promotion
    ({"acc": 0.50}, {"val_loss": 2.10, "acc": 0.48}, False, ["val_loss"]),            # candidate lacks a metric
    ({"val_loss": 2.00, "acc": 0.50}, {"acc": 0.48}, True, []),                        # champion lacks: skipped
    ({"val_loss": 3.10, "acc": 0.50}, None, False, ["val_loss"]),                      # over the maximum 3.0
])
def test_gate_decisions(candidate, champion, passed, failing):
    cfg = GateConfig(min_scores={"acc": 0.4}, max_scores={"val_loss": 3.0},
                     max_regression={"val_loss": 0.05, "acc": 0.01})
    d = decide(candidate, champion, cfg)
    assert d.passed is passed
    assert sorted({c.metric for c in d.checks if not c.passed}) == failing
    assert len(d.reasons) == 4 and all(isinstance(r, str) and r for r in d.reasons)
