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


def test_wheel_holds_only_the_moeflow_namespace(repo_root, tmp_path):
    """A built wheel installs ``moeflow/...`` only (no top-level platform, models, ...), migrations included."""
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(repo_root)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("moeflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"moeflow", next(t for t in tops if t.endswith(".dist-info"))}
    assert "moeflow/platform/settings.py" in names
    assert not any(n.startswith("moeflow/platform/__init__") for n in names)
    assert any(n.startswith("moeflow/platform/catalog/migrations/versions/") for n in names)
    assert "moeflow/configs/tiny.yaml" in names
