"""``moeflow serve``: resolve a model reference to a local export, start the Ray Serve app, wait.

A reference is any form ``platform/model_refs.py`` resolves (a local HF export, a store URI of an
export or of a checkpoint with one, ``catalog:<id>``, ``name@alias``, ``name/3``); the export is
downloaded once into the cache (verified against its manifest). The served route table then holds that version and, for an alias
reference, the alias itself plus the default alias, so clients can ask for ``name``,
``name@alias`` or ``name@<version>``.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from .resolve import ResolvedModel, resolve_served  # noqa: F401  (re-exported: `launch.resolve_served`)


def config_for(ref: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, quantize: str = "none",
               max_batch: int = 8, engine: dict | None = None, settings=None):
    """The ServeConfig of one model reference (what ``moeflow serve --model`` serves); ``engine``: more
    ``EngineConfig`` settings (``--engine key=value``), over ``quantize`` and ``max_batch``."""
    from .config import EngineConfig, GatewayConfig, ServeConfig, ServedModel

    engine_cfg = EngineConfig.model_validate({"quantize": quantize, "max_batch": max_batch, **(engine or {})})
    resolved = resolve_served(ref, settings=settings)  # after the check: a typo is told before any lookup
    spec = ServedModel(name=resolved.name, version=resolved.version, model_dir=resolved.model_dir,
                       num_replicas=replicas, engine=engine_cfg)
    return ServeConfig(models=[spec], aliases={resolved.name: resolved.aliases} if resolved.aliases else {},
                       gateway=GatewayConfig(host=host, port=port))


def load_config_file(path: str):
    """A ServeConfig from YAML (several versions, aliases, A/B splits); ``model_dir`` may be any --model reference."""
    import yaml

    from .config import ServeConfig

    data = yaml.safe_load(Path(path).read_text()) or {}
    for m in data.get("models", []):
        if "model_dir" in m and not Path(m["model_dir"]).is_dir():
            m["model_dir"] = resolve_served(m["model_dir"]).model_dir
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
