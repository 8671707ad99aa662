"""The curate config (issue 9): every field bounded and described (the Prefect form shows the
descriptions), every sub-config a ``StageConfig`` (unknown keys rejected at any depth), and
values that would silently disable or invert a step rejected up front with the key named."""

from __future__ import annotations

import typing

import pytest
from pydantic import BaseModel, ValidationError

from moeflow.platform.config import StageConfig
from moeflow.platform.data import curate_config
from moeflow.platform.data.curate import CurateConfig
from moeflow.platform.data.sources import SourceConfig


def _models(model: type[BaseModel], seen=None) -> list[type[BaseModel]]:
    seen = seen if seen is not None else []
    if model in seen:
        return seen
    seen.append(model)
    for field in model.model_fields.values():
        for arg in _flatten(field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                _models(arg, seen)
    return seen


def _flatten(annotation) -> list:
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    return [annotation] + [a for arg in args for a in _flatten(arg)]


def _is_number(annotation) -> bool:
    kinds = [a for a in _flatten(annotation) if a is not type(None)]
    return any(a in (int, float) for a in kinds) and not any(a is bool for a in kinds)


def test_every_field_is_described_and_every_number_bounded():
    models = _models(CurateConfig)
    assert SourceConfig in models and len(models) >= 12
    missing, unbounded = [], []
    for model in models:
        assert issubclass(model, StageConfig), f"{model.__name__} is not a StageConfig"
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            if _is_number(field.annotation) and typing.get_origin(field.annotation) not in (list, tuple):
                kinds = {type(m).__name__ for m in field.metadata}
                if not ({"Ge", "Gt"} & kinds and {"Le", "Lt"} & kinds):
                    unbounded.append(f"{model.__name__}.{name}")
    assert not missing, f"fields without a description: {missing}"
    assert not unbounded, f"numbers without both bounds: {unbounded}"


def test_unknown_keys_are_rejected_at_any_depth():
    with pytest.raises(ValidationError, match="threshhold"):
        CurateConfig(near_dedup={"threshhold": 0.8})
    with pytest.raises(ValidationError, match="min_doc_wrds"):
        CurateConfig(quality={"gopher_quality": {"min_doc_wrds": 3}})
    config = CurateConfig()
    with pytest.raises(ValidationError):
        config.near_dedup.threshold = 1.5  # validated on assignment as well


@pytest.mark.parametrize("overrides, key", [
    ({"near_dedup": {"threshold": 1.5}}, "threshold"),
    ({"near_dedup": {"threshold": 0.0}}, "threshold"),
    ({"near_dedup": {"verify_margin": 0.9}}, "verify_margin"),
    ({"perplexity": {"percentiles": (60.0, 30.0)}}, "percentiles"),
    ({"perplexity": {"percentiles": (30.0, 160.0)}}, "percentiles"),
    ({"perplexity": {"drop_buckets": ["top"]}}, "drop_buckets"),
    ({"sources": [{"uri": "x", "max_files": -1}]}, "max_files"),
    ({"sources": [{"uri": "x", "max_files": 0}]}, "max_files"),
    ({"pii": {"kinds": ["emial"]}}, "kinds"),
    ({"domain": {"drop_labels": ["cod"]}}, "drop_labels"),
    ({"quality": {"code_domains": ["cod"]}}, "code_domains"),
    ({"normalize": {"form": "NFX"}}, "form"),
    ({"normalize": {"max_encoding_error_ratio": -0.1}}, "max_encoding_error_ratio"),
    ({"quality": {"gopher_quality": {"min_doc_words": 200, "max_doc_words": 100}}}, "max_doc_words"),
    ({"quality": {"gopher_quality": {"min_avg_word_length": 12.0}}}, "min_avg_word_length"),
    ({"steps": ["normalize", "translate"]}, "steps"),
    ({"records_per_shard": 0}, "records_per_shard"),
])
def test_values_that_disable_or_invert_a_step_are_rejected(overrides, key):
    with pytest.raises(ValidationError) as info:
        CurateConfig(**overrides)
    assert key in str(info.value)


def test_unknown_pii_kind_names_the_closest_valid_one():
    with pytest.raises(ValidationError, match="did you mean .email."):
        CurateConfig(pii={"kinds": ["emial"]})


def test_presets_are_an_enum_and_checked():
    assert set(typing.get_args(curate_config.CuratePreset)) == {"tiny", "stdlib"}
    assert CurateConfig.preset("stdlib").name == "stdlib"
    with pytest.raises(ValueError, match="unknown curate preset 'huge'"):
        CurateConfig.preset("huge")


def test_config_hash_is_the_one_hash_and_ignores_cleanup(monkeypatch):
    config = CurateConfig()
    assert len(config.config_hash()) == 12
    assert config.model_copy(update={"cleanup_shards": True}).config_hash() == config.config_hash()
    assert CurateConfig(max_doc_bytes=12345).config_hash() != config.config_hash()
    before = config.config_hash()
    monkeypatch.setattr(curate_config, "FORMAT_VERSION", curate_config.FORMAT_VERSION + 1)
    assert config.config_hash() != before  # a new format never reuses old shard artefacts
