"""Prefect tasks: thin adapters, one module per stage."""

if __name__ != "moeflow.tasks":  # pragma: no cover - guard against 'import tasks' from the repo root
    raise ImportError("import moeflow.tasks, not the bare top-level 'tasks' package")
