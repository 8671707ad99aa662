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

from pydantic import BaseModel, ConfigDict, model_validator

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


def closest(name: str, choices) -> str | None:
    """The closest of ``choices`` to ``name`` (difflib), or None when nothing is close."""
    import difflib

    found = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_key_message(name: str, choices) -> str:
    near = closest(name, choices)
    return f"unknown field {name!r}" + (f" (did you mean {near!r}?)" if near else "")


class StageConfig(BaseModel):
    """Base of every stage config: strict keys, validated on assignment, one hash."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        """Name the closest valid field for a typo (pydantic's extra="forbid" only says "not permitted")."""
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = [k for k in data if isinstance(k, str) and k not in known]
            if unknown:
                raise ValueError("; ".join(unknown_key_message(k, known) for k in unknown))
        return data

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def config_hash(self, length: int | None = HASH_LENGTH) -> str:
        return config_hash(self, length)
