"""Configuration of the curation pipeline: ``CurateConfig``, its near-dedup sub-config, the
step names and ``CurationError``.

The other step sub-configs (``NormalizeConfig``, ``QualityConfig``, ...) sit beside their
steps in ``normalize.py``, ``filters.py`` etc.; this module only assembles them.
``CurateConfig.config_hash()`` covers every field that changes the output plus
``FORMAT_VERSION``: bumping the version changes the hash, so shard and state artefacts
written under the old one are never reused.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from .domain import DomainConfig
from .filters import QualityConfig
from .normalize import NormalizeConfig
from .perplexity import PerplexityConfig
from .pii import PIIConfig
from .sources import STDLIB, SourceConfig

LOCAL_STEPS = ("normalize", "domain", "quality", "pii")
GLOBAL_STEPS = ("exact_dedup", "near_dedup", "perplexity")
DEFAULT_STEPS = ["normalize", "exact_dedup", "domain", "quality", "near_dedup", "perplexity", "pii"]
FORMAT_VERSION = 1


class CurationError(RuntimeError):
    pass


class NearDedupConfig(BaseModel):
    threshold: float = 0.8
    num_bands: int = 14
    rows_per_band: int = 8
    ngram: int = 5
    seed: int = 0
    verify_margin: float | None = Field(0.05, description="verify candidates at threshold - margin; None: banding only")
    against_index: str | None = Field(
        None, description="MinHashIndex .npz of an earlier dataset (path or file:// / s3:// URI, e.g. "
        "<earlier curated artefact URI>/minhash_index.npz): documents near-duplicating it are dropped")
    save_index: bool = Field(True, description="write minhash_index.npz (docs kept by near dedup) into the artefact")


class CurateConfig(BaseModel):
    """Recipe of the curate stage; ``CurateConfig.preset("tiny")`` runs in seconds on CPU."""

    name: str = "tiny"
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(uri=STDLIB, max_files=120, include_tests=False)]
    )
    steps: list[str] = Field(default_factory=lambda: list(DEFAULT_STEPS))
    files_per_shard: int = Field(32, ge=1)
    records_per_shard: int = Field(5000, ge=1)
    max_doc_bytes: int = Field(8 << 20, ge=1, description="larger records are quarantined unread")
    excluded_samples_per_rule: int = Field(20, ge=0)
    sample_chars: int = Field(2000, ge=0, description="text kept per excluded sample")
    cleanup_shards: bool = Field(False, description="delete _shards/ and _state/ after the final commit")
    normalize: NormalizeConfig = NormalizeConfig()
    quality: QualityConfig = QualityConfig()
    near_dedup: NearDedupConfig = NearDedupConfig()
    perplexity: PerplexityConfig = PerplexityConfig()
    domain: DomainConfig = DomainConfig()
    pii: PIIConfig = PIIConfig()

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: list[str]) -> list[str]:
        known = LOCAL_STEPS + GLOBAL_STEPS
        unknown = [s for s in steps if s not in known]
        if unknown:
            raise ValueError(f"unknown curation step(s) {unknown}; known: {list(known)}")
        if len(set(steps)) != len(steps):
            raise ValueError(f"curation steps must not repeat: {steps}")
        return steps

    def config_hash(self) -> str:
        """Hash of everything that changes the output (cleanup_shards does not)."""
        from moeflow.platform.config import config_hash

        data = self.model_dump(mode="json", exclude={"cleanup_shards"})
        return config_hash({"config": data, "format": FORMAT_VERSION}, length=16)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "CurateConfig":
        presets: dict[str, dict] = {
            "tiny": {},
            # the whole standard library, test packages included (the benchmark corpus)
            "stdlib": {"name": "stdlib", "sources": [SourceConfig(uri=STDLIB, include_tests=True)]},
        }
        if name not in presets:
            raise ValueError(f"unknown curate preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})
