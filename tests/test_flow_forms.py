"""The Prefect run form: parameters in the order people change them, every field described.

Prefect builds the form from the flow's parameter schema (``parameter_schema``, the same call a
deployment makes); no server is needed to check it.
"""

from __future__ import annotations

import pytest

from moeflow.platform.stages import STAGES


def _schema(stage: str) -> dict:
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(STAGES[stage].load_flow().fn).model_dump()


def test_pretrain_form_leads_with_steps_lr_and_model_preset():
    schema = _schema("pretrain")
    assert list(schema["properties"])[0] == "pretrain"
    fields = schema["definitions"]["PretrainConfig"]["properties"]
    assert list(fields)[:3] == ["max_steps", "lr", "model_preset"]
    assert fields["model_preset"]["enum"] == ["bench_ref", "small", "tiny"]
    assert fields["schedule"]["enum"] == ["cosine", "wsd", "constant"]
    assert fields["max_steps"]["minimum"] == 1 and fields["lr"]["exclusiveMinimum"] == 0


def test_pipeline_form_puts_the_run_and_pretraining_first():
    assert list(_schema("pipeline")["properties"])[:2] == ["run_name", "pretrain"]


@pytest.mark.parametrize("stage,config", [("smoke", "SmokeConfig"), ("tokenize", "TokenizeConfig"),
                                          ("pretrain", "PretrainConfig"), ("pretrain", "ModelOverrides"),
                                          ("evaluate", "EvaluateConfig")])
def test_every_form_field_has_a_description(stage, config):
    fields = _schema(stage)["definitions"][config]["properties"]
    missing = [name for name, spec in fields.items() if not spec.get("description")]
    assert not missing, missing
