"""Import direction and the one stage registry, checked rather than hoped for.

import-linter (contracts in pyproject.toml): models <- platform <- tasks <- flows, dashboard <-
platform, models free of services and pydantic, platform free of Prefect (except the CLI and
the stage glue). Dynamic imports are invisible to it, so a second test checks that the only
module loading code by name is the stage registry.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _lint(config: Path) -> subprocess.CompletedProcess:
    """Run import-linter on the checkout. grimp finds packages on sys.path, and neither the clone's
    folder name nor the editable install's finder gives it ``moeflow`` with its namespace portion
    ``moeflow.platform``: a scratch folder holding a ``moeflow`` link to the checkout does."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="moeflow-lint-") as tmp:
        (Path(tmp) / "moeflow").symlink_to(REPO, target_is_directory=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")])}
        code = ("import sys; from importlinter.cli import lint_imports; "
                f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))")
        return subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=300)


def test_import_contracts_are_kept():
    proc = _lint(REPO / "pyproject.toml")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "6 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_dynamic_imports_only_in_the_stage_registry():
    allowed = {REPO / "platform" / "stages.py"}
    offenders = []
    for folder in ("models", "platform", "tasks", "flows", "dashboard"):
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    fn = node.func
                    name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                    if name in ("import_module", "__import__") and path not in allowed and not _relative(node):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def _relative(call: ast.Call) -> bool:
    """``import_module(".sub", __name__)``: a package lazily loading its own submodule (same layer)."""
    first = call.args[0] if call.args else None
    if isinstance(first, ast.Constant):
        return str(first.value).startswith(".")
    if isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant):
        return str(first.values[0].value).startswith(".")
    return False


def test_every_registered_stage_has_its_flow_and_config_and_nothing_else_lists_them():
    from moeflow.platform.stages import STAGES, RunOptions, config_sections

    sections = config_sections()
    for spec in STAGES.values():
        module, attr = spec.flow.split(":")
        assert (REPO / "flows" / f"{module.rsplit('.', 1)[1]}.py").is_file(), spec.flow
        if spec.config and spec.name not in ("curate",):  # curate's descriptions: the curation work (issue 8)
            cls = spec.load_config()
            assert all(f.description for f in cls.model_fields.values()), spec.config
    # every flow parameter is a recipe section or a run option: the recipe validation covers them all
    import inspect

    for spec in STAGES.values():
        flow = spec.load_flow()
        assert flow.name == spec.name
        for param in inspect.signature(flow.fn).parameters:
            assert param in sections or param in RunOptions.model_fields, (spec.name, param)
    # the consumers read the registry instead of keeping a list
    for path in ("platform/cli.py", "flows/deployments.py", "dashboard/app.py"):
        text = (REPO / path).read_text()
        assert "STAGES" in text and '"tokenize", "pretrain"' not in text, path
