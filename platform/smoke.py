"""The smoke stage's engine and config: write one small artefact describing the environment.

It proves the store works; the task around it (``tasks/smoke.py``) proves the catalog, MLflow
and Prefect do. Every stage has this shape: ``run_<stage>(config, store, ...) -> <Stage>Result``.
"""

from __future__ import annotations

import platform as std_platform  # the standard library: moeflow's platform/ never shadows it
import time
from dataclasses import dataclass

from pydantic import Field

from .config import StageConfig


class SmokeConfig(StageConfig):
    """What the smoke run writes."""

    message: str = Field("hello from moeflow", min_length=1, max_length=10_000,
                         description="text stored in the smoke artefact")


@dataclass
class SmokeResult:
    uri: str
    content_hash: str
    num_files: int
    num_bytes: int


def run_smoke(config: SmokeConfig, store, *, output_prefix: str) -> SmokeResult:
    """Write ``hello.json`` (the message and the interpreter) as one artefact under ``output_prefix``."""
    payload = {"message": config.message, "python": std_platform.python_version(),
               "machine": std_platform.machine(), "created_at": time.time()}
    with store.write_artifact(output_prefix, metadata={"stage": "smoke"}, overwrite=True) as writer:
        writer.put_json("hello.json", payload)
    artifact = store.read_artifact(writer.uri)
    return SmokeResult(uri=writer.uri, content_hash=artifact.content_hash, num_files=len(artifact.names()),
                       num_bytes=sum(f["size"] for f in artifact.manifest["files"].values()))
