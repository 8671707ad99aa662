"""The launches a serving decode step makes (benchmarks/count_decode_launches.py, counted on the CPU with the fused
kernels in Triton's interpreter): what each fused-kernel switch claims to remove, it removes, and nothing a decode
step does grows with the number of MoE layers outside them (the balancing-loss sums a decode step skips)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import triton_kernels

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cl():
    triton_kernels("rmsnorm", "_rms_norm_kernel")  # skips where the kernels can run neither compiled nor interpreted
    spec = importlib.util.spec_from_file_location("count_decode_launches", ROOT / "benchmarks/count_decode_launches.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def counts(cl):
    """Rows of the tiny model (3 layers: 1 dense, 2 MoE) for each mode, batch 1."""
    model = cl.build_model(3, 128, "tiny")
    modes = ["default", "+routerlogits", "+sharedfold", "+mla", "+noboundary",
             "+nonorm+norope+nocachewrite+norouter+noboundary"]
    return {m: cl.count_mode(model, m, batch=1, prompt_len=5) for m in modes}


def test_each_switch_removes_what_it_claims(counts):
    base = counts["default"]
    ops = base["moe_layer_ops"]
    assert ops.get("triton._router_kernel") == 1 and ops.get("triton._mla_prep_kernel") == 1
    assert ops.get("triton._gate_up_swiglu_kernel") == 1 and ops.get("triton._down_combine_kernel") == 1
    # the logits in the router's launch: the two fp32 casts and the GEMV go
    assert base["moe_layer"] - counts["+routerlogits"]["moe_layer"] == 3
    # the shared expert in the routed experts' launches: gate, up, silu, mul, down and the add go
    assert base["moe_layer"] - counts["+sharedfold"]["moe_layer"] == 6
    assert "aten.silu" not in counts["+sharedfold"]["moe_layer_ops"]
    # the MLA attention: cat, bmm, cast, masked_fill (and its mask's not), scale, softmax, cast, bmm -> 1 launch
    mla = counts["+mla"]["moe_layer_ops"]
    assert base["moe_layer"] - counts["+mla"]["moe_layer"] >= 7 and "aten.softmax" not in mla
    assert counts["+mla"]["dense_layer"] == counts["+mla"]["moe_layer"] - (base["moe_layer"] - base["dense_layer"])


def test_block_boundary_add_lives_in_the_next_norm(counts):
    base, plain = counts["default"], counts["+noboundary"]
    # one add a layer more without it (the last layer's goes to the final norm, counted outside)
    assert plain["moe_layer"] - base["moe_layer"] == 1 and plain["dense_layer"] - base["dense_layer"] == 1
    assert base["moe_layer_ops"].get("triton._rms_norm_kernel") == 2  # the boundary's add + norm, the FFN's
    assert plain["outside"] - base["outside"] == 0  # the final norm: add + norm in one launch, or norm after the add


def test_the_formula_step_is_far_longer(counts):
    """Every fused kernel off: the eager formula's step, several times the launches (what the kernels bought)."""
    assert counts["+nonorm+norope+nocachewrite+norouter+noboundary"]["moe_layer"] > 2 * counts["default"]["moe_layer"]


def test_nothing_outside_the_layers_grows_with_the_moe_layers(cl):
    """A decode step (no losses asked for) sums no balancing losses: the ops outside the layers are the same with 1
    and with 3 MoE layers (they were 3 adds a MoE layer: 21 launches a bench_ref step)."""
    rows = [cl.count_mode(cl.build_model(n, 128, "tiny"), "default", batch=1, prompt_len=5) for n in (2, 4)]
    assert rows[0]["outside"] == rows[1]["outside"]
