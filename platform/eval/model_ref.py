"""Which model to evaluate: resolve a reference to an artefact, then load model + tokenizer.

A reference is one of:

| form | meaning |
| --- | --- |
| ``/local/dir`` | an HF export (``config.json`` + ``tokenizer.json``) or a training checkpoint (``meta.json``) |
| ``file:///…``, ``s3://bucket/…`` | an artefact in the object store (downloaded to a cache folder) |
| ``catalog:<id>`` | a catalog model version (its ``checkpoint_uri``) |
| ``<name>@<alias>``, ``models:/<name>@<alias>`` | an MLflow registered model alias (e.g. ``moe-tiny@pretrained``) |
| ``<name>/<version>``, ``models:/<name>/<version>`` | an MLflow model version number |

An MLflow version points at its store artefact through the ``moeflow.artifact_uri`` tag that
``StageRun.register_model_version`` sets. The resolved ``ModelRef`` keeps the MLflow name/version
and catalog id, so the evaluate stage can write its results back onto them.

A checkpoint carries no tokenizer: ``tokenizer`` (a ``tokenizer.json`` path or store URI, e.g. the
token artefact's) is used when the model artefact has no ``tokenizer.json`` of its own.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from moeflow.models.tokenizer import Tokenizer

_MLFLOW_ALIAS = re.compile(r"^(?:models:/)?(?P<name>[A-Za-z0-9_.\-]+)@(?P<alias>[A-Za-z0-9_\-]+)$")
_MLFLOW_VERSION = re.compile(r"^(?:models:/)?(?P<name>[A-Za-z0-9_.\-]+)/(?P<version>\d+)$")


class ModelRefError(ValueError):
    """A model reference that does not resolve (one line for the user)."""


@dataclass
class ModelRef:
    ref: str                       # what the user typed
    uri: str                       # local dir or store URI of the artefact
    mlflow_name: str | None = None
    mlflow_version: str | None = None
    catalog_id: str | None = None

    @property
    def label(self) -> str:
        if self.mlflow_name:
            return f"{self.mlflow_name}/{self.mlflow_version}"
        return self.ref


@dataclass
class LoadedModel:
    ref: ModelRef
    model: torch.nn.Module
    tokenizer: Tokenizer
    local_dir: Path


def _mlflow_client(settings=None):
    from moeflow.platform.settings import get_settings
    from moeflow.platform.tracking import _quiet_mlflow_env

    _quiet_mlflow_env()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(settings or get_settings()).tracking_uri)


def _from_mlflow(ref: str, name: str, *, alias: str | None = None, version: str | None = None,
                 settings=None, tracker=None) -> ModelRef:
    from mlflow.exceptions import MlflowException

    client = getattr(tracker, "client", None) or _mlflow_client(settings)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelRefError(f"MLflow has no model version {ref!r} ({exc.error_code})") from None
    uri = (mv.tags or {}).get("moeflow.artifact_uri")
    if not uri:
        raise ModelRefError(f"MLflow model {name}/{mv.version} has no 'moeflow.artifact_uri' tag: not a moeflow model")
    return ModelRef(ref, uri, mlflow_name=name, mlflow_version=str(mv.version))


def resolve(ref: str, *, settings=None, catalog=None, tracker=None) -> ModelRef:
    """The artefact behind ``ref`` (see the module docstring for the forms); MLflow references go
    through ``tracker``'s client when it has one, else the settings' tracking URI."""
    ref = ref.strip()
    if not ref:
        raise ModelRefError("empty model reference")
    if ref.startswith(("file:", "s3://")):
        return ModelRef(ref, ref)
    if ref.startswith("catalog:"):
        from moeflow.platform.catalog import Catalog

        cat = catalog or Catalog.from_settings(settings)
        try:
            row = cat.get_model(ref.split(":", 1)[1])
        except KeyError as exc:
            raise ModelRefError(str(exc)) from None
        finally:
            if catalog is None:
                cat.close()
        return ModelRef(ref, row["checkpoint_uri"], catalog_id=row["id"])
    if Path(ref).expanduser().is_dir():
        return ModelRef(ref, str(Path(ref).expanduser().resolve()))
    if m := _MLFLOW_ALIAS.match(ref):
        return _from_mlflow(ref, m["name"], alias=m["alias"], settings=settings, tracker=tracker)
    if m := _MLFLOW_VERSION.match(ref):
        return _from_mlflow(ref, m["name"], version=m["version"], settings=settings, tracker=tracker)
    raise ModelRefError(f"cannot resolve model {ref!r}: not a directory, store URI, catalog:<id>, "
                        "<name>@<alias> or <name>/<version>")


def _local(uri: str, cache_dir: str | None) -> Path:
    if not uri.startswith(("file:", "s3://")):
        return Path(uri)
    from moeflow.platform.store import read_artifact

    target = Path(cache_dir or tempfile.mkdtemp(prefix="moeflow-eval-model-"))
    return Path(read_artifact(uri).download(str(target)))


def _tokenizer(path_or_uri: str) -> Tokenizer:
    if path_or_uri.startswith(("file:", "s3://")):
        from moeflow.platform.store import store_for_uri

        store, key = store_for_uri(path_or_uri)
        return Tokenizer.from_str(store.get_bytes(key))
    return Tokenizer.from_file(path_or_uri)


def load(ref: str | ModelRef, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         tokenizer: str | None = None, settings=None, cache_dir: str | None = None) -> LoadedModel:
    """Resolve ``ref`` and load the model (eval mode) and its tokenizer."""
    mref = ref if isinstance(ref, ModelRef) else resolve(ref, settings=settings)
    local = _local(mref.uri, cache_dir)
    if (local / "config.json").is_file():
        from moeflow.models.hf import import_hf

        model = import_hf(local, dtype=dtype, device=device)
    elif (local / "meta.json").is_file():
        from moeflow.platform.train.evaluate import load_model

        model = load_model(local, device)
        if dtype is not None:
            model = model.to(dtype)
    else:
        raise ModelRefError(f"{mref.uri}: neither an HF export (config.json) nor a checkpoint (meta.json)")
    tok_source = str(local / "tokenizer.json") if (local / "tokenizer.json").is_file() else tokenizer
    if tok_source is None:
        raise ModelRefError(f"{mref.uri} has no tokenizer.json: pass tokenizer=<path or store URI>")
    tok = _tokenizer(tok_source)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ModelRefError(f"tokenizer has {tok.vocab_size} ids but the model's vocabulary is {model.cfg.vocab_size}")
    return LoadedModel(mref, model.eval(), tok, local)
