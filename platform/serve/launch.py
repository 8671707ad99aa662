"""``moeflow serve``: resolve a model reference to a local export, start the Ray Serve app, wait.

A reference is a local HF export directory, a store URI of one (``file://`` / ``s3://``), or a
registry reference: ``name@alias`` / ``models:/name@alias`` or ``name/3`` / ``models:/name/3``. A
registry version points at its export by the ``moeflow.artifact_uri`` tag (``moeflow.hf_uri`` for
versions registered by the pyfunc helper alone); the export is downloaded once into the cache
(verified against its manifest). The served route table then holds that version and, for an alias
reference, the alias itself plus the default alias, so clients can ask for ``name``,
``name@alias`` or ``name@<version>``.
"""

from __future__ import annotations

import re
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .registry import ARTIFACT_TAGS, MLflowRegistry, RegistryError

_ALIAS = re.compile(r"^(?:models:/)?(?P<name>[A-Za-z0-9_.\-]+)@(?P<alias>[A-Za-z0-9_\-]+)$")
_VERSION = re.compile(r"^(?:models:/)?(?P<name>[A-Za-z0-9_.\-]+)/(?P<version>\d+)$")


class ModelNotFound(LookupError):
    """A --model reference that does not resolve (one line for the user)."""


@dataclass
class ResolvedModel:
    name: str
    version: str
    model_dir: str
    aliases: dict[str, str] = field(default_factory=dict)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _fetch(uri: str, settings=None) -> Path:
    from ..tracking.pyfunc import fetch_hf_export

    return fetch_hf_export(uri)


def resolve_model(ref: str, *, settings=None, registry=None, default_alias: str = "champion") -> ResolvedModel:
    ref = ref.strip()
    if Path(ref).expanduser().is_dir():
        d = Path(ref).expanduser().resolve()
        if not (d / "config.json").is_file():
            raise ModelNotFound(f"{d}: not a Hugging Face export (no config.json)")
        return ResolvedModel(_slug(d.name), "local", str(d))
    if ref.startswith(("file:", "s3://")):
        local = _fetch(ref, settings)
        return ResolvedModel(_slug(Path(ref.rstrip("/")).name), "1", str(local))
    m_alias, m_version = _ALIAS.match(ref), _VERSION.match(ref)
    if not (m_alias or m_version):
        raise ModelNotFound(f"cannot resolve --model {ref!r}: not a directory, store URI, name@alias or name/<version>")
    if registry is None:
        from ..settings import get_settings

        registry = MLflowRegistry((settings or get_settings()).tracking_uri)
    name = (m_alias or m_version)["name"]
    aliases = {}
    if m_alias:
        version = registry.alias_version(name, m_alias["alias"])
        if version is None:
            raise ModelNotFound(f"the registry has no alias {name}@{m_alias['alias']}")
        aliases = {m_alias["alias"]: version, default_alias: version}
    else:
        version = m_version["version"]
    try:
        tags = registry.version_tags(name, version)
    except RegistryError as err:
        raise ModelNotFound(str(err)) from None
    uri = next((tags[t] for t in ARTIFACT_TAGS if tags.get(t)), None)
    if uri is None:
        raise ModelNotFound(f"{name}/{version} has no {' or '.join(ARTIFACT_TAGS)} tag: not a moeflow export")
    return ResolvedModel(name, version, str(_fetch(uri, settings)), aliases)


def config_for(ref: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, quantize: str = "none",
               max_batch: int = 8, settings=None):
    """The ServeConfig of one model reference (what ``moeflow serve --model`` serves)."""
    from .config import GatewayConfig, ServeConfig, ServedModel

    resolved = resolve_model(ref, settings=settings)
    spec = ServedModel(name=resolved.name, version=resolved.version, model_dir=resolved.model_dir,
                       num_replicas=replicas, engine={"quantize": quantize, "max_batch": max_batch})
    return ServeConfig(models=[spec], aliases={resolved.name: resolved.aliases} if resolved.aliases else {},
                       gateway=GatewayConfig(host=host, port=port))


def load_config_file(path: str):
    """A ServeConfig from YAML (several versions, aliases, A/B splits); ``model_dir`` may be any --model reference."""
    import yaml

    from .config import ServeConfig

    data = yaml.safe_load(Path(path).read_text()) or {}
    for m in data.get("models", []):
        if "model_dir" in m and not Path(m["model_dir"]).is_dir():
            m["model_dir"] = resolve_model(m["model_dir"]).model_dir
    return ServeConfig.model_validate(data)


def serve_forever(config, *, settings=None, echo=print) -> None:
    """Start serving ``config`` (a ServeConfig) and block until Ctrl-C / SIGTERM, then shut Serve down."""
    from . import app

    serving = app.start(config, settings=settings)
    echo(f"serving {', '.join(m.key for m in config.models)} at {serving.url}/v1 "
         f"(models: {', '.join(serving.table().model_ids())}); Ctrl-C stops")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        app.shutdown()
