"""A served model from any model reference: its HF export, fetched once into the cache, with the name,
version and aliases the gateway routes by. Its own module because both the launcher (``moeflow serve``) and a
model replica (which resolves its reference itself on a cluster) need it, and the launcher imports the app.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..model_refs import resolve


@dataclass
class ResolvedModel:
    name: str
    version: str
    model_dir: str
    aliases: dict[str, str] = field(default_factory=dict)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def resolve_served(ref: str, *, settings=None, registry=None, default_alias: str = "champion") -> ResolvedModel:
    """A served model: the reference's HF export (``model_refs.resolve``), downloaded once into the cache."""
    from ..tracking.pyfunc import fetch_hf_export

    mref = resolve(ref, registry=registry, settings=settings)
    hf = mref.require_hf()
    model_dir = str(fetch_hf_export(hf)) if hf.startswith(("file:", "s3://")) else hf
    if mref.mlflow_name:
        aliases = {mref.alias: mref.mlflow_version, default_alias: mref.mlflow_version} if mref.alias else {}
        return ResolvedModel(mref.mlflow_name, mref.mlflow_version, model_dir, aliases)
    stored = mref.uri.startswith(("file:", "s3://"))
    return ResolvedModel(_slug(Path(mref.uri.rstrip("/")).name), "1" if stored else "local", model_dir)
