"""The model registry as the deploy stage sees it: version tags, aliases and their history.

Promotion is an alias move (``champion`` -> a version), so the registry is where decisions land:
the evaluation stage leaves its scores on the version as ``eval.<metric>`` tags, the deploy stage
adds ``deploy.*`` tags with its decision, and keeps each alias's history (the versions it pointed
at, oldest first) as a registered-model tag so ``rollback`` knows where to go back to.

``MLflowRegistry`` talks to the MLflow model registry; ``MemoryRegistry`` is the same in memory for
unit tests of the deploy logic (service tests use the real MLflow server).
"""

from __future__ import annotations

import json

EVAL_PREFIX = "eval."
HISTORY_TAG = "moeflow.alias_history.{alias}"


def version_metrics(tags: dict[str, str]) -> dict[str, float]:
    """``eval.<metric>`` tags as floats keyed by ``<metric>`` (non-numeric values are skipped)."""
    out = {}
    for k, v in tags.items():
        if k.startswith(EVAL_PREFIX):
            try:
                out[k[len(EVAL_PREFIX):]] = float(v)
            except (TypeError, ValueError):
                continue
    return out


class RegistryError(LookupError):
    """A model or version the registry does not hold (one line for the user)."""


class MemoryRegistry:
    def __init__(self) -> None:
        self.versions: dict[str, dict[str, dict[str, str]]] = {}   # name -> version -> tags
        self.aliases: dict[str, dict[str, str]] = {}
        self.model_tags: dict[str, dict[str, str]] = {}

    def add_version(self, name: str, tags: dict[str, str] | None = None) -> str:
        versions = self.versions.setdefault(name, {})
        v = str(len(versions) + 1)
        versions[v] = dict(tags or {})
        return v

    def latest_version(self, name: str) -> str:
        if not self.versions.get(name):
            raise RegistryError(f"no registered model {name!r}")
        return max(self.versions[name], key=int)

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        try:
            return dict(self.versions[name][str(version)])
        except KeyError:
            raise RegistryError(f"no model version {name}/{version}") from None

    def set_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        self.version_tags(name, version)
        self.versions[name][str(version)].update({k: str(v) for k, v in tags.items()})

    def alias_version(self, name: str, alias: str) -> str | None:
        return self.aliases.get(name, {}).get(alias)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.version_tags(name, version)
        self.aliases.setdefault(name, {})[alias] = str(version)

    def get_model_tag(self, name: str, key: str) -> str | None:
        return self.model_tags.get(name, {}).get(key)

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self.model_tags.setdefault(name, {})[key] = value


class MLflowRegistry:
    def __init__(self, tracking_uri: str) -> None:
        from ..tracking.mlflow_env import quiet_mlflow_env

        quiet_mlflow_env()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)

    @classmethod
    def from_client(cls, client) -> "MLflowRegistry":
        """The registry behind an existing MlflowClient (a tracker's), without a second connection."""
        registry = cls.__new__(cls)
        registry.client = client
        return registry

    def _call(self, what: str, fn, *args):
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args)
        except MlflowException as err:
            raise RegistryError(f"{what}: {err.error_code}") from None

    def latest_version(self, name: str) -> str:
        found = self._call(f"model {name!r}", self.client.search_model_versions, f"name='{name}'")
        if not found:
            raise RegistryError(f"no registered model {name!r}")
        return str(max(int(mv.version) for mv in found))

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        mv = self._call(f"model version {name}/{version}", self.client.get_model_version, name, str(version))
        return dict(mv.tags or {})

    def set_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._call(f"model version {name}/{version}", self.client.set_model_version_tag, name, str(version),
                       k, str(v))

    def alias_version(self, name: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call(f"alias {name}@{alias}", self.client.set_registered_model_alias, name, alias, str(version))

    def get_model_tag(self, name: str, key: str) -> str | None:
        rm = self._call(f"model {name!r}", self.client.get_registered_model, name)
        return (rm.tags or {}).get(key)

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self._call(f"model {name!r}", self.client.set_registered_model_tag, name, key, value)


def alias_history(registry, name: str, alias: str) -> list[str]:
    raw = registry.get_model_tag(name, HISTORY_TAG.format(alias=alias))
    return json.loads(raw) if raw else []


def record_alias(registry, name: str, alias: str, history: list[str]) -> None:
    registry.set_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(history[-50:]))
