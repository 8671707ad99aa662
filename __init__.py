"""moeflow: raw text to a served DeepSeek-style Mixture-of-Experts model.

The repository root *is* the ``moeflow`` package: its folders ``models/``, ``platform/``,
``tasks/``, ``flows/`` and ``dashboard/`` are the subpackages ``moeflow.models`` and so on.
``platform/`` deliberately has no ``__init__.py`` (it is a namespace portion of
``moeflow``) so that, from the repository root, ``import platform`` still finds the
standard library module: a regular module beats a namespace directory on ``sys.path``.
"""

__version__ = "0.1.0"
