"""Maps the repository root onto the ``moeflow`` import namespace.

pyproject.toml holds the metadata; this file exists only because the package list is
computed: every folder under models/, platform/, tasks/, flows/ and dashboard/ becomes
``moeflow.<folder>`` (platform/ and other folders without ``__init__.py`` are namespace
packages, see ``__init__.py``).
"""

from setuptools import find_namespace_packages, setup

SUBPACKAGES = ("models", "platform", "tasks", "flows", "dashboard")

packages = ["moeflow"] + [
    f"moeflow.{name}"
    for name in find_namespace_packages(include=[f"{p}" for p in SUBPACKAGES] + [f"{p}.*" for p in SUBPACKAGES])
    if "__pycache__" not in name
]

setup(
    packages=packages,
    package_dir={"moeflow": "."},
    # recipes and evaluation task files (configs/ is not a package) and the catalog's Alembic files travel with the code
    package_data={"moeflow": ["configs/*.yaml", "configs/eval/*.yaml", "configs/eval/*.jsonl"], "": ["*.ini", "*.mako", "*.json", "*.jsonl", "*.txt", "*.yaml"]},
    include_package_data=True,
)
