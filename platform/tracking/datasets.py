"""Dataset inputs: an ``mlflow.data`` entity that describes an artefact by URI (metadata only, no load).

MLflow's own dataset classes want to load the data (pandas, numpy, HF datasets); our artefacts
are token shards and JSONL in the object store, so we log a ``MetaDataset`` with the store URI
as its source, a digest from the artefact's manifest, and an optional schema and profile.
"""

from __future__ import annotations

import json
import warnings

from .mlflow_env import quiet_mlflow_env

_SCHEMA_TYPES = {"string", "long", "integer", "double", "float", "boolean", "binary", "datetime"}


def build_dataset(uri: str, name: str, *, digest=None, schema: dict | None = None, profile: dict | None = None):
    """An ``mlflow.data`` dataset entity describing the artefact at ``uri`` (metadata only).

    The source is MLflow's resolver for the URI scheme (``file``/``s3``/``http`` ...), or a
    plain URI source for schemes MLflow does not know. ``schema`` maps column -> MLflow type
    name (``{"text": "string", "num_tokens": "long"}``); ``profile`` is any small JSON dict
    (document counts, token counts) shown by the MLflow UI.
    """
    quiet_mlflow_env()
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    if not isinstance(uri, str) or "://" not in uri:
        raise ValueError(f"log_input needs an artefact URI with a scheme, got {uri!r}")
    mlflow_schema = None
    if schema:
        bad = {k: v for k, v in schema.items() if v not in _SCHEMA_TYPES}
        if bad:
            raise ValueError(f"log_input schema of {uri}: unknown column types {bad} (use one of {sorted(_SCHEMA_TYPES)})")
        mlflow_schema = Schema([ColSpec(type=t, name=c) for c, t in schema.items()])
    profile_json = json.dumps(profile, default=str, sort_keys=True) if profile else None

    class _ProfiledDataset(MetaDataset):
        @property
        def profile(self):
            return profile_json

        def to_dict(self):
            data = super().to_dict()
            if profile_json:
                data["profile"] = profile_json
            return data

    return _ProfiledDataset(_dataset_source(uri), name=name, digest=(digest[:36] if digest else None),
                            schema=mlflow_schema)


def _dataset_source(uri: str):
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for file://
            return resolve_dataset_source(uri)
    except Exception:  # an unknown scheme: describe it, MLflow need not load it
        pass

    class UriDatasetSource(DatasetSource):
        def __init__(self, source_uri: str):
            self._uri = source_uri

        @staticmethod
        def _get_source_type() -> str:
            return "uri"

        def load(self, **kwargs):
            raise NotImplementedError(f"{self._uri} is read through moeflow's object store")

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            return cls(str(raw_source))

        def to_dict(self):
            return {"uri": self._uri}

        @classmethod
        def from_dict(cls, source_dict):
            return cls(source_dict["uri"])

    return UriDatasetSource(uri)
