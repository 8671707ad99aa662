"""The package layout contract: one ``moeflow`` namespace, and ``platform/`` never shadows
the standard library — also for commands started from the repository root."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def run_py(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_import_platform_from_repo_root_is_stdlib(repo_root):
    out = run_py("import platform; print(platform.__file__); print(platform.system())", repo_root)
    assert out.returncode == 0, out.stderr
    path, system = out.stdout.split()
    assert Path(path).resolve().parent == STDLIB
    assert system == "Linux"


@pytest.mark.parametrize("name", ["models", "tasks", "flows", "dashboard"])
def test_bare_subpackages_are_not_importable(repo_root, name):
    out = run_py(f"import {name}", repo_root)
    assert out.returncode != 0
    assert "import moeflow." in out.stderr or "ModuleNotFoundError" in out.stderr


def test_bare_platform_has_no_moeflow_modules(repo_root):
    out = run_py("import platform.settings", repo_root)
    assert out.returncode != 0


def test_moeflow_subpackages_import(repo_root):
    code = ("import moeflow.models, moeflow.platform.settings, moeflow.tasks, moeflow.flows, moeflow.dashboard;"
            "import platform; platform.system(); print('ok')")
    out = run_py(code, repo_root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_pytest_from_root_sees_stdlib_platform():
    import platform

    assert Path(platform.__file__).resolve().parent == STDLIB
    assert "moeflow" not in platform.__file__


def test_prefect_entrypoint_load_keeps_stdlib_platform(repo_root):
    code = ("from prefect.flows import load_flow_from_entrypoint;"
            "f = load_flow_from_entrypoint('flows/smoke.py:smoke');"
            "import platform; print(f.name, platform.system(), platform.__file__)")
    out = run_py(code, repo_root)
    assert out.returncode == 0, out.stderr[-3000:]
    name, system, path = out.stdout.split()[-3:]
    assert (name, system) == ("smoke", "Linux")
    assert Path(path).resolve().parent == STDLIB


def test_streamlit_script_dir_does_not_shadow(repo_root):
    # streamlit puts the script's folder on sys.path; emulate that for dashboard/app.py
    code = (f"import sys; sys.path.insert(0, {str(repo_root / 'dashboard')!r}); sys.path.insert(0, '');"
            "import platform; print(platform.__file__)")
    out = run_py(code, repo_root)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().parent == STDLIB


def test_installed_distribution_exposes_only_moeflow():
    from importlib.metadata import distribution

    dist = distribution("moeflow")
    top = {str(f).split("/")[0] for f in dist.files or []}
    for bare in ("platform", "models", "tasks", "flows"):
        assert bare not in top
