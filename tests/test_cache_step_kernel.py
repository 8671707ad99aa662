"""A one-token cache step's bookkeeping and RoPE cos/sin in one launch (models/kernels/cache_step.py, through
``prepare_attention`` and ``MLA.fused_cache_step``) against the formula it replaces, and the RoPE table it copies
cos/sin from (``RotaryEmbedding.table``) against ``RotaryEmbedding.forward`` and float64.

The kernel runs on CUDA where there is one, else in Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1
on a machine without a GPU); on the CPU the tests add "cpu" to ``MLA.kernel_devices``. "The same" is ``torch.equal``:
the positions, the mask, cos and sin, and the cache's key mask, counts and length afterwards, also against the
formula as it was before this kernel (``_reference``: cumsum positions, arange slots), so the formula's own one-token
shortcuts are held too.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (
    assert_generate_equals, engine_greedy_tokens, kernel_test_model, kernel_test_prompts, sm90_compile_report,
    triton_kernels)

from moeflow.models import ModelConfig
from moeflow.models.attention import MLA, MLACache, _attention_mask, prepare_attention
from moeflow.models.layers import RotaryEmbedding

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def ck():
    """kernels.cache_step with a runnable kernel: compiled on CUDA, interpreted on the CPU (else skip)."""
    return triton_kernels("cache_step", "_cache_step_kernel")


@pytest.fixture(scope="module")
def device(ck):
    return "cuda" if torch.cuda.is_available() else "cpu"


class _Counted:
    """Counts ``cache_step`` calls (through the module attribute ``prepare_attention`` imports at call time)."""

    def __init__(self, ck, monkeypatch):
        self.calls = 0
        real = ck.cache_step

        def wrapper(*args, **kw):
            self.calls += 1
            return real(*args, **kw)

        monkeypatch.setattr(ck, "cache_step", wrapper)


def _kernel_on_the_cpu_too(monkeypatch, on: bool = True):
    monkeypatch.setattr(MLA, "kernel_devices", ("cuda", "cpu"))
    monkeypatch.setattr(MLA, "fused_cache_step", on)


def _reference(ids_BT, attention_mask_BS, cache, cache_position, rotary):
    """The formula as it was (commit def3955): arange slots, cumsum positions, the mask's four ops, the RoPE formula."""
    B, T = ids_BT.shape
    dev = ids_BT.device
    if cache_position is None:
        start = cache.length
        slots_T, num_keys = torch.arange(start, start + T, device=dev), start + T
        cache.length = start + T
    else:
        slots_T, num_keys = cache_position.to(dev), cache.max_len
    new_real_BT = (attention_mask_BS[:, -T:].to(device=dev, dtype=torch.bool) if attention_mask_BS is not None
                   else torch.ones(B, T, dtype=torch.bool, device=dev))
    cache.key_mask_BS.index_copy_(1, slots_T, new_real_BT)
    positions = cache.num_real_B[:, None] + (new_real_BT.long().cumsum(1) - 1).clamp_min(0)
    cache.num_real_B.add_(new_real_BT.sum(1))
    mask = _attention_mask(slots_T, torch.arange(num_keys, device=dev), cache.key_mask_BS[:, :num_keys])
    return positions, mask, *rotary(positions)


def _a_cache(B, S, device, seed, width=None):
    """A cache (B rows, S slots) with a random key mask and counts, or a column view of width ``width`` of it (the
    slot cache's static view: rows strided by S), and the full key mask to check afterwards."""
    g = torch.Generator().manual_seed(seed)
    cache = MLACache(1, B, S, 4, 2, device=device)
    cache.key_mask_BS.copy_(torch.rand(B, S, generator=g) < 0.6)
    cache.num_real_B.copy_(cache.key_mask_BS.sum(1))
    cache.length = S // 2
    if width is None:
        return cache, cache
    view = MLACache.__new__(MLACache)
    view.batch_size, view.max_len, view.kv = B, width, [t[:, :width] for t in cache.kv]
    view.split_views(4)
    view.key_mask_BS, view.num_real_B = cache.key_mask_BS[:, :width], cache.num_real_B
    view.slot_ids_S = cache.slot_ids_S
    view.length = cache.length
    return view, cache


def _clone(cache):
    out = MLACache.__new__(MLACache)
    out.__dict__.update(cache.__dict__)
    out.key_mask_BS, out.num_real_B = cache.key_mask_BS.clone(), cache.num_real_B.clone()
    return out


# (B, S, mode, mask): a decode step of a batch with padded (not real) rows, of every row real (no mask), left-padded
# generate()'s (B, length + 1) mask of int64 ones/zeros, the static mode at a slot in the middle and at the last slot,
# a static view narrower than the cache (strided key-mask rows), 2,500 slots (several mask blocks), batch 1, a first
# token (one key: a one-token prompt's prefill)
CASES = [(2, 1, "dynamic", "rows"), (3, 9, "dynamic", "rows"), (2, 7, "dynamic", None), (4, 12, "dynamic", "long"),
         (3, 10, ("static", 6), "rows"), (2, 10, ("static", 9), None), (3, 16, ("view", 5, 11), "rows"),
         (2, 2500, ("static", 2100), "rows"), (1, 33, ("static", 20), "rows")]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_equals_the_formula_and_the_old_formula(ck, device, monkeypatch, case):
    B, S, mode, mask_kind = CASES[case]
    cfg = ModelConfig.preset("tiny")
    rotary = RotaryEmbedding(cfg).to(device)
    width = mode[2] if mode[0] == "view" else None
    ids = torch.zeros(B, 1, dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(case)
    real = torch.rand(B, 1, generator=g) < 0.5
    real[0] = True
    results = {}
    for name in ("kernel", "formula", "reference"):
        cache, full = _a_cache(B, S, device, seed=case, width=width)
        cache_position = None if mode == "dynamic" else torch.tensor([mode[1]], device=device)
        if mask_kind == "rows":
            am = real.to(device)
        elif mask_kind == "long":  # generate()'s mask: every column so far, int64
            am = torch.cat([full.key_mask_BS[:, : cache.length].long().cpu(), real.long()], 1).to(device)
        else:
            am = None
        if name == "reference":
            pos, mask, cos, sin = _reference(ids, am, cache, cache_position, rotary)
        else:
            _kernel_on_the_cpu_too(monkeypatch, name == "kernel")
            counted = _Counted(ck, monkeypatch)
            pos, mask, step = prepare_attention(ids, None, am, cache, cache_position, rotary=rotary)
            assert counted.calls == (name == "kernel")
            assert (step.rope is not None) == (name == "kernel")
            cos, sin = step.rope if step.rope is not None else rotary(pos)
            assert torch.equal(step.mask_B1TS, mask)
        results[name] = (pos, mask, cos, sin, full.key_mask_BS, full.num_real_B, cache.length)
    for name in ("kernel", "formula"):
        for i, (a, b) in enumerate(zip(results[name], results["reference"])):
            same = a == b if isinstance(a, int) else (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
            assert same, (name, i, a, b)


def test_kernel_not_taken_where_it_does_not_apply(ck, device, monkeypatch):
    """Prefill chunks (T > 1), given positions, no rotary, the switch off, the CPU by default, a float mask: the
    formula (and nothing written twice: the counts advance once)."""
    rotary = RotaryEmbedding(ModelConfig.preset("tiny")).to(device)
    counted = _Counted(ck, monkeypatch)
    ids1 = torch.zeros(2, 1, dtype=torch.long, device=device)
    if device == "cpu":
        cache, _ = _a_cache(2, 8, device, 0)
        prepare_attention(ids1, None, None, cache, None, rotary=rotary)  # the CPU is no kernel device by default
        assert counted.calls == 0
    _kernel_on_the_cpu_too(monkeypatch)
    for kw in [dict(ids=torch.zeros(2, 3, dtype=torch.long, device=device)),
               dict(positions=torch.tensor([[4], [2]], device=device)), dict(rotary=None),
               dict(mask=torch.ones(2, 1, device=device))]:
        cache, _ = _a_cache(2, 8, device, 1)
        before = cache.num_real_B.clone()
        ids = kw.get("ids", ids1)
        prepare_attention(ids, kw.get("positions"), kw.get("mask"), cache, None, rotary=kw.get("rotary", rotary))
        assert counted.calls == 0, kw
        assert torch.equal(cache.num_real_B, before + ids.shape[1]), kw
    monkeypatch.setattr(MLA, "fused_cache_step", False)
    cache, _ = _a_cache(2, 8, device, 1)
    prepare_attention(ids1, None, None, cache, None, rotary=rotary)
    assert counted.calls == 0
    monkeypatch.setattr(MLA, "fused_cache_step", True)
    prepare_attention(ids1, None, None, cache, None, rotary=rotary)
    assert counted.calls == 1


def test_kernel_applies_table(ck, device):
    km = torch.zeros(2, 8, dtype=torch.bool, device=device)
    nr = torch.zeros(2, dtype=torch.long, device=device)
    slot = torch.tensor([3], device=device)
    real = torch.ones(2, 1, dtype=torch.bool, device=device)
    table = torch.zeros(16, 8, device=device)
    assert ck.kernel_applies(real, slot, km, nr, 8, table) and ck.kernel_applies(None, slot, km, nr, 4, table)
    assert ck.kernel_applies(real.long(), slot, km, nr, 8, table)
    bad = [(real.float(), slot, km, nr, 8, table), (real, slot.int(), km, nr, 8, table),
           (real, torch.tensor([3, 4], device=device), km, nr, 8, table), (real, slot, km, nr, 9, table),
           (real, slot, km.long(), nr, 8, table), (real, slot, km, nr.int(), 8, table),
           (real, slot, km, nr, 8, table.double()), (real, slot, km, nr, 8, torch.zeros(8, 16, device=device).t()),
           (real, slot, km, nr, 8, torch.zeros(16, 7, device=device)), (real[:1], slot, km, nr, 8, table),
           (real, slot, km, nr[:1], 8, table)]
    for i, args in enumerate(bad):
        assert not ck.kernel_applies(*args), i


# --------------------------------------------------------------------------- the RoPE table
@pytest.mark.parametrize("yarn", [False, True])
def test_table_rows_are_the_formulas_bits(yarn):
    """Every row of a 4,096-row table equals ``forward`` of that position computed in a batch of any shape (the
    decode step's (B, 1), a prefill's (B, T)), bit for bit, for tiny's and bench_ref's RoPE, with YaRN's scaled
    frequencies and attention factor too; and it is as close to float64 as the formula (it is the formula)."""
    for preset in ("tiny", "bench_ref"):
        cfg = ModelConfig.preset(preset)
        if yarn:
            cfg = cfg.replace(rope_scaling={"factor": 4.0, "original_max_position_embeddings": 512, "mscale": 1.0,
                                            "mscale_all_dim": 0.8})
        rotary = RotaryEmbedding(cfg)
        table = rotary.table(4000, "cpu")
        assert table.shape == (4096, cfg.qk_rope_head_dim) and table.dtype == torch.float32
        half = cfg.qk_rope_head_dim // 2
        g = torch.Generator().manual_seed(1)
        shapes = [(1, 1), (3, 1), (32, 1), (2, 7), (5, 64), (1, 4096)]
        for shape in shapes:
            pos = torch.randint(0, 4096, shape, generator=g) if shape != (1, 4096) else torch.arange(4096)[None]
            cos, sin = rotary(pos)
            assert torch.equal(table[pos][..., :half], cos) and torch.equal(table[pos][..., half:], sin), shape
        pos64 = torch.arange(4096, dtype=torch.float64)[:, None]
        inv64 = rotary.inv_freq.double()
        want = torch.cat([(pos64 * inv64).cos(), (pos64 * inv64).sin()], -1) * rotary.attention_factor
        assert (table.double() - want).abs().max() < 2e-3  # fp32 angles at 4,096: the formula's own error


def test_table_is_kept_grown_and_rebuilt_for_new_frequencies():
    rotary = RotaryEmbedding(ModelConfig.preset("tiny"))
    t1 = rotary.table(10, "cpu")
    assert t1.shape[0] == RotaryEmbedding.min_table_rows and rotary.table(1024, "cpu") is t1
    t2 = rotary.table(3000, "cpu")
    assert t2.shape[0] == 4096 and rotary.table(5, "cpu") is not None
    assert any(t is t1 for _, t in rotary._tables)  # kept: a captured graph may read it
    assert torch.equal(t2[: t1.shape[0]], t1)
    with torch.no_grad():
        rotary.inv_freq.mul_(0.5)  # what init_weights' copy_ is: a new version
    t3 = rotary.table(10, "cpu")
    assert not torch.equal(t3[5], t1[5]) and torch.equal(t3[:1024], rotary.table(10, "cpu")[:1024])
    cos, _ = rotary(torch.tensor([[7]]))
    assert torch.equal(t3[7, : cos.shape[-1]], cos[0, 0])
    assert rotary.table(10, "meta") is None  # not where inv_freq lives


# --------------------------------------------------------------------------- the model, generate(), the engine
def test_decode_logits_bit_equal_and_generate_and_engine(ck, device, monkeypatch):
    """The tiny model: left-padded generate() (its dynamic decode steps) with the kernel on and off gives the same
    tokens and log-probs exactly (the kernel ran each decode step); the serving engine's static step (the captured
    step's code, uncaptured; ragged rows joining mid-way) with it on equals generate()."""
    from moeflow.models.generation import generate
    from moeflow.models.serving import Engine

    model = kernel_test_model(device, norm_weights=True)
    prompts = kernel_test_prompts((5, 2, 9))
    runs = {}
    for on in (False, True):
        _kernel_on_the_cpu_too(monkeypatch, on)
        counted = _Counted(ck, monkeypatch)
        runs[on] = generate(model, prompts, 4, return_logprobs=True)
        assert counted.calls == (3 if on else 0)  # the decode steps (the prefill is T > 1)
    assert runs[True].tokens == runs[False].tokens and runs[True].logprobs == runs[False].logprobs
    counted = _Counted(ck, monkeypatch)
    engine = Engine(model, max_batch=2, prefill_chunk=8, decode_mode="static")
    got = engine_greedy_tokens(engine, kernel_test_prompts((3, 9, 1)), 5)
    assert counted.calls > 0
    assert_generate_equals(model, kernel_test_prompts((3, 9, 1)), got, 5)


def test_a_one_token_prompt_prefills_through_the_kernel(ck, device, monkeypatch):
    """A one-token prompt's prefill is a one-token cache step (one key): generate() takes the kernel for it too and
    gives the formula's tokens and log-probs exactly."""
    from moeflow.models.generation import generate

    model = kernel_test_model(device, norm_weights=True)
    runs = {}
    for on in (False, True):
        _kernel_on_the_cpu_too(monkeypatch, on)
        counted = _Counted(ck, monkeypatch)
        runs[on] = generate(model, [[7]], 3, return_logprobs=True)
        assert counted.calls == (3 if on else 0)
    assert runs[True].tokens == runs[False].tokens and runs[True].logprobs == runs[False].logprobs


def test_model_logits_bit_equal_every_step(ck, device, monkeypatch):
    """Logits of a left-padded cached prefill and 4 decode steps (dynamic mode), kernel on and off: equal bit for
    bit, and the caches' key masks and counts too."""
    model = kernel_test_model(device, norm_weights=True)
    ids = torch.tensor([[0, 0, 5, 17], [7, 8, 1, 2]], device=device)
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], device=device)
    runs = {}
    for on in (False, True):
        _kernel_on_the_cpu_too(monkeypatch, on)
        cache = model.new_cache(2, 8)
        with torch.no_grad():
            out = [model(ids, cache=cache, attention_mask_BS=am).logits]
            mask = am
            for _ in range(4):
                mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype, device=device)], 1)
                out.append(model(out[-1][:, -1:].argmax(-1), cache=cache, attention_mask_BS=mask).logits)
        runs[on] = out, cache
    (on, c_on), (off, c_off) = runs[True], runs[False]
    assert all(torch.equal(a, b) for a, b in zip(on, off))
    assert torch.equal(c_on.key_mask_BS, c_off.key_mask_BS) and torch.equal(c_on.num_real_B, c_off.num_real_B)


def test_torch_compile_traces_the_formula(ck, device, monkeypatch):
    """Under torch.compile the formula (inductor fuses it; the kernel is no op it could trace): no kernel call, the
    same values."""
    _kernel_on_the_cpu_too(monkeypatch)
    rotary = RotaryEmbedding(ModelConfig.preset("tiny")).to(device)
    counted = _Counted(ck, monkeypatch)

    def step(ids, cache_position, am, key_mask, num_real):
        cache = MLACache.__new__(MLACache)
        cache.max_len, cache.key_mask_BS, cache.num_real_B = key_mask.shape[1], key_mask, num_real
        cache.slot_ids_S, cache.length = torch.arange(key_mask.shape[1], device=key_mask.device), 0
        pos, mask, st = prepare_attention(ids, None, am, cache, cache_position, rotary=rotary)
        return (pos, mask, *(st.rope if st.rope is not None else rotary(pos)))

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    args = lambda: (torch.zeros(2, 1, dtype=torch.long, device=device), torch.tensor([3], device=device),  # noqa: E731
                    torch.tensor([[True], [False]], device=device),
                    torch.tensor([[1, 1, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool, device=device),
                    torch.tensor([2, 1], device=device))
    got = compiled(*args())
    assert counted.calls == 0
    want = step(*args())
    assert counted.calls == 1
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# --------------------------------------------------------------------------- compiled for the GPU
_COMPILE_FOR_SM90 = r"""
import json
import triton.backends.nvidia  # noqa: F401
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from moeflow.models.kernels import cache_step as ck

fn = ck._cache_step_kernel
report = {}
CASES = [("bool_mask", "*u8", True, 32, ck.BLOCK_S), ("long_mask", "*i64", True, 64, ck.BLOCK_S),
         ("no_mask", "*i64", False, 2, 1)]
for name, real_ty, has_real, P, block_s in CASES:
    types = {"real_ptr": real_ty, "slot_ptr": "*i64", "km_ptr": "*u8", "num_real_ptr": "*i64", "pos_ptr": "*i64",
             "mask_ptr": "*u8", "table_ptr": "*fp32", "rope_ptr": "*fp32"}
    consts = {"HAS_REAL": has_real, "P": P, "BLOCK_P": P, "BLOCK_S": block_s}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    kernel = compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": 4})
    report[name] = {"cubin": len(kernel.asm["cubin"])}
print(json.dumps(report))
"""


def test_kernel_compiles_for_sm90(ck):
    """The interpreter is lenient: the kernel compiles for sm_90 (Triton's own ptxas, no GPU needed) with a bool
    (byte) mask, an int64 mask and none, at rope dims 32 (bench_ref) and 64 (DeepSeek-V3), and 2 with one mask
    column (a first token's step: one key)."""
    report = sm90_compile_report(_COMPILE_FOR_SM90)
    assert set(report) == {"bool_mask", "long_mask", "no_mask"} and all(r["cubin"] > 0 for r in report.values())


# --------------------------------------------------------------------------- on the GPU (the lead runs these)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_table_equals_the_formula_never_syncs_and_captures(ck):
    """bench_ref's RoPE on CUDA: the table's rows equal CUDA's formula at (1, 1), (32, 1) and (4, 512) positions;
    a static step (the engine's) with sync debug mode "error" syncs nothing; a CUDA graph of it replays the eager
    call's outputs and state (new slot and mask entries copied in)."""
    rotary = RotaryEmbedding(ModelConfig.preset("bench_ref")).to("cuda")
    table = rotary.table(4096, "cuda")
    half = table.shape[1] // 2
    for shape in [(1, 1), (32, 1), (4, 512)]:
        pos = torch.randint(0, 4096, shape, device="cuda")
        cos, sin = rotary(pos)
        assert torch.equal(table[pos][..., :half], cos) and torch.equal(table[pos][..., half:], sin), shape
    B, S = 32, 256
    with torch.inference_mode():
        cache, _ = _a_cache(B, S, "cuda", 3)
        ref = _clone(cache)
        real = (torch.rand(B, 1, device="cuda") < 0.5)
        slot = torch.tensor([100], device="cuda")
        ck.cache_step(real, slot, ref.key_mask_BS, ref.num_real_B, S, table)  # JIT first
        ref = _clone(cache)
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = ck.cache_step(real, slot, ref.key_mask_BS, ref.num_real_B, S, table)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        want_cache = _clone(cache)
        want = _reference(torch.zeros(B, 1, dtype=torch.long, device="cuda"), real, want_cache, slot, rotary)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(ref.key_mask_BS, want_cache.key_mask_BS) and torch.equal(ref.num_real_B,
                                                                                  want_cache.num_real_B)
        graph_cache = _clone(cache)
        static_real, static_slot = torch.zeros_like(real), torch.zeros_like(slot)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ck.cache_step(static_real, static_slot, graph_cache.key_mask_BS, graph_cache.num_real_B, S, table)
        graph_cache.key_mask_BS.copy_(cache.key_mask_BS)
        graph_cache.num_real_B.copy_(cache.num_real_B)
        static_real.copy_(real)
        static_slot.copy_(slot)
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(out, got))
    assert torch.equal(graph_cache.key_mask_BS, ref.key_mask_BS) and torch.equal(graph_cache.num_real_B, ref.num_real_B)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_equals_generate_and_the_switch_off(ck, monkeypatch):
    """The serving engine's captured decode (bf16) with the kernel on, against generate() (which takes it too), token
    for token, and against the engine with it off; the kernel ran (counted at capture and in generate's steps)."""
    from moeflow.models.generation import generate
    from moeflow.models.serving import Engine

    model = kernel_test_model("cpu", norm_weights=True).to("cuda", torch.bfloat16)
    prompts = kernel_test_prompts((3, 17, 1, 30, 9, 24))
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(MLA, "fused_cache_step", on)
        counted = _Counted(ck, monkeypatch)
        engine = Engine(model, max_batch=3, prefill_chunk=8, cache_len=65)
        assert engine.decode_mode == "graph"
        runs[on] = engine_greedy_tokens(engine, prompts, 30)
        assert engine.static.num_graphs >= 2 and engine.static.num_replays > 30
        assert (counted.calls > 0) == on
    assert runs[True] == runs[False]
    for i, p in enumerate(prompts):
        assert runs[True][i] == generate(model, [p], 30).tokens[0], f"request {i}"
