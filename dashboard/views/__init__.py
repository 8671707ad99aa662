"""The dashboard's pages: (url path, title, module with ``render()``), in sidebar order."""

from __future__ import annotations

from . import compare, data_page, experts, lineage, models, overview, run, serving

PAGES = (
    ("overview", "Overview", overview),
    ("run", "Run", run),
    ("compare", "Compare", compare),
    ("experts", "Experts", experts),
    ("data", "Data", data_page),
    ("lineage", "Lineage", lineage),
    ("models", "Models", models),
    ("serving", "Serving", serving),
)
