"""The registered model as an MLflow pyfunc: ``mlflow.pyfunc.load_model("models:/<name>@<alias>")`` generates text.

``MoeflowTextModel`` is a ``PythonModel`` over the Hugging Face export: ``load_context`` reads the
export from the object store (``models/hf.py`` ``import_hf`` + its ``tokenizer.json``), ``predict``
renders each prompt with the one chat template (``models/chat.py``), runs the latent-cache
``generate`` (``models/generation.py``) and decodes up to the end of the assistant turn.

Stored once: the MLflow model folder holds only ``MLmodel``, the pickled (by reference) model class,
the requirements and the model card; its ``model_config`` names the export's store URI, which
``load_context`` fetches (checksum-verified, cached by content hash under ``MOEFLOW_HOME``). The
weights therefore live once, in the store, and loading the model needs what every moeflow process
needs: the package and access to the store.

Offline logging: ``save_text_model`` passes explicit, pinned ``pip_requirements`` (otherwise MLflow
infers them by loading the model in a subprocess) without duplicates (a package named twice with
different pins makes MLflow run ``pip install --dry-run`` against the index), and
``quiet_mlflow_env`` sets ``MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK`` so no version check reaches for the
network either.

This module imports MLflow at import time (the class must subclass ``PythonModel``); only the
registration path and MLflow's loader import it.
"""

from __future__ import annotations

import os
import shutil
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from .mlflow_env import quiet_mlflow_env

quiet_mlflow_env()

import mlflow.pyfunc  # noqa: E402  (after the environment above)

CARD_FILE = "README.md"
# what predict needs at run time; pinned to the versions installed here
_RUNTIME_PACKAGES = ("mlflow", "torch", "numpy", "tokenizers", "pandas", "pydantic", "pydantic-settings")


class MoeflowTextModel(mlflow.pyfunc.PythonModel):
    """Prompts in, generated text out. Input column ``prompt`` (a user message, or raw text with
    ``chat=False``); params ``max_new_tokens``, ``temperature``, ``top_p``, ``seed``, ``chat``."""

    def load_context(self, context) -> None:
        from moeflow.models.hf import import_hf
        from moeflow.models.tokenizer import Tokenizer

        local = fetch_hf_export(context.model_config["hf_uri"])
        self.model = import_hf(local).eval()
        self.tokenizer = Tokenizer.from_file(local / "tokenizer.json")

    def predict(self, context, model_input, params=None) -> list[str]:
        import torch

        from moeflow.models.chat import prompt_ids, stop_ids
        from moeflow.models.generation import generate

        params = {**DEFAULT_PARAMS, **(params or {})}
        prompts = _prompts(model_input)
        chat = bool(params["chat"])
        tok = self.tokenizer
        if chat:
            ids = [prompt_ids(tok, p) for p in prompts]
            stops = stop_ids(tok)
        else:
            ids = [tok.encode(p, add_bos=True) for p in prompts]
            stops = [tok.eos_id]
        max_new = int(params["max_new_tokens"])
        budget = self.model.cfg.max_seq_len - max_new
        if budget < 1:
            raise ValueError(f"max_new_tokens={max_new} leaves no room for a prompt "
                             f"(max_seq_len={self.model.cfg.max_seq_len})")
        ids = [row[-budget:] for row in ids]  # keep the end of a long prompt: it holds the generation prompt
        temperature = float(params["temperature"])
        with torch.no_grad():
            result = generate(self.model, ids, max_new, temperature=temperature,
                              top_p=float(params["top_p"]) if temperature > 0 else None,
                              stop_token_ids=stops, seed=int(params["seed"]), pad_id=tok.pad_id)
        return [tok.decode([t for t in row if t not in stops]) for row in result.tokens]


DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 0, "chat": True}


def _prompts(model_input) -> list[str]:
    """The prompt strings of a DataFrame (column ``prompt``), a dict, a list or a single string."""
    if hasattr(model_input, "columns"):  # pandas, what MLflow hands over after checking the signature
        if "prompt" not in model_input.columns:
            raise ValueError(f"input needs a 'prompt' column, got {list(model_input.columns)}")
        values = model_input["prompt"].tolist()
    elif isinstance(model_input, dict):
        values = model_input.get("prompt")
        values = [values] if isinstance(values, str) else list(values or [])
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    # MLflow turns {"prompt": ["a", "b"]} into a one-row frame whose cell is the list: unnest it
    values = [v for cell in values for v in (list(cell) if hasattr(cell, "__len__") and not isinstance(cell, str)
                                             else [cell])]
    bad = [type(v).__name__ for v in values if not isinstance(v, str)]
    if bad or not values:
        raise ValueError(f"prompts must be a non-empty list of strings (got {bad or 'none'})")
    return values


def fetch_hf_export(hf_uri: str) -> Path:
    """A local, verified copy of the export at ``hf_uri``, reused while its content hash is unchanged."""
    from moeflow.platform.settings import get_settings
    from moeflow.platform.store import read_artifact

    artifact = read_artifact(hf_uri)
    local = Path(get_settings().home) / "cache" / "hf-exports" / artifact.content_hash[:24]
    return artifact.download(local)


def signature():
    """Input: a ``prompt`` string column; output: a ``text`` string column; the generation params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    types = {int: "long", float: "double", bool: "boolean"}
    params = ParamSchema([ParamSpec(k, types[type(v)], v) for k, v in DEFAULT_PARAMS.items()])
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]),
                          outputs=Schema([ColSpec("string", "text")]), params=params)


def pip_requirements() -> list[str]:
    """One pinned line per runtime package (no duplicates: see the module docstring)."""
    pins = {}
    for package in ("moeflow", *_RUNTIME_PACKAGES):
        try:
            pins[package] = f"{package}=={metadata.version(package)}"
        except metadata.PackageNotFoundError:  # moeflow from a source checkout on PYTHONPATH
            continue
    return list(pins.values())


def save_text_model(path: str | os.PathLike, hf_uri: str, *, model_card: str | None = None) -> Path:
    """Write the MLflow model folder for the export at ``hf_uri`` (no weights: see the module docstring)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    with warnings.catch_warnings():
        # the signature is explicit; an input example would make MLflow run predict (load the weights) here
        warnings.filterwarnings("ignore", message=".*(input example was not provided|Add type hints to the `predict`)")
        mlflow.pyfunc.save_model(
            path=str(path), python_model=MoeflowTextModel(), model_config={"hf_uri": hf_uri},
            signature=signature(), pip_requirements=pip_requirements(),
            metadata={"moeflow.hf_uri": hf_uri, "model_card": CARD_FILE if model_card else None},
        )
    if model_card:
        (path / CARD_FILE).write_text(model_card, encoding="utf-8")
    return path


def register_text_model(tracker, name: str, hf_uri: str, *, artifact_path: str = "model", alias: str | None = None,
                        tags: dict | None = None, model_card: str | None = None) -> str:
    """Log the pyfunc folder for ``hf_uri`` into the tracker's active run and register it as a version of
    ``name`` (the model card becomes the version's description); returns the version."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="moeflow-pyfunc-") as tmp:
        local = save_text_model(Path(tmp) / "model", hf_uri, model_card=model_card)
        return tracker.register_model(name, local, artifact_path=artifact_path, alias=alias,
                                      tags={"moeflow.hf_uri": hf_uri, **(tags or {})}, description=model_card)
