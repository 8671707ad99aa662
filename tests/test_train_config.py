"""PretrainConfig: a pydantic stage config with typed, validated model overrides; old checkpoint dicts load."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from moeflow.models.config import ModelConfig
from moeflow.platform.config import config_hash
from moeflow.platform.train.config import ModelOverrides, PretrainConfig


def test_override_typo_fails_at_validation_naming_the_closest_field():
    with pytest.raises(ValidationError, match=r"unknown field 'num_expertz' \(did you mean 'num_\w+_experts'\?\)"):
        PretrainConfig(model_overrides={"num_expertz": 16})


def test_top_level_typo_names_the_closest_field():
    with pytest.raises(ValidationError, match=r"unknown field 'max_stepz' \(did you mean 'max_steps'\?\)"):
        PretrainConfig(max_stepz=5)


@pytest.mark.parametrize("bad", [{"max_steps": 0}, {"lr": -1.0}, {"schedule": "linear"}, {"model_preset": "huge"},
                                 {"warmup_steps": 500, "max_steps": 100}, {"betas": [0.9, 1.5]},
                                 {"model_overrides": {"num_layers": "many"}},
                                 {"model_overrides": {"n_group": 3}}])  # 3 does not divide the tiny preset's 8 experts
def test_out_of_range_wrong_type_and_inconsistent_model_fail(bad):
    with pytest.raises(ValidationError):
        PretrainConfig(**bad)


def test_assignment_is_validated():
    cfg = PretrainConfig()
    with pytest.raises(ValidationError):
        cfg.max_steps = -3


def test_overrides_are_every_model_config_field_and_dump_only_what_is_set():
    import dataclasses

    assert set(ModelOverrides.model_fields) == {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = PretrainConfig(model_overrides={"hidden_size": 32, "num_heads": 2})
    assert cfg.to_dict()["model_overrides"] == {"hidden_size": 32, "num_heads": 2}
    model = cfg.build_model_config()
    assert model.hidden_size == 32 and model.num_layers == ModelConfig.preset("tiny").num_layers
    assert cfg.with_vocab_size(77).build_model_config().vocab_size == 77
    assert PretrainConfig(model_overrides={"vocab_size": 9}).with_vocab_size(77).build_model_config().vocab_size == 9


def test_old_checkpoint_config_dict_loads_and_round_trips():
    # a PretrainConfig as the dataclass version wrote it into meta.json (every field, plain JSON)
    old = {"model_preset": "tiny", "model_overrides": {"vocab_size": 2048}, "dense_twin": False, "seq_len": 128,
           "micro_batch_size": 16, "grad_accum_steps": 1, "max_steps": 300, "lr": 0.003, "schedule": "cosine",
           "warmup_steps": 20, "min_lr_ratio": 0.1, "decay_fraction": 0.2, "weight_decay": 0.1,
           "betas": [0.9, 0.95], "eps": 1e-08, "decay_embeddings": True, "grad_clip": 1.0, "seed": 0,
           "dtype": "auto", "param_dtype": "fp32", "compile": False, "parallelism": "ddp", "log_every": 10,
           "val_every": 100, "val_batches": 8, "val_batch_size": None, "checkpoint_every": 100,
           "keep_checkpoints": 2, "bytes_per_token": None, "peak_flops": 798e12}
    cfg = PretrainConfig.from_dict(old)
    # read today, the dict trains with document masking (the default); the old run was plain causal, so
    # the config must not hash as before, or the stage cache would hand back that causal run
    assert cfg.document_masking and cfg.to_dict() == {**old, "document_masking": True}
    assert cfg.config_hash() != config_hash(old)
    assert cfg.betas == (0.9, 0.95)


def test_every_field_has_a_description():
    for name, info in {**PretrainConfig.model_fields, **ModelOverrides.model_fields}.items():
        assert info.description, name
