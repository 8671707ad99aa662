"""The one config style and the one ``config_hash``.

Every stage config is a ``StageConfig``: a pydantic model that rejects unknown keys
(``extra="forbid"``), bounds every number and describes every field (the Prefect run form shows
the descriptions). A config is hashed in exactly one way: sha256 of its canonical JSON
(``model_dump(mode="json")``, sorted keys), cut to 12 hex digits where it names a prefix.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

HASH_LENGTH = 12


def canonical_json(config: Any) -> str:
    """The canonical JSON text of a config (pydantic models are dumped in JSON mode first)."""
    if isinstance(config, BaseModel):
        config = config.model_dump(mode="json")
    return json.dumps(config, sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=False)


def config_hash(config: Any, length: int | None = HASH_LENGTH) -> str:
    """sha256 hex digest of ``canonical_json(config)``; ``length=None`` gives all 64 digits."""
    digest = hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()
    return digest if length is None else digest[:length]


class StageConfig(BaseModel):
    """Base of every stage config: strict keys, validated on assignment, one hash."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def config_hash(self, length: int | None = HASH_LENGTH) -> str:
        return config_hash(self, length)
