"""ModelConfig: presets, validation, parameter counts (bench_ref per BENCHMARKS.md), dense twin, FLOPs."""

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer


def test_bench_ref_matches_benchmarks_md_analytically_and_on_meta_modules():
    cfg = ModelConfig.preset("bench_ref")
    assert cfg.num_params() == pytest.approx(819e6, rel=0.002)
    assert cfg.num_params(active=True, embedding=False) == pytest.approx(147e6, rel=0.005)
    with torch.device("meta"):
        m = MoETransformer(cfg)
    assert m.num_params() == cfg.num_params()
    assert m.num_params(active=True, embedding=False) == cfg.num_params(active=True, embedding=False)
    assert cfg.kv_cache_values_per_token == 288


def test_dense_twin_has_same_active_params():
    for name in ("tiny", "bench_ref", "small"):
        cfg = ModelConfig.preset(name)
        twin = cfg.dense_twin()
        assert twin.num_moe_layers == 0 and twin.num_routed_experts == 0
        want = cfg.num_params(active=True, embedding=False)
        # the only difference: router weights (E x D per MoE layer) have no dense counterpart
        routers = cfg.num_moe_layers * cfg.num_routed_experts * cfg.hidden_size
        assert twin.num_params(active=True, embedding=False) == want - routers
        assert twin.num_params() == twin.num_params(active=True)


def test_presets_and_round_trip():
    tiny = ModelConfig.preset("tiny")
    assert tiny.hidden_size == 64 and tiny.num_moe_layers == 2 and tiny.mtp_depth == 0
    assert ModelConfig.from_dict(tiny.to_dict()) == tiny
    assert tiny.replace(vocab_size=600).vocab_size == 600
    with pytest.raises(ValueError, match="unknown ModelConfig preset"):
        ModelConfig.preset("huge")
    with pytest.raises(TypeError, match="no field"):
        tiny.replace(hidden=3)
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**tiny.to_dict(), "bogus": 1})
    small = ModelConfig.preset("small")
    assert 0.3e9 < small.num_params() < 1.5e9


@pytest.mark.parametrize("change,field", [
    ({"score_func": "relu"}, "score_func"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 2, "n_group": 1}, "topk_group"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"balancing": "magic"}, "balancing"),
    ({"rope_scaling": {"factor": 4.0}}, "rope_scaling"),
])
def test_validation_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.preset("tiny").replace(**change)


def test_flops_per_token_bench_ref_figure():
    """The figure the MFU numbers in RESULTS.md were computed with (issue 16): 1.0095 GFLOP/token at
    S = 2048; the formula itself is checked against torch's FlopCounterMode in test_train_flops.py."""
    cfg = ModelConfig.preset("bench_ref")
    assert cfg.flops_per_token(2048) == pytest.approx(1.0095e9, rel=5e-4)
    assert cfg.flops_per_token(2048, training=False) == pytest.approx(1.0095e9 / 3, rel=5e-4)


def test_softmax_scale_with_yarn():
    cfg = ModelConfig.preset("tiny")
    assert cfg.softmax_scale() == pytest.approx(24 ** -0.5)
    y = cfg.replace(rope_scaling={"factor": 40.0, "original_max_position_embeddings": 64, "mscale_all_dim": 1.0})
    m = 0.1 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert y.softmax_scale() == pytest.approx(24 ** -0.5 * m * m)
