"""The fused MLA cache step (models/kernels/mla_prep.py) against the unfused path it replaces (the latent's norm, the
shared key's RoPE, ``torch.cat``, the cast to the cache's dtype, ``index_copy_``; the queries' RoPE), and the rules
that decide where ``MLA`` takes it.

The kernel runs on CUDA where there is one, else in Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1
on a machine without a GPU). On the CPU the model-level tests add "cpu" to ``MLA.kernel_devices`` (and switch
``fused_cache_write`` on: it is off by default) and to ``RMSNorm.kernel_devices`` (the unfused path then takes the
fused RMSNorm, whose arithmetic the kernel shares). Everything here skips when triton is not importable.

"The same function" is meant bit for bit against the unfused path with the fused RMSNorm (``torch.equal`` of the whole
cache buffer and of the rotated query); against the eager norm formula the latent differs as the fused RMSNorm's does
(the fp32 sum's order), the key and the query stay bit-equal.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import (
    assert_generate_equals, engine_greedy_tokens, kernel_test_model, kernel_test_prompts, sm90_compile_report,
    triton_kernels)

from moeflow.models import ModelConfig
from moeflow.models.attention import MLA
from moeflow.models.layers import RMSNorm, RotaryEmbedding, apply_rope, rms_norm

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

FLOATS = (torch.bfloat16, torch.float32)


@pytest.fixture(scope="module")
def mk():
    """kernels.mla_prep with a runnable kernel: compiled on CUDA, interpreted on the CPU (else skip)."""
    return triton_kernels("mla_prep", "_mla_prep_kernel")


@pytest.fixture(scope="module")
def rk(mk):
    """kernels.rmsnorm: the norm arithmetic the kernel shares (the unfused path's latent norm)."""
    return triton_kernels("rmsnorm", "_rms_norm_kernel")


@pytest.fixture(scope="module")
def device(mk):
    return "cuda" if torch.cuda.is_available() else "cpu"


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in units in the last place of their (common) dtype."""
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    sign_free = (1 << (8 * a.element_size() - 1)) - 1

    def ordered(t):
        i = t.contiguous().view(bits).long()
        return torch.where(i < 0, -(i & sign_free), i)

    return (ordered(a) - ordered(b)).abs()


class Step:
    """One cache step's inputs as MLA passes them: kv_a (B, T, R + P), the queries' rope part (a split of
    (B, T, H, N + P)), the latent norm's weight, cos/sin (B, T, P/2) of real positions (up to ``max_pos``), a cache
    (B, S, R + P) that is a view into a larger buffer (rows and columns past it must stay untouched) and slots."""

    def __init__(self, B, T, H, R, P, x_dtype, w_dtype, cache_dtype, slots, device, seed, max_pos=2047,
                 scale=1.0, S=None):
        g = torch.Generator().manual_seed(seed)
        cfg = ModelConfig.preset("tiny").replace(qk_rope_head_dim=P, rope_theta=10000.0)
        positions = torch.randint(max(0, max_pos - 50), max_pos + 1, (B, T), generator=g)
        self.cos, self.sin = RotaryEmbedding(cfg)(positions)
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        self.kv_a = (torch.randn(B, T, R + P, generator=g) * scale).to(device=device, dtype=x_dtype)
        self.q_rope = torch.randn(B, T, H, 8 + P, generator=g).to(device=device, dtype=x_dtype).split([8, P], -1)[1]
        self.w = (torch.rand(R, generator=g) + 0.5).to(device=device, dtype=w_dtype)
        S = S or int(max(slots)) + 3
        self.buffer = torch.randn(B + 1, S + 2, R + P, generator=g).to(device=device, dtype=cache_dtype)
        self.cache = self.buffer[:B, :S]
        self.slots = torch.as_tensor(slots, dtype=torch.long).to(device)
        self.R, self.eps = R, 1e-6

    def fused(self, mk) -> tuple[torch.Tensor, torch.Tensor]:
        """(the buffer after the kernel, the rotated query)."""
        buffer, cache = self._copy()
        q_rot = mk.mla_prep(self.kv_a, self.q_rope, self.w, self.eps, self.cos, self.sin, cache, self.slots)
        return buffer, q_rot

    def unfused(self, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """The same by MLA's unfused code: ``norm(latent, w, eps)``, apply_rope, cat, cast, index_copy_."""
        buffer, cache = self._copy()
        lat, key = self.kv_a.split([self.R, self.kv_a.shape[-1] - self.R], dim=-1)
        new = torch.cat([norm(lat, self.w, self.eps), apply_rope(key, self.cos, self.sin)], dim=-1)
        cache.index_copy_(1, self.slots, new.to(cache.dtype))
        return buffer, apply_rope(self.q_rope, self.cos, self.sin)

    def _copy(self):
        buffer = self.buffer.clone()
        return buffer, buffer[: self.cache.shape[0], : self.cache.shape[1]]


# (B, T, H, R, P, slots): a decode step (T = 1), prefill chunks (several T), slots out of order and apart, bench_ref's
# sizes (R 256, 16 heads of P 32) and R, P, H that are not powers of two (masked lanes)
CASES = [(1, 1, 1, 8, 2, [0]), (2, 1, 4, 32, 8, [5]), (3, 4, 3, 40, 8, [6, 2, 9, 3]), (2, 3, 5, 24, 6, [1, 2, 3]),
         (1, 2, 16, 256, 32, [7, 1]), (2, 5, 2, 16, 4, [10, 0, 4, 8, 2])]


@pytest.mark.parametrize("x_dtype,cache_dtype", list(itertools.product(FLOATS, FLOATS)))
def test_bit_equal_to_the_unfused_path(mk, rk, device, x_dtype, cache_dtype):
    """Every case, weight in x's dtype and in fp32 (the norm's product then rounds in fp32): the whole cache buffer
    (the new rows written, everything else untouched) and the rotated query ``torch.equal`` to MLA's unfused path
    with the fused RMSNorm."""
    checked = 0
    for (B, T, H, R, P, slots), w_dtype in itertools.product(CASES, sorted({x_dtype, torch.float32}, key=str)):
        step = Step(B, T, H, R, P, x_dtype, w_dtype, cache_dtype, slots, device, seed=checked)
        (got_cache, got_q), (want_cache, want_q) = step.fused(mk), step.unfused(rk.rms_norm)
        assert got_q.dtype == x_dtype and got_q.shape == (B, T, H, P) and got_q.is_contiguous()
        assert torch.equal(got_q, want_q), (B, T, H, R, P)
        assert torch.equal(got_cache, want_cache), (B, T, H, R, P, w_dtype)
        assert not torch.equal(got_cache, step.buffer)  # it wrote something
        checked += 1
    assert checked == len(CASES) * (1 if x_dtype == torch.float32 else 2)


def test_mixed_half_dtypes_and_magnitudes(mk, rk, device):
    """fp16 activations (fp16 and bf16 caches, a bf16 weight: the norm's product then in fp32), tiny and large
    magnitudes (eps dominating; past fp16's range in bf16, the squares still finite): bit-equal to the unfused
    path."""
    for i, (x_dtype, w_dtype, cache_dtype, scale) in enumerate([
            (torch.float16, torch.float16, torch.float16, 1.0), (torch.float16, torch.bfloat16, torch.bfloat16, 1.0),
            (torch.bfloat16, torch.bfloat16, torch.float16, 1e-5), (torch.bfloat16, torch.bfloat16, torch.bfloat16,
                                                                    1e18)]):
        step = Step(2, 3, 3, 40, 8, x_dtype, w_dtype, cache_dtype, [4, 0, 2], device, seed=50 + i, scale=scale)
        (got_cache, got_q), (want_cache, want_q) = step.fused(mk), step.unfused(rk.rms_norm)
        assert torch.equal(got_q, want_q) and torch.equal(got_cache, want_cache), (x_dtype, w_dtype, cache_dtype)


def test_against_the_eager_norm_formula(mk, device):
    """Against the eager ``rms_norm`` (the unfused path without the fused RMSNorm): the RoPE key columns and the
    query bit-equal; the latent as the fused RMSNorm's is (tests/test_rmsnorm_kernel.py): bf16 ≥ 99 % bit-equal and
    one ulp at most, fp32 a few ulps (the sum's order; the CPU divides by R where the kernel multiplies)."""
    equal = total = 0
    for i, (dtype, (B, T, H, R, P, slots)) in enumerate(itertools.product(FLOATS, CASES)):
        step = Step(B, T, H, R, P, dtype, dtype, dtype, slots, device, seed=100 + i)
        (got_cache, got_q), (want_cache, want_q) = step.fused(mk), step.unfused(rms_norm)
        assert torch.equal(got_q, want_q) and torch.equal(got_cache[..., R:], want_cache[..., R:])
        u = ulps(got_cache[..., :R], want_cache[..., :R])
        # bf16: 1 ulp measured in the interpreter; on CUDA the fused RMSNorm's GPU test measured 2 (rsqrt's ulp)
        assert int(u.max()) <= ((1 if device == "cpu" else 2) if dtype == torch.bfloat16 else 8), (dtype, B, T, R)
        if dtype == torch.bfloat16:
            equal, total = equal + int((u == 0).sum()), total + u.numel()
    assert equal / total >= 0.99, equal / total


def test_strided_inputs_and_slots(mk, rk, device):
    """kv_a, the query, cos/sin and the slots read through their strides (a kv_a of transposed storage, heads-major
    queries, tables two apart, slots a strided view), a cache whose rows are apart (a view of every other row).
    R, R + P and B·(R + P) all multiples of 16: on CUDA the fused RMSNorm reads a contiguous copy of the latent, and
    its rows and the kernel's must be equally aligned for the two to sum in one layout (bit-equal)."""
    g = torch.Generator().manual_seed(9)
    B, T, H, R, P = 2, 3, 4, 32, 16
    step = Step(B, T, H, R, P, torch.bfloat16, torch.bfloat16, torch.bfloat16, [3, 0, 5], device, seed=9)
    step.kv_a = step.kv_a.transpose(0, 1).contiguous().transpose(0, 1)
    step.q_rope = torch.randn(B, H, T, P, generator=g).to(device, torch.bfloat16).transpose(1, 2)
    wide = torch.randn(B, T, P, generator=g).to(device)
    step.cos, step.sin = wide[..., ::2], wide[..., 1::2]
    step.slots = torch.tensor([3, 9, 0, 9, 5, 9], device=device)[::2]
    step.buffer = torch.randn(2 * B, 9, R + P, generator=g).to(device, torch.bfloat16)
    step.cache = step.buffer[::2, :7]
    got_q = mk.mla_prep(step.kv_a, step.q_rope, step.w, step.eps, step.cos, step.sin, step.cache, step.slots)
    want_buffer = step.buffer.clone()
    want_cache = want_buffer[::2, :7]
    lat, key = step.kv_a.split([R, P], dim=-1)
    want_cache.index_copy_(1, step.slots, torch.cat([rk.rms_norm(lat, step.w, step.eps),
                                                     apply_rope(key, step.cos, step.sin)], dim=-1))
    assert torch.equal(got_q, apply_rope(step.q_rope, step.cos, step.sin))
    assert torch.equal(step.buffer, want_buffer)


def test_many_query_heads_take_several_programs(mk, device):
    """DeepSeek-V3-like queries (128 heads of P 64: several head blocks) rotate bit-equal, heads past the last
    block's end masked."""
    B, T, H, R, P = 1, 2, 131, 32, 64
    assert mk.launch_config(R, H, P)[2] < H  # more than one query block
    step = Step(B, T, H, R, P, torch.bfloat16, torch.bfloat16, torch.bfloat16, [1, 0], device, seed=11)
    got_cache, got_q = step.fused(mk)
    assert torch.equal(got_q, apply_rope(step.q_rope, step.cos, step.sin))


def test_slots_outside_the_cache_are_not_written(mk, device):
    """A slot past the cache (or negative) writes nothing, not past the cache's end into the buffer beyond it (the
    formula raises there; prepare_attention never makes such a slot)."""
    step = Step(2, 3, 2, 16, 4, torch.float32, torch.float32, torch.float32, [1, 4, 3], device, seed=12, S=4)
    step.slots = torch.tensor([1, 4, -1], device=device)
    got_cache, _ = step.fused(mk)
    changed = (got_cache != step.buffer).any(-1)
    assert changed[:2, 1].all() and int(changed.sum()) == 2


def test_kernel_applies_table(mk):
    B, T, H, R, P, S = 2, 3, 4, 16, 8, 10
    kv, q, w = torch.zeros(B, T, R + P), torch.zeros(B, T, H, P), torch.ones(R)
    cos, cache, slots = torch.zeros(B, T, P // 2), torch.zeros(B, S, R + P), torch.arange(T)
    args = (kv, q, w, cos, cos, cache, slots)
    assert mk.kernel_applies(*args)
    assert mk.kernel_applies(kv.bfloat16(), q.bfloat16(), w.bfloat16(), cos, cos.half(), cache.bfloat16(), slots)
    with torch.no_grad():
        assert mk.kernel_applies(kv, q, w.clone().requires_grad_(True), cos, cos, cache, slots)
    replaced = {0: [kv.double(), kv[..., 1:], kv[:1], kv[0]], 1: [q[..., :6], q[:, :2], q[..., 0, :], q.double()],
                2: [torch.ones(R + 1), torch.ones(R, 1), w.double(), w.clone().requires_grad_(True)],
                3: [cos[:1], cos[..., :3], cos.double()], 4: [cos[:, :1]],
                5: [cache[:1], cache[..., 1:], cache[0], cache.double(), torch.zeros(B, 0, R + P)],
                6: [slots.int(), slots[:2], slots[None], slots.float()]}
    for i, bad_args in replaced.items():
        for bad in bad_args:
            changed = list(args)
            changed[i] = bad
            assert not mk.kernel_applies(*changed), (i, tuple(bad.shape), bad.dtype)
    odd = (torch.zeros(B, T, R + 3), torch.zeros(B, T, H, 3), w, cos[..., :1], cos[..., :1],
           torch.zeros(B, S, R + 3), slots)
    assert not mk.kernel_applies(*odd)  # an odd rope dim
    assert not mk.kernel_applies(kv.clone().requires_grad_(True), *args[1:])
    if torch.cuda.is_available():
        assert not mk.kernel_applies(kv.cuda(), *args[1:])  # the rest on another device


# --------------------------------------------------------------------------- where MLA takes it
class _Counted:
    """Replaces the kernel entry with a counting wrapper (``raise_on_call``: fail instead)."""

    def __init__(self, mk, monkeypatch, raise_on_call=False):
        self.calls = 0
        real = mk.mla_prep

        def wrapper(*args, **kw):
            if raise_on_call:
                raise AssertionError("the fused MLA cache step was called where the formula was expected")
            self.calls += 1
            return real(*args, **kw)

        monkeypatch.setattr(mk, "mla_prep", wrapper)


def _kernels_on_the_cpu_too(monkeypatch, fused=True):
    """The kernel (and the fused RMSNorm, the unfused path's norm) may run here: on CUDA, or interpreted on the CPU."""
    monkeypatch.setattr(MLA, "kernel_devices", ("cuda", "cpu"))
    monkeypatch.setattr(RMSNorm, "kernel_devices", ("cuda", "cpu"))
    monkeypatch.setattr(MLA, "fused_cache_write", fused)


def _prefill_and_decode_logits(model, ids, steps: int):
    """Logits of a cached prefill of ``ids`` then ``steps`` greedy decode steps, and the cache afterwards."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    out = [model(ids, cache=cache).logits]
    for _ in range(steps):
        out.append(model(out[-1][:, -1:].argmax(-1), cache=cache).logits)
    return out, cache


def test_off_by_default_and_never_on_the_cpu_by_default(mk, monkeypatch):
    _Counted(mk, monkeypatch, raise_on_call=True)
    assert MLA.fused_cache_write is True and MLA.kernel_devices == ("cuda",)  # on, but only on CUDA
    model = kernel_test_model("cpu", norm_weights=True)
    ids = torch.tensor([[5, 17, 3]])
    with torch.no_grad():
        _prefill_and_decode_logits(model, ids, 2)
        monkeypatch.setattr(MLA, "fused_cache_write", True)  # on, but the CPU is no kernel device
        _prefill_and_decode_logits(model, ids, 2)


def test_model_decode_logits_equal_with_the_switch_on_and_off(mk, rk, device, monkeypatch):
    """The tiny model (q_lora_rank on too: the query's own norm is untouched), a cached prefill of 5 tokens then 3
    decode steps, batch 2: every layer's cache step takes the kernel once a forward, and the logits and the whole
    cache equal the unfused path's bit for bit, with the fused RoPE off and on for the unfused path."""
    L = ModelConfig.preset("tiny").num_layers
    for kw, fused_rope in [({}, False), ({}, True), ({"q_lora_rank": 24}, False)]:
        model = kernel_test_model(device, norm_weights=True, **kw)
        ids = torch.tensor([[5, 17, 3, 99, 42], [7, 8, 1, 2, 3]], device=device)
        monkeypatch.setattr(RotaryEmbedding, "kernel_devices", ("cuda", "cpu"))
        monkeypatch.setattr(RotaryEmbedding, "fused_inference", fused_rope)
        runs = {}
        for fused in (False, True):
            _kernels_on_the_cpu_too(monkeypatch, fused)
            counted = _Counted(mk, monkeypatch)
            with torch.no_grad():
                runs[fused] = _prefill_and_decode_logits(model, ids, 3)
            assert counted.calls == (4 * L if fused else 0)
        (on, cache_on), (off, cache_off) = runs[True], runs[False]
        assert all(torch.equal(a, b) for a, b in zip(on, off)), kw
        assert all(torch.equal(a, b) for a, b in zip(cache_on.kv, cache_off.kv))


def test_generate_and_training_paths(mk, device, monkeypatch):
    """generate() with the switch on gives the unfused tokens and log-probs exactly; a training forward (grad on,
    no cache) and an uncached no-grad forward keep the formula (the wrapper would raise)."""
    from moeflow.models.generation import generate

    model = kernel_test_model(device, norm_weights=True)
    prompts = [[5, 17, 3, 99, 42], [7, 8]]
    runs = {}
    for fused in (False, True):
        _kernels_on_the_cpu_too(monkeypatch, fused)
        counted = _Counted(mk, monkeypatch)
        runs[fused] = generate(model, prompts, 4, return_logprobs=True)
        assert counted.calls == (4 * model.cfg.num_layers if fused else 0)  # prefill + 3 decode steps
    assert runs[True].tokens == runs[False].tokens and runs[True].logprobs == runs[False].logprobs
    _Counted(mk, monkeypatch, raise_on_call=True)
    ids = torch.tensor(prompts[:1], device=device)
    with torch.no_grad():
        model(ids)  # no cache: the expanded path
    model.train()
    model(ids, targets=ids).loss.backward()


def test_a_cache_step_with_autograd_keeps_the_formula(mk, device, monkeypatch):
    """A cache step that needs a gradient (parameters requiring grad, autograd on) takes the formula; the same step
    of a frozen model (nothing requires grad) takes the kernel."""
    _kernels_on_the_cpu_too(monkeypatch)
    model = kernel_test_model(device, norm_weights=True)
    counted = _Counted(mk, monkeypatch)
    ids = torch.tensor([[5, 17, 3]], device=device)
    model(ids, cache=model.new_cache(1, 4)).logits.sum().backward()
    assert counted.calls == 0
    model.requires_grad_(False)
    model(ids, cache=model.new_cache(1, 4))
    assert counted.calls == model.cfg.num_layers


def test_torch_compile_traces_the_formula(mk, device, monkeypatch):
    """Under torch.compile a cache step traces the formula (inductor fuses it), never the kernel, even where eager
    would take it: the FX graph holds the index_copy and the rsqrt, the kernel entry is not called."""
    from moeflow.models.attention import MLACache, prepare_attention

    _kernels_on_the_cpu_too(monkeypatch)
    _Counted(mk, monkeypatch, raise_on_call=True)
    cfg = ModelConfig.preset("tiny")
    attn = MLA(cfg, layer_idx=0).to(device).eval()
    B, T = 2, 3
    x = torch.randn(B, T, cfg.hidden_size, device=device)
    cos, sin = RotaryEmbedding(cfg).to(device)(torch.arange(T, device=device).expand(B, T))
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        cache = MLACache.for_config(cfg, B, 8, device=device)
        _, _, step = prepare_attention(torch.zeros(B, T, dtype=torch.long, device=device), None, None, cache, None)
        fn = torch.compile(attn, backend=keep_graph, fullgraph=True) if compiled else attn
        monkeypatch.setattr(MLA, "fused_cache_write", compiled)  # eager: the unfused path, the reference
        with torch.no_grad():
            results.append((fn(x, cos, sin, step=step), cache.kv[0].clone()))
    # close, not equal: eager's latent norm is the fused RMSNorm (kernel_devices), the traced one the formula
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    targets = " ".join(str(node.target) for gm in graphs for node in gm.graph.nodes)
    assert "index_copy" in targets and "rsqrt" in targets, targets


class _Launches:
    """Counts what one forward launches: every aten op that is no view (and every ``.to`` that copies, a cast),
    ``empty`` aside, plus one per call of the Triton kernels' entries (the ops those run inside, the interpreter's
    copies, are not counted): on CUDA each is one kernel launch."""

    def __init__(self, monkeypatch, *modules_entries):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.ops, self.triton, counter = {}, {}, self

        class Mode(TorchDispatchMode):
            paused = False

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                cast = func.is_view and torch.is_tensor(out) and torch.is_tensor(args[0]) and (
                    out.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr())
                if not Mode.paused and (cast or not func.is_view) and name not in ("empty", "empty_strided"):
                    counter.ops[name] = counter.ops.get(name, 0) + 1
                return out

        self.mode = Mode
        for module, entry in modules_entries:
            real = getattr(module, entry)

            def wrapper(*args, _real=real, _name=entry, **kw):
                counter.triton[_name] = counter.triton.get(_name, 0) + 1
                Mode.paused = True
                try:
                    return _real(*args, **kw)
                finally:
                    Mode.paused = False

            monkeypatch.setattr(module, entry, wrapper)

    def total(self) -> int:
        return sum(self.ops.values()) + sum(self.triton.values())


def test_a_decode_step_launches_one_kernel_for_the_unfused_21(mk, rk, device, monkeypatch):
    """One layer's decode step in bf16 (a bf16 cache; tiny's MLA shapes, bench_ref's ops), counted: with the fused
    RMSNorm and eager RoPE the latent write and the queries' RoPE are 21 launches (the norm; 2 × 9 RoPE kernels: two
    casts of cos/sin, four products, a difference, a sum, a cat; the cache row's cat; index_copy_), with the fused
    RoPE 5; with the switch on 1, the kernel: exactly those ops are gone (what attention runs after the write is
    whatever it is: only the differences are checked)."""
    from moeflow.models.attention import MLACache, prepare_attention

    _kernels_on_the_cpu_too(monkeypatch, fused=False)
    monkeypatch.setattr(RotaryEmbedding, "kernel_devices", ("cuda", "cpu"))
    rope = triton_kernels("rope", "_rope_kernel")
    cfg = ModelConfig.preset("tiny")
    attn = MLA(cfg, layer_idx=0).to(device=device, dtype=torch.bfloat16).eval()
    x = torch.randn(1, 1, cfg.hidden_size, device=device, dtype=torch.bfloat16)
    cos, sin = RotaryEmbedding(cfg).to(device)(torch.tensor([[300]], device=device))
    totals, ops = {}, {}
    for fused_rope, fused in [(False, False), (True, False), (False, True)]:
        monkeypatch.setattr(RotaryEmbedding, "fused_inference", fused_rope)
        monkeypatch.setattr(MLA, "fused_cache_write", fused)
        cache = MLACache.for_config(cfg, 1, 8, device=device, dtype=torch.bfloat16)
        with torch.inference_mode():
            _, _, step = prepare_attention(torch.zeros(1, 1, dtype=torch.long, device=device), None, None, cache,
                                           None)
            launches = _Launches(monkeypatch, (rk, "rms_norm"), (rope, "apply_rope"), (mk, "mla_prep"))
            with launches.mode():
                attn(x, cos, sin, step=step)
        totals[fused_rope, fused], ops[fused_rope, fused] = launches.total(), launches.ops
        assert launches.triton == ({"mla_prep": 1} if fused else {"rms_norm": 1, **({"apply_rope": 2} if fused_rope
                                                                                    else {})}), launches.triton
    gone = {name: n - ops[False, True].get(name, 0) for name, n in ops[False, False].items()}
    assert {name: n for name, n in gone.items() if n} == {"to": 4, "mul": 8, "sub": 2, "add": 2, "cat": 3,
                                                          "index_copy_": 1}, gone
    assert totals[False, False] - totals[False, True] == 21 - 1, totals
    assert totals[True, False] - totals[False, True] == 5 - 1, totals


def test_engine_equals_generate_with_the_kernel(mk, device, monkeypatch):
    """The serving engine's bucketed static step (the captured step's code, uncaptured: cache_position slots) with
    the kernel on, prompts joining mid-way: each request's greedy tokens equal generate()'s (which takes it too)."""
    from moeflow.models.serving import Engine

    _kernels_on_the_cpu_too(monkeypatch)
    counted = _Counted(mk, monkeypatch)
    model = kernel_test_model(device, norm_weights=True)
    prompts = kernel_test_prompts((3, 9, 1))
    engine = Engine(model, max_batch=2, prefill_chunk=8, decode_mode="static")
    got = engine_greedy_tokens(engine, prompts, 5)
    assert counted.calls > 0
    assert_generate_equals(model, prompts, got, 5)


# --------------------------------------------------------------------------- compiled for the GPU
_COMPILE_FOR_SM90 = r"""
import json, os, re, subprocess, tempfile
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from moeflow.models.kernels import mla_prep as mk, rmsnorm as rk

aligned = [["tt.divisibility", 16]]
cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
# what the launcher specialises: unit strides to the constant 1, 16-byte-aligned pointers and strides divisible by 16
UNIT = ("kv_sx", "q_sp", "cos_sp", "sin_sp", "slots_s", "cache_sx")


def reduce_layout(ttgir):
    # the layout (its #blocked definition) of the fp32 tensor the kernel's one tt.reduce sums
    alias = re.search(r'"tt\.reduce"\(%\w+\).*?\}\)\s*:\s*\(tensor<\d+xf32, (#\w+)>', ttgir, re.S).group(1)
    return re.search(rf"^{alias} = (.*)$", ttgir, re.M).group(1)


def compiled(src, warps, options):
    kernel = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, **options})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return kernel, {k: int(v) for k, v in re.findall(r"(REG|LOCAL):(\d+)", usage)}, sass


report = {}
# bench_ref (R 256, 16 heads, P 32) in bf16, with an fp32 cache, in fp32; DeepSeek-V3 (R 512, 128 heads, P 64); the
# tiny test model's (R 32, 4 heads, P 8: rows of 40, strides the launcher does not mark divisible by 16)
for name, R, H, P, ty, cache_ty in [("bench_ref", 256, 16, 32, "bf16", "bf16"), ("v3", 512, 128, 64, "bf16", "bf16"),
                                    ("fp32", 256, 16, 32, "fp32", "fp32"), ("fp32_cache", 256, 16, 32, "bf16", "fp32"),
                                    ("tiny", 32, 4, 8, "fp32", "fp32")]:
    row_aligned = (R + P) % 16 == 0
    block_r, block_p, block_h, warps = mk.launch_config(R, H, P)
    fn = mk._mla_prep_kernel
    types = {"kv_ptr": f"*{ty}", "w_ptr": f"*{ty}", "q_ptr": f"*{ty}", "q_out_ptr": f"*{ty}", "cos_ptr": "*fp32",
             "sin_ptr": "*fp32", "slots_ptr": "*i64", "cache_ptr": f"*{cache_ty}", "inv_r": "fp32", "eps": "fp32"}
    consts = {"R": R, "HALF": P // 2, "BLOCK_R": block_r, "BLOCK_P": block_p, "BLOCK_H": block_h,
              "ROUND_NORM_TO_X": ty != "fp32", **{u: 1 for u in UNIT}}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    aligned_args = [i for i, n in enumerate(fn.arg_names) if n.endswith("_ptr") or (row_aligned and n in (
        "kv_sb", "kv_st"))]
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs={(i,): aligned for i in aligned_args})
    kernel, usage, sass = compiled(src, warps, mk.COMPILE_OPTIONS)
    # the fused RMSNorm's kernel on the same latent (rows of R + P values, as MLA's unfused path passes it)
    block_d, norm_warps = rk.launch_config(R)
    rfn = rk._rms_norm_kernel
    rtypes = {"x_ptr": f"*{ty}", "delta_ptr": f"*{ty}", "w_ptr": f"*{ty}", "out_ptr": f"*{ty}", "sum_ptr": f"*{ty}",
              "inv_d": "fp32", "eps": "fp32", "x_stride": "i32", "delta_stride": "i32"}
    raligned = [i for i, n in enumerate(rfn.arg_names) if n.endswith("_ptr") or (row_aligned and n.endswith("_stride"))]
    rsrc = ASTSource(fn=rfn, signature={n: rtypes.get(n, "constexpr") for n in rfn.arg_names},
                     constexprs={"D": R, "BLOCK_D": block_d, "ADD": False}, attrs={(i,): aligned for i in raligned})
    norm_kernel, _, _ = compiled(rsrc, norm_warps, rk.COMPILE_OPTIONS)
    ptx = kernel.asm["ptx"]
    # ptxas writes plain products, sums and moves as FMAs with a zero addend or a unit multiplier: no contraction
    fmas = [line.split(";")[0] for line in sass.splitlines() if re.search(r"\b[HFD]FMA", line)]
    fused = [f for f in fmas if not (re.search(r"-?RZ\s*$", f) or ", 1, 1," in f or "-RZ, RZ," in f)]
    ops = re.findall(r"\b(?:mul|fma)\.rn\.(?:f32|f16x2|f16|bf16x2|bf16)\b", ptx)
    report[name] = {"row_aligned": row_aligned, "fma_ptx": sum(op.startswith("fma") for op in ops), "fused_sass": fused,
                    "mul_ptx": sum(op.startswith("mul") for op in ops), "rsqrt": ptx.count("rsqrt.approx"),
                    "v4_loads": ptx.count("ld.global.v4"), "warps": warps, "norm_warps": norm_warps,
                    "reduce_layout": reduce_layout(kernel.asm["ttgir"]),
                    "norm_reduce_layout": reduce_layout(norm_kernel.asm["ttgir"]), **usage}
print(json.dumps(report))
"""


def test_kernel_compiles_for_sm90_with_the_fused_norms_sum(mk):
    """The interpreter is lenient: compile the kernel for sm_90 (Triton's own ptxas, no GPU needed) at bench_ref's
    and DeepSeek-V3's shapes, bf16 (with a bf16 and an fp32 cache) and fp32. The latent's sum runs in the fused
    RMSNorm kernel's layout with its warps (so in its order: the GPU bits of the two agree), also at the tiny test
    model's unaligned rows, with the MUFU rsqrt; no FMA in the PTX nor the SASS (every product rounds before its sum,
    as eager's separate kernels); 16-byte loads of aligned latent rows; no spills."""
    report = sm90_compile_report(_COMPILE_FOR_SM90)
    assert set(report) == {"bench_ref", "v3", "fp32", "fp32_cache", "tiny"}, report
    for name, r in report.items():
        assert r["reduce_layout"] == r["norm_reduce_layout"] and r["warps"] == r["norm_warps"], (name, r)
        assert r["rsqrt"] >= 1 and r["fma_ptx"] == 0 and r["fused_sass"] == [] and r["mul_ptx"] >= 4, (name, r)
        assert (r["v4_loads"] >= 1 or not r["row_aligned"]) and r["LOCAL"] == 0 and r["REG"] <= 128, (name, r)


# --------------------------------------------------------------------------- on the GPU (the lead runs these)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_equals_the_unfused_path_never_syncs_and_captures(mk, rk):
    """bench_ref's cache step in bf16 on CUDA (1, 32 and 2,048 rows: decode at batch 1 and 32, a prefill chunk), a
    bf16 and an fp32 cache: cache and query bit-equal to the unfused path with the fused RMSNorm (the same sum
    layout, see the sm_90 test) and to eager CUDA's RoPE; with sync debug mode "error" nothing syncs; a CUDA graph's
    replay (new kv_a, query and slots copied in) gives the eager kernel call's result."""
    for (B, T), cache_dtype in [((1, 1), torch.bfloat16), ((32, 1), torch.bfloat16), ((1, 2048), torch.bfloat16),
                                ((32, 1), torch.float32)]:
        slots = [100] if T == 1 else list(range(T))
        step = Step(B, T, 16, 256, 32, torch.bfloat16, torch.bfloat16, cache_dtype, slots, "cuda", seed=B + T,
                    S=2100 if T > 1 else 128)
        with torch.inference_mode():
            step.fused(mk)  # JIT first
            buffer, cache = step._copy()
            torch.cuda.set_sync_debug_mode("error")
            try:
                got_q = mk.mla_prep(step.kv_a, step.q_rope, step.w, step.eps, step.cos, step.sin, cache, step.slots)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            want_buffer, want_q = step.unfused(rk.rms_norm)
            assert torch.equal(got_q, want_q) and torch.equal(buffer, want_buffer), (B, T, cache_dtype)
            static = [torch.zeros_like(step.kv_a), torch.zeros_like(step.q_rope), torch.zeros_like(step.slots)]
            graph_buffer, graph_cache = step._copy()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_q = mk.mla_prep(static[0], static[1], step.w, step.eps, step.cos, step.sin, graph_cache,
                                       static[2])
            for s, real in zip(static, (step.kv_a, step.q_rope, step.slots)):
                s.copy_(real)
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_q, got_q) and torch.equal(graph_buffer, buffer), (B, T, cache_dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_equals_generate_and_the_switch_off(mk, monkeypatch):
    """The serving engine's captured decode (bf16) with the kernel on, against generate() (which takes it too), token
    for token, and against the engine with it off (bit-equal steps give the same tokens); the kernel ran (counted at
    capture and in generate's eager steps)."""
    from moeflow.models.generation import generate
    from moeflow.models.serving import Engine

    model = kernel_test_model("cpu", norm_weights=True).to("cuda", torch.bfloat16)
    prompts = kernel_test_prompts((3, 17, 1, 30, 9, 24))
    runs = {}
    for fused in (False, True):
        monkeypatch.setattr(MLA, "fused_cache_write", fused)
        counted = _Counted(mk, monkeypatch)
        engine = Engine(model, max_batch=3, prefill_chunk=8, cache_len=65)
        assert engine.decode_mode == "graph"
        runs[fused] = engine_greedy_tokens(engine, prompts, 30)
        assert engine.static.num_graphs >= 2 and engine.static.num_replays > 30
        assert (counted.calls > 0) == fused
    assert runs[True] == runs[False]
    for i, p in enumerate(prompts):
        assert runs[True][i] == generate(model, [p], 30).tokens[0], f"request {i}"
