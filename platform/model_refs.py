"""One model reference resolver and one loader: what post-training, evaluation and serving accept.

| form | meaning |
| --- | --- |
| ``None`` / ``""`` + ``default_name`` | the newest catalog model version of that name (the previous stage's) |
| ``catalog:<id>``, ``<id>`` | a catalog model version (its ``checkpoint_uri``) |
| ``<name>@<alias>``, ``models:/<name>@<alias>`` | an MLflow registered model alias (e.g. ``moe-sft@sft``) |
| ``<name>/<version>``, ``models:/<name>/<version>`` | an MLflow model version number |
| ``file:///…``, ``s3://bucket/…`` | a store artefact: an HF export or a training checkpoint |
| ``/local/dir`` | an HF export (``config.json``) or a checkpoint (``meta.json``) on disk |

An MLflow version points at its store artefact through the ``moeflow.artifact_uri`` tag
(``moeflow.hf_uri`` for versions registered by the pyfunc helper alone). A training checkpoint
(``<run>/checkpoints/step-N``, how pretraining records its model) maps to its run's ``<run>/hf``
export when that export was made from this very checkpoint. Whatever the form, the ``ModelRef``
carries everything that is known: the artefact, its HF export, the catalog id and the MLflow
name/version (found by tag when the reference was a URI), so every stage can write back onto it.

Why one module: post-training, evaluation and serving each had their own copy, and each knew a
different subset of the forms above.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

_ALIAS = re.compile(r"^(?:models:/)?(?P<name>[A-Za-z0-9_.\-]+)@(?P<alias>[A-Za-z0-9_\-]+)$")
_VERSION = re.compile(r"^(?:models:/)?(?P<name>[A-Za-z0-9_.\-]+)/(?P<version>\d+)$")
ARTIFACT_TAGS = ("moeflow.artifact_uri", "moeflow.hf_uri")   # a registered version -> its store artefact
FIND_TAGS = ("moeflow.artifact_uri", "moeflow.checkpoint_uri")  # a store URI -> the version registered from it
HF_DIR = "hf"


class ModelRefError(LookupError, ValueError):
    """A model reference that does not resolve or load (one line for the user)."""


@dataclass
class ModelRef:
    ref: str                              # what the user typed (or the default it came from)
    uri: str                              # the artefact: store URI or local directory
    hf_uri: str | None = None             # its HF export (the artefact itself, or a checkpoint's run export)
    catalog_id: str | None = None
    catalog_name: str | None = None
    mlflow_name: str | None = None
    mlflow_version: str | None = None
    alias: str | None = None              # the alias the reference named, if any

    @property
    def model_id(self) -> str | None:
        return self.catalog_id

    @property
    def checkpoint_uri(self) -> str | None:
        return self.uri if self.uri != self.hf_uri else None

    @property
    def label(self) -> str:
        return f"{self.mlflow_name}/{self.mlflow_version}" if self.mlflow_name else self.ref

    def require_hf(self) -> str:
        """The HF export's URI, or a one-line error (post-training and serving need the export + tokenizer)."""
        if not self.hf_uri:
            raise ModelRefError(f"{self.uri}: neither an HF export nor a checkpoint with one (config.json + tokenizer)")
        return self.hf_uri


# ------------------------------------------------------------------ resolution
def _is_store_uri(ref: str) -> bool:
    return ref.startswith(("file:", "s3://"))


def hf_export_of(store, model_uri: str) -> str | None:
    """The HF export of a store artefact: the artefact itself, or for a checkpoint ``<run>/checkpoints/step-N``
    the run's ``<run>/hf`` when it was made from this very checkpoint (the run's last); else None."""
    from moeflow.platform.train.checkpoint import CHECKPOINTS_DIR

    if "config.json" in store.read_artifact(model_uri).names():
        return model_uri
    run_prefix, sep, _ = model_uri.rstrip("/").rpartition(f"/{CHECKPOINTS_DIR}/")
    candidate = f"{run_prefix}/{HF_DIR}" if sep else None
    if candidate and store.artifact_exists(candidate):
        if store.read_artifact(candidate).metadata.get("checkpoint_uri") in (None, model_uri):
            return candidate
    return None


def _registry(registry, tracker, settings):
    if registry is not None:
        return registry
    from moeflow.platform.serve.registry import MLflowRegistry

    client = getattr(tracker, "client", None)
    if client is not None:
        return MLflowRegistry.from_client(client)
    from moeflow.platform.settings import get_settings

    return MLflowRegistry((settings or get_settings()).tracking_uri)


def _from_registry(ref: str, name: str, *, alias: str | None, version: str | None, registry) -> ModelRef:
    from moeflow.platform.serve.registry import RegistryError

    if alias:
        version = registry.alias_version(name, alias)
        if version is None:
            raise ModelRefError(f"the MLflow registry has no alias {name}@{alias}")
    try:
        tags = registry.version_tags(name, version)
    except RegistryError:
        raise ModelRefError(f"the MLflow registry has no model version {name}/{version}") from None
    uri = next((tags[t] for t in ARTIFACT_TAGS if tags.get(t)), None)
    if not uri:
        raise ModelRefError(f"MLflow model {name}/{version} has no {' or '.join(ARTIFACT_TAGS)} tag: not a moeflow model")
    return ModelRef(ref, uri, mlflow_name=name, mlflow_version=str(version), alias=alias)


def _from_catalog(ref: str, model_id: str, catalog) -> ModelRef:
    try:
        row = catalog.get_model(model_id)
    except KeyError as exc:
        raise ModelRefError(str(exc).strip("'\"")) from None
    return ModelRef(ref, row["checkpoint_uri"], catalog_id=row["id"], catalog_name=row["name"])


def _complete(mref: ModelRef, *, store, catalog, tracker, settings) -> ModelRef:
    """Fill in the HF export, the catalog id and the MLflow version of a resolved artefact."""
    if _is_store_uri(mref.uri):
        from moeflow.platform.store import store_for_uri

        own = store is not None and mref.uri.startswith(store.root_uri.rstrip("/") + "/")
        st = store if own else store_for_uri(mref.uri, settings)[0]
        if not st.artifact_exists(mref.uri):
            raise ModelRefError(f"no committed artefact at {mref.uri}")
        mref.hf_uri = mref.hf_uri or hf_export_of(st, mref.uri)
    elif (Path(mref.uri) / "config.json").is_file():
        mref.hf_uri = mref.uri
    if catalog is not None and mref.catalog_id is None:
        for uri in dict.fromkeys(u for u in (mref.uri, mref.hf_uri) if u):
            row = catalog.get_artifact(uri)
            if row and row.get("kind") == "model":
                mref.catalog_id, mref.catalog_name = row["id"], row.get("name")
                break
    if tracker is not None and mref.mlflow_name is None and hasattr(tracker, "find_model_version"):
        for tag in FIND_TAGS:
            found = next((f for u in dict.fromkeys(u for u in (mref.hf_uri, mref.uri) if u)
                          if (f := tracker.find_model_version(tag, u))), None)
            if found:
                mref.mlflow_name, mref.mlflow_version = found
                break
    return mref


def resolve(ref: str | None, *, default_name: str | None = None, catalog=None, tracker=None, registry=None,
            store=None, settings=None) -> ModelRef:
    """The ``ModelRef`` behind ``ref`` (the forms: module docstring). MLflow lookups go through ``registry``
    (``serve.registry``'s protocol), else ``tracker``'s client, else the settings' tracking URI; catalog
    forms need ``catalog`` (opened from the settings when None)."""
    ref = (ref or "").strip()
    own_catalog = None
    if catalog is None and (not ref or ref.startswith("catalog:")):
        from moeflow.platform.catalog import Catalog

        catalog = own_catalog = Catalog.from_settings(settings)
    try:
        if not ref:
            if not default_name:
                raise ModelRefError("no model given and no previous stage to default to")
            rows = catalog.list_models(name=default_name, limit=1)
            if not rows:
                raise ModelRefError(f"no model named {default_name!r} in the catalog: run the stage that produces "
                                    f"it first, or pass a model (name@alias, name/version, catalog:<id> or a URI)")
            mref = ModelRef(default_name, rows[0]["checkpoint_uri"], catalog_id=rows[0]["id"],
                            catalog_name=rows[0]["name"])
        elif _is_store_uri(ref):
            mref = ModelRef(ref, ref)
        elif ref.startswith("catalog:"):
            mref = _from_catalog(ref, ref.split(":", 1)[1], catalog)
        elif Path(ref).expanduser().is_dir():
            mref = ModelRef(ref, str(Path(ref).expanduser().resolve()))
        elif m := _ALIAS.match(ref):
            mref = _from_registry(ref, m["name"], alias=m["alias"], version=None,
                                  registry=_registry(registry, tracker, settings))
        elif m := _VERSION.match(ref):
            mref = _from_registry(ref, m["name"], alias=None, version=m["version"],
                                  registry=_registry(registry, tracker, settings))
        elif catalog is not None and re.fullmatch(r"[A-Za-z0-9_\-]+", ref) and _catalog_has(catalog, ref):
            mref = _from_catalog(ref, ref, catalog)
        else:
            raise ModelRefError(f"cannot resolve model {ref!r}: not a directory, store URI, catalog:<id>, "
                                "<name>@<alias> or <name>/<version>")
        return _complete(mref, store=store, catalog=catalog, tracker=tracker, settings=settings)
    finally:
        if own_catalog is not None:
            own_catalog.close()


def _catalog_has(catalog, model_id: str) -> bool:
    try:
        catalog.get_model(model_id)
    except KeyError:
        return False
    return True


# ------------------------------------------------------------------ loading
@dataclass
class LoadedModel:
    ref: ModelRef
    model: object        # MoETransformer, eval mode
    tokenizer: object    # models.tokenizer.Tokenizer
    local_dir: Path | None  # where the files are; None when they were fetched to a temporary dir, now removed
    meta: dict | None = None  # a checkpoint's meta.json (step, pretrain_config); None for an HF export


def _inference_files(artifact) -> list[str]:
    """The files loading needs: a checkpoint's optimiser and trainer state (often 2-3x the weights) only
    serve resuming, so they are never copied for inference or evaluation."""
    from moeflow.models.train.state import RESUME_ONLY

    return [name for name in artifact.names() if name.split("/")[0] not in RESUME_ONLY]


def _download(uri: str, target: Path, store) -> Path:
    if store is not None and uri.startswith(store.root_uri.rstrip("/") + "/"):
        artifact = store.read_artifact(uri)
    else:
        from moeflow.platform.store import read_artifact

        artifact = read_artifact(uri)
    return Path(artifact.download(target, names=_inference_files(artifact)))


def _tokenizer(path_or_uri: str):
    from moeflow.models.tokenizer import Tokenizer

    if _is_store_uri(path_or_uri):
        from moeflow.platform.store import store_for_uri

        store, key = store_for_uri(path_or_uri)
        return Tokenizer.from_str(store.get_bytes(key))
    return Tokenizer.from_file(path_or_uri)


def load(ref: str | ModelRef, *, device="cpu", dtype=None, tokenizer: str | None = None, require_hf: bool = False,
         store=None, settings=None, cache_dir: str | Path | None = None) -> LoadedModel:
    """Resolve ``ref`` and load model (eval mode) + tokenizer: the HF export when there is one (it carries the
    tokenizer), else the checkpoint with ``tokenizer`` (a ``tokenizer.json`` path or store URI).
    ``require_hf``: refuse a checkpoint without an export (post-training trains from the export)."""
    mref = ref if isinstance(ref, ModelRef) else resolve(ref, store=store, settings=settings)
    source = mref.require_hf() if require_hf else (mref.hf_uri or mref.uri)
    if not _is_store_uri(source):
        return _load_dir(mref, source, Path(source), device=device, dtype=dtype, tokenizer=tokenizer,
                         require_hf=require_hf, keep=True)
    if cache_dir is not None:
        local = _download(source, Path(cache_dir), store)
        return _load_dir(mref, source, local, device=device, dtype=dtype, tokenizer=tokenizer, require_hf=require_hf,
                         keep=True)
    # no cache dir: the files live only while loading (the model is in memory afterwards), also on errors
    with tempfile.TemporaryDirectory(prefix="moeflow-model-") as tmp:
        local = _download(source, Path(tmp), store)
        return _load_dir(mref, source, local, device=device, dtype=dtype, tokenizer=tokenizer, require_hf=require_hf,
                         keep=False)


def _load_dir(mref: ModelRef, source: str, local: Path, *, device, dtype, tokenizer, require_hf: bool,
              keep: bool) -> LoadedModel:
    meta = None
    if (local / "config.json").is_file():
        from moeflow.models.hf import import_hf

        model = import_hf(local, dtype=dtype, device=device)
    elif (local / "meta.json").is_file():
        from moeflow.platform.train.evaluate import load_model

        model = load_model(local, device)
        meta = json.loads((local / "meta.json").read_text())
        if dtype is not None:
            model = model.to(dtype)
    else:
        raise ModelRefError(f"{source}: neither an HF export (config.json) nor a checkpoint (meta.json)")
    tok_source = str(local / "tokenizer.json") if (local / "tokenizer.json").is_file() else tokenizer
    if tok_source is None or require_hf and tok_source != str(local / "tokenizer.json"):
        raise ModelRefError(f"{source} has no tokenizer.json" + ("" if require_hf else
                                                                 ": pass tokenizer=<path or store URI>"))
    tok = _tokenizer(tok_source)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ModelRefError(f"tokenizer has {tok.vocab_size} ids but the model's vocabulary is {model.cfg.vocab_size}")
    return LoadedModel(mref, model.eval(), tok, local if keep else None, meta)
