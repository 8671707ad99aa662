"""The Streamlit dashboard (read-only view of the platform)."""

if __name__ != "moeflow.dashboard":  # pragma: no cover - guard against 'import dashboard' from the repo root
    raise ImportError("import moeflow.dashboard, not the bare top-level 'dashboard' package")
