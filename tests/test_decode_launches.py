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
    modes = ["default", "+norouterlogits", "+nosharedfold", "+mla", "+noboundary", "+nocachestep",
             "+nonorm+norope+nocachewrite+norouter+norouterlogits+nosharedfold+noboundary"]
    return {m: cl.count_mode(model, m, batch=1, prompt_len=5) for m in modes}


def test_each_switch_removes_what_it_claims(counts):
    base = counts["default"]
    ops = base["moe_layer_ops"]
    assert ops.get("triton._router_kernel") == 1 and ops.get("triton._mla_prep_kernel") == 1
    assert ops.get("triton._gate_up_swiglu_kernel") == 1 and ops.get("triton._down_combine_kernel") == 1
    # the logits in the router's launch (on by default): without it the two fp32 casts and the GEMV come back
    assert counts["+norouterlogits"]["moe_layer"] - base["moe_layer"] == 3
    # the shared expert in the routed experts' launches (on by default): without it gate, up, silu, mul, down and
    # the add come back
    assert counts["+nosharedfold"]["moe_layer"] - base["moe_layer"] == 6
    assert "aten.silu" not in ops and "aten.silu" in counts["+nosharedfold"]["moe_layer_ops"]
    # the MLA attention: cat, bmm, cast, where, scale, softmax, cast, bmm and the value up-projection's einsum -> 1
    # launch (the one-split kernel at these 6 keys); the one einsum left is the query's absorption (W_uk)
    mla = counts["+mla"]["moe_layer_ops"]
    assert base["moe_layer"] - counts["+mla"]["moe_layer"] == 8 and "aten.softmax" not in mla
    assert mla.get("aten.einsum") == 1 and base["moe_layer_ops"].get("aten.einsum") == 2, mla
    assert counts["+mla"]["dense_layer"] == counts["+mla"]["moe_layer"] - (base["moe_layer"] - base["dense_layer"])


def test_the_formula_attention_masks_in_one_launch(counts):
    """Without the MLA kernel the decode-sized attention masks its scores with one ``where`` (no inverted mask and
    ``masked_fill``: a launch a layer fewer, the same values)."""
    ops = counts["default"]["moe_layer_ops"]
    assert ops.get("aten.where") == 1 and "aten.bitwise_not" not in ops and "aten.masked_fill" not in ops, ops
    # where, not masked_fill and not: the kernel replaces 8 (7 of the attention's, the einsum after it)
    assert counts["default"]["dense_layer"] - counts["+mla"]["dense_layer"] == 8


def test_block_boundary_add_lives_in_the_next_norm(counts):
    base, plain = counts["default"], counts["+noboundary"]
    # one add a layer more without it (the last layer's goes to the final norm, counted outside)
    assert plain["moe_layer"] - base["moe_layer"] == 1 and plain["dense_layer"] - base["dense_layer"] == 1
    assert base["moe_layer_ops"].get("triton._rms_norm_kernel") == 2  # the boundary's add + norm, the FFN's
    assert plain["outside"] - base["outside"] == 0  # the final norm: add + norm in one launch, or norm after the add


def test_the_formula_step_is_far_longer(counts):
    """Every fused kernel off: the eager formula's step, several times the launches (what the kernels bought)."""
    off = counts["+nonorm+norope+nocachewrite+norouter+norouterlogits+nosharedfold+noboundary"]
    assert off["moe_layer"] > 3 * counts["default"]["moe_layer"]


def test_nothing_outside_the_layers_grows_with_the_moe_layers(cl):
    """A decode step (no losses asked for) sums no balancing losses: the ops outside the layers are the same with 1
    and with 3 MoE layers (they were 3 adds a MoE layer: 21 launches a bench_ref step)."""
    rows = [cl.count_mode(cl.build_model(n, 128, "tiny"), "default", batch=1, prompt_len=5) for n in (2, 4)]
    assert rows[0]["outside"] == rows[1]["outside"]


def test_a_steps_bookkeeping_and_rope_table_are_one_launch(counts):
    """Outside the layers a decode step launches the embedding, the fused cache step (kernels/cache_step.py: the key
    mask's slot, the counts, the positions, the mask and the RoPE cos/sin), the final norm, the LM head and the
    step's zero losses: 5 (23 before: the cache step's 13 small kernels and the RoPE table's 6). With
    ``MLA.fused_cache_step`` off the formula's 17: a one-token step's position is a copy of the count (no cast,
    cumsum, sub, clamp, add), its count advances by the mask entry (no sum), the slots and key slots are views of the
    cache's aranges (no arange): its 13 are 7, and the table's 6."""
    assert counts["default"]["outside_ops"] == {"aten.embedding": 1, "triton._cache_step_kernel": 1,
                                                "triton._rms_norm_kernel": 1, "aten.linear": 1,
                                                "aten.new_zeros": 1}, counts["default"]["outside_ops"]
    off = counts["+nocachestep"]
    assert off["outside"] == 17 and off["outside"] - counts["default"]["outside"] == 12, off["outside_ops"]
    assert not {"aten.cumsum", "aten.arange", "aten.sum", "aten.clamp_min"} & set(off["outside_ops"]), off
    assert {k: off["outside_ops"].get(k) for k in ("aten.cos", "aten.sin", "aten.clone", "aten.index_copy_")} == {
        "aten.cos": 1, "aten.sin": 1, "aten.clone": 1, "aten.index_copy_": 1}, off["outside_ops"]
    assert off["moe_layer"] == counts["default"]["moe_layer"] and off["dense_layer"] == counts["default"]["dense_layer"]


def test_a_moe_layer_makes_no_zero_losses_at_decode(counts):
    """No losses asked for (a decode step): a MoE layer allocates no zeros for them (a ``new_zeros`` launch a MoE
    layer: 7 a bench_ref step)."""
    for mode, row in counts.items():
        assert "aten.new_zeros" not in row["moe_layer_ops"] and "aten.zeros" not in row["moe_layer_ops"], mode
