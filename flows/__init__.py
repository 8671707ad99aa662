"""Prefect flows: wiring only."""

if __name__ != "moeflow.flows":  # pragma: no cover - guard against 'import flows' from the repo root
    raise ImportError("import moeflow.flows, not the bare top-level 'flows' package")
