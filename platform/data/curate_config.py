"""Configuration of the curation pipeline: ``CurateConfig``, its near-dedup sub-config, the
step names and ``CurationError``.

The other step sub-configs (``NormalizeConfig``, ``QualityConfig``, ...) sit beside their
steps in ``normalize.py``, ``filters.py`` etc.; this module only assembles them.
Every config is a ``StageConfig`` (unknown keys rejected at any depth, validated on
assignment); every number is bounded and every field described, and values that would
silently disable or invert a step (a threshold above 1, inverted percentiles, an unknown PII
kind or domain label) are rejected where they are typed, with the closest valid name.
``CurateConfig.config_hash()`` is the one ``config_hash`` over every field that changes the
output plus ``FORMAT_VERSION``: bumping the version changes the hash, so shard and state
artefacts written under the old one are never reused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from moeflow.platform.config import HASH_LENGTH, StageConfig, config_hash

from .banding import choose_banding
from .choices import check_choices
from .domain import DomainConfig
from .filters import QualityConfig
from .normalize import NormalizeConfig
from .perplexity import PerplexityConfig
from .pii import PIIConfig
from .sources import STDLIB, SourceConfig

LOCAL_STEPS = ("normalize", "domain", "quality", "pii")
GLOBAL_STEPS = ("exact_dedup", "near_dedup", "perplexity")
StepName = Literal["normalize", "domain", "quality", "pii", "exact_dedup", "near_dedup", "perplexity"]
DEFAULT_STEPS = ["normalize", "exact_dedup", "domain", "quality", "near_dedup", "perplexity", "pii"]
CuratePreset = Literal["tiny", "stdlib"]
# 2: readers (BOM, UTF-16, .json arrays, null/surrogate reasons), inputs fingerprint, derived banding
FORMAT_VERSION = 2


class CurationError(RuntimeError):
    pass


class NearDedupConfig(StageConfig):
    """MinHash LSH near dedup. Bands x rows follow from ``threshold`` (``banding.choose_banding``:
    recall >= ``min_recall`` at J = threshold, banding and verification together, with the fewest
    false candidates); set ``num_bands`` and ``rows_per_band`` both to choose them by hand."""

    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Jaccard similarity (word n-grams) at which two documents are near duplicates")
    num_perm: int = Field(128, ge=1, le=1024, description="MinHash permutations the banding may use (bands x rows <= num_perm)")
    min_recall: float = Field(0.95, gt=0.0, lt=1.0, description="detection probability to reach at J = threshold (design target)")
    num_bands: int | None = Field(None, ge=1, le=1024, description="explicit LSH bands (with rows_per_band); None: chosen from threshold")
    rows_per_band: int | None = Field(None, ge=1, le=64, description="explicit MinHash rows per band (with num_bands); None: chosen")
    ngram: int = Field(5, ge=1, le=32, description="words per shingle")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the MinHash permutations")
    verify_margin: float | None = Field(
        0.08, ge=0.0, le=0.5, description="verify candidates at threshold - margin; None: banding only")
    against_index: str | None = Field(
        None, description="MinHashIndex .npz of an earlier dataset (path or file:// / s3:// URI, e.g. "
        "<earlier curated artefact URI>/minhash_index.npz): documents near-duplicating it are dropped")
    save_index: bool = Field(True, description="write minhash_index.npz (docs kept by near dedup) into the artefact")

    @field_validator("verify_margin")
    @classmethod
    def _margin_below_threshold(cls, margin: float | None, info) -> float | None:
        threshold = info.data.get("threshold")
        if margin is not None and threshold is not None and margin >= threshold:
            raise ValueError(f"verify_margin={margin} >= threshold={threshold}: every candidate would pass verification")
        return margin

    @model_validator(mode="after")
    def _check_banding(self) -> "NearDedupConfig":
        if (self.num_bands is None) != (self.rows_per_band is None):
            raise ValueError("set num_bands and rows_per_band together (or neither: chosen from threshold)")
        if self.num_bands is not None and self.num_bands * self.rows_per_band > 1024:
            raise ValueError(f"num_bands x rows_per_band = {self.num_bands * self.rows_per_band} > 1024 hashes")
        self.banding()  # raises when the threshold cannot reach min_recall with num_perm
        return self

    @property
    def verify_threshold(self) -> float | None:
        return None if self.verify_margin is None else round(self.threshold - self.verify_margin, 10)

    def banding(self) -> tuple[int, int]:
        """(bands, rows): the explicit pair, or the one chosen from the threshold."""
        if self.num_bands is not None and self.rows_per_band is not None:
            return self.num_bands, self.rows_per_band
        return choose_banding(self.threshold, self.num_perm, self.verify_threshold, self.min_recall)


class CurateConfig(StageConfig):
    """Recipe of the curate stage; ``CurateConfig.preset("tiny")`` runs in seconds on CPU."""

    name: str = Field("tiny", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100,
                      description="dataset name (part of the output prefix)")
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(uri=STDLIB, max_files=120, include_tests=False)], min_length=1,
        description="inputs: paths, globs, directories, file:// or s3:// URIs, or 'python-stdlib'")
    steps: list[StepName] = Field(default_factory=lambda: list(DEFAULT_STEPS), min_length=1,
                                  description="curation steps, in the order they run")
    files_per_shard: int = Field(32, ge=1, le=1 << 20, description="whole text/code files per shard")
    records_per_shard: int = Field(5000, ge=1, le=1 << 30, description="JSONL/Parquet records per shard")
    max_doc_bytes: int = Field(8 << 20, ge=1, le=1 << 34, description="larger records are quarantined unread")
    excluded_samples_per_rule: int = Field(20, ge=0, le=100_000, description="excluded documents kept per rule as samples")
    sample_chars: int = Field(2000, ge=0, le=1 << 24, description="text kept per excluded sample")
    cleanup_shards: bool = Field(False, description="delete _shards/ and _state/ after the final commit")
    normalize: NormalizeConfig = Field(NormalizeConfig(), description="Unicode normalisation and encoding errors")
    quality: QualityConfig = Field(QualityConfig(), description="quality filters (Gopher, C4, FineWeb, code)")
    near_dedup: NearDedupConfig = Field(NearDedupConfig(), description="MinHash LSH near-duplicate removal")
    perplexity: PerplexityConfig = Field(PerplexityConfig(), description="character n-gram LM perplexity buckets")
    domain: DomainConfig = Field(DomainConfig(), description="domain classifier (code, prose, math, dialogue)")
    pii: PIIConfig = Field(PIIConfig(), description="PII redaction")

    @field_validator("steps", mode="before")
    @classmethod
    def _check_steps(cls, steps):
        steps = check_choices(steps, LOCAL_STEPS + GLOBAL_STEPS, "curation step")
        if isinstance(steps, list) and len(set(steps)) != len(steps):
            raise ValueError(f"curation steps must not repeat: {steps}")
        return steps

    def config_hash(self, length: int | None = HASH_LENGTH) -> str:
        """The one ``config_hash`` over everything that changes the output: ``cleanup_shards`` left
        out, ``FORMAT_VERSION`` in (a new format never reuses shard artefacts of the old one)."""
        data = self.model_dump(mode="json", exclude={"cleanup_shards"})
        return config_hash({"config": data, "format": FORMAT_VERSION}, length)

    @classmethod
    def preset(cls, name: CuratePreset, **overrides: Any) -> "CurateConfig":
        presets: dict[str, dict] = {
            "tiny": {},
            # the whole standard library, test packages included (the benchmark corpus)
            "stdlib": {"name": "stdlib", "sources": [SourceConfig(uri=STDLIB, include_tests=True)]},
        }
        if name not in presets:
            raise ValueError(f"unknown curate preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})
