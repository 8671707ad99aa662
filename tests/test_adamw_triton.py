"""TritonAdamW (models/kernels/adamw.py) against torch's AdamW: its CUDA fused kernel's formula (emulated here in
torch, double where torch's kernel computes in double), torch.optim.AdamW itself (fused and single-tensor on
the CPU, fused on CUDA, also under CUDA graph capture), checkpoints in both directions, and a training run.

The kernels run on CUDA where there is one, else in Triton's interpreter on the CPU (this module sets
TRITON_INTERPRET=1 at collection on a machine without a GPU, as tests/test_moe_decode_kernel.py does).
Everything skips when triton is not importable. ``@pytest.mark.gpu`` tests need CUDA.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import sm90_compile_report, triton_kernels

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPES = [(3000,), (17, 33), (2, 5, 7), (0,), (4096,), (1,)]  # 1-D/2-D/3-D, not multiples of a block, empty
BETAS, EPS = (0.9, 0.95), 1e-8


@pytest.fixture(scope="module")
def kadamw():
    """models.kernels.adamw with runnable kernels: compiled on CUDA, interpreted on the CPU (else skip)."""
    return triton_kernels("adamw", "_adamw_kernel")


@pytest.fixture(scope="module")
def device(kadamw):
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------ references
def fused_reference_step(p, g, m, v, step: int, lr: float, wd: float, beta1=BETAS[0], beta2=BETAS[1], eps=EPS):
    """One step of torch's CUDA fused AdamW (fused_adam_utils.cuh ``adam_math``, ADAMW mode), in place, with
    its precisions: lr, betas, wd, eps are C++ doubles, so ``lr·wd·p``, both moments and ``+ eps`` are double;
    the bias corrections are double rounded to fp32; the rest is IEEE fp32; stores round to the storage
    dtype (``copy_``: to nearest even)."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731  (a double rounded to fp32)
    bc1, bc2_sqrt = f32(1 - beta1 ** step), f32(math.sqrt(1 - beta2 ** step))
    step_size = f32(lr / bc1)
    p64, g64 = p.double(), g.double()
    p32 = (p64 - (lr * wd) * p64).float()
    m32 = (beta1 * m.double() + (1 - beta1) * g64).float()
    v32 = (beta2 * v.double() + (1 - beta2) * g64 * g64).float()
    # the fp32 operations (IEEE-rounded on the GPU) done in double and rounded: exact for +, *, / and sqrt
    # (Figueroa), where torch's CPU kernels are not (its vectorised fp32 sqrt was 1 ulp off here)
    sqrt_v = v32.double().sqrt().float()
    denom = ((sqrt_v.double() / bc2_sqrt).float().double() + eps).float()
    update = ((m32.double() * step_size).float().double() / denom.double()).float()
    p32 = (p32.double() - update.double()).float()
    p.copy_(p32), m.copy_(m32), v.copy_(v32)


def _params(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES]


def _groups(params, lrs=(1e-2, 3e-3), wds=(0.1, 0.0)):
    """Two groups with different lr and weight decay (the decay / no_decay split of models/train/optim.py)."""
    return [{"params": params[:3], "lr": lrs[0], "weight_decay": wds[0]},
            {"params": params[3:], "lr": lrs[1], "weight_decay": wds[1]}]


def _set_grads(param_lists, step: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(100 + step)
    for ps in zip(*param_lists):
        grad = torch.randn(ps[0].shape, generator=g) * scale
        for p in ps:
            p.grad = grad.to(device=p.device, dtype=p.dtype, copy=True)


def assert_same(a: torch.Tensor, b: torch.Tensor, msg="") -> None:
    """Bit for bit, except that -0.0 == 0.0."""
    assert a.dtype == b.dtype and bool((a == b).all()), f"{msg}: {int((a != b).sum())} of {a.numel()} differ"


def assert_within_rounding(a: torch.Tensor, b: torch.Tensor, msg="") -> None:
    """What fp32 arithmetic instead of torch's double sub-expressions may change: fp32 values by about an ulp
    of the operands' scale (the moments cancel: ulps of the result alone would be unbounded); bf16 values
    rarely, by one bf16 ulp."""
    if not a.numel():
        return
    scale = float(b.abs().max())
    if a.dtype == torch.bfloat16:
        assert float((a != b).float().mean()) < 0.05, msg
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=2 ** -8 * scale, msg=msg)
    else:
        torch.testing.assert_close(a, b, rtol=2 ** -22, atol=2 ** -22 * scale, msg=msg)


# ------------------------------------------------------------------ the formula, bit for bit
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                               (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32-states"])
@pytest.mark.parametrize("exact", [True, False])
def test_steps_match_torch_fused_formula(kadamw, device, dtype, state_dtype, exact):
    """bf16-fp32-states: fp32 moments for bf16 weights (a launch of its own dtype pair; torch's fused kernel has no
    such mode, the formula is the same)."""
    params = _params(dtype, device)
    opt = kadamw.TritonAdamW(_groups(params), betas=BETAS, eps=EPS, exact=exact, block_size=1024,
                             state_dtype=state_dtype)
    ref = [p.detach().cpu().clone() for p in params]
    m = [torch.zeros_like(r, dtype=state_dtype or dtype) for r in ref]
    v = [torch.zeros_like(r, dtype=state_dtype or dtype) for r in ref]
    for step in range(1, 5):
        _set_grads([params], step)
        opt.step()
        for i, p in enumerate(params):
            lr, wd = (1e-2, 0.1) if i < 3 else (3e-3, 0.0)
            fused_reference_step(ref[i], p.grad.cpu(), m[i], v[i], step, lr, wd)
            st = opt.state[p]
            assert float(st["step"]) == step
            for name, got, want in (("p", p.detach().cpu(), ref[i]), ("m", st["exp_avg"].cpu(), m[i]),
                                    ("v", st["exp_avg_sq"].cpu(), v[i])):
                # exact: torch's kernel bit for bit; fp32 arithmetic: within rounding per step
                (assert_same if exact else assert_within_rounding)(got, want, f"step {step} {name}{tuple(p.shape)}")
            # next step from our state: the bound is per step, not compounded
            ref[i].copy_(p.detach().cpu()), m[i].copy_(st["exp_avg"].cpu()), v[i].copy_(st["exp_avg_sq"].cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_adamw_fused_and_single_tensor_on_cpu(kadamw, dtype):
    if torch.cuda.is_available():
        pytest.skip("the CPU references; the CUDA one is test_gpu_matches_torch_fused")
    ours_p, fused_p, single_p = _params(dtype, "cpu"), _params(dtype, "cpu"), _params(dtype, "cpu")
    ours = kadamw.TritonAdamW(_groups(ours_p), betas=BETAS, eps=EPS, exact=True, block_size=1024)
    fused = torch.optim.AdamW(_groups(fused_p), betas=BETAS, eps=EPS, fused=True)
    single = torch.optim.AdamW(_groups(single_p), betas=BETAS, eps=EPS, foreach=False)
    for step in range(1, 5):
        _set_grads([ours_p, fused_p, single_p], step)
        ours.step(), fused.step(), single.step()
    for a, f, s in zip(ours_p, fused_p, single_p):
        if dtype == torch.bfloat16:
            # (not the single-tensor path: it rounds to bf16 after every op, so e.g. p·(1 - lr·wd) is often p)
            assert_within_rounding(a.detach(), f.detach())
        else:  # torch's CPU kernels round differently from its CUDA one (e.g. a vectorised sqrt)
            torch.testing.assert_close(a.detach(), f.detach(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(a.detach(), s.detach(), rtol=1e-6, atol=1e-6)


def test_grad_scale_multiplies_the_gradients(kadamw, device):
    a, b = _params(torch.float32, device), _params(torch.float32, device)
    opt_a = kadamw.TritonAdamW(_groups(a), betas=BETAS, exact=True, block_size=1024)
    opt_b = kadamw.TritonAdamW(_groups(b), betas=BETAS, exact=True, block_size=1024)
    for step in range(1, 3):
        _set_grads([a, b], step)
        for p in b:
            p.grad.mul_(0.25)
        opt_a.step(grad_scale=torch.tensor(0.25, device=device))
        opt_b.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_device_tensor_lr_changes_take_effect_and_params_without_grads_are_skipped(kadamw, device):
    params = _params(torch.float32, device)
    opt = kadamw.TritonAdamW(_groups(params), betas=BETAS, block_size=1024)
    for group in opt.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
    _set_grads([params], 1)
    opt.step()
    before = [p.detach().clone() for p in params]
    for group in opt.param_groups:
        group["lr"].fill_(0.0)  # in place, as set_lr does for the graphed loop
    _set_grads([params], 2)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # lr 0: no decay, no update
    assert float(opt.state[params[0]]["step"]) == 2
    opt.param_groups[0]["lr"].fill_(1e-2)
    params[1].grad = None
    _set_grads([params[:1]], 3)
    for p in params[2:]:
        p.grad = None
    opt.step()
    assert not torch.equal(params[0], before[0]) and torch.equal(params[1], before[1])
    assert float(opt.state[params[0]]["step"]) == 3 and float(opt.state[params[1]]["step"]) == 2


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trips_with_torch_adamw(kadamw, device, dtype):
    ours_p, torch_p = _params(dtype, device), _params(dtype, device)
    ours = kadamw.TritonAdamW(_groups(ours_p), betas=BETAS, exact=True, block_size=1024)
    for step in range(1, 3):
        _set_grads([ours_p], step)
        ours.step()
    sd = ours.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][0]["step"].untyped_storage().nbytes() == 4  # a tensor of its own, as torch's
    with torch.no_grad():
        for a, b in zip(torch_p, ours_p):
            a.copy_(b)
    fused = device == "cuda" or dtype == torch.bfloat16  # the reference that rounds as ours does
    theirs = torch.optim.AdamW(_groups(torch_p), betas=BETAS, fused=fused)
    theirs.load_state_dict(copy.deepcopy(sd))  # as through a file: no tensor shared with ours
    assert theirs.param_groups[1]["lr"] == 3e-3 and theirs.param_groups[0]["weight_decay"] == 0.1
    for group in theirs.param_groups:  # torch's load takes the saved group's flags too (ours: fused None)
        group["fused"] = fused
    for step in range(3, 5):  # both continue from the same state
        _set_grads([ours_p, torch_p], step)
        ours.step(), theirs.step()
    for a, b in zip(ours_p, torch_p):
        assert_within_rounding(a.detach(), b.detach())
    # and back: torch's state into a fresh TritonAdamW, which keeps stepping from it
    back_p = [p.detach().clone().requires_grad_() for p in torch_p]
    back = kadamw.TritonAdamW(_groups(back_p), betas=BETAS, exact=True, block_size=1024)
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert back.param_groups[0]["fused"] is None  # ours keeps its own flags
    _set_grads([back_p, torch_p], 5)
    back.step(), theirs.step()
    assert float(back.state[back_p[0]]["step"]) == 5
    for a, b in zip(back_p, torch_p):
        assert_within_rounding(a.detach(), b.detach())


def test_cpu_without_interpreter_is_torch_adamw(monkeypatch, kadamw):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels are not called: torch's own step runs
    a, b = _params(torch.float32, "cpu"), _params(torch.float32, "cpu")
    ours = kadamw.TritonAdamW(_groups(a), betas=BETAS)
    theirs = torch.optim.AdamW(_groups(b), betas=BETAS)
    if torch.cuda.is_available():
        assert not ours._runs_triton()
    for step in range(1, 3):
        _set_grads([a, b], step)
        ours.step(), theirs.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------ the training loop
@pytest.mark.parametrize("grad_clip", [1.0, 0.05, 0.0])
def test_training_run_with_triton_adamw_matches_torch(kadamw, grad_clip):
    """The loop with adamw_impl=triton (clipping folded into the kernel's grad_scale) against torch's AdamW."""
    from moeflow.models import MoETransformer
    from moeflow.models.kernels.adamw import TritonAdamW
    from moeflow.models.train.loop import Trainer
    from moeflow.platform.train.config import PretrainConfig
    from moeflow.platform.train.loader import PackedLoader
    from train_fakes import ArrayTokens, pattern_docs, tiny_model_overrides

    def run(impl):
        cfg = PretrainConfig(model_overrides=tiny_model_overrides(), seq_len=32, micro_batch_size=4, max_steps=8,
                             lr=1e-2, warmup_steps=2, log_every=1, val_every=0, seed=0, adamw_impl=impl,
                             grad_clip=grad_clip)
        ds = ArrayTokens(pattern_docs(200, seed=0), vocab_size=64)
        torch.manual_seed(0)
        model = MoETransformer(cfg.build_model_config())
        loader = PackedLoader(ds, seq_len=cfg.seq_len, batch_size=cfg.micro_batch_size, seed=0)
        trainer = Trainer(cfg, model, iter(loader), device="cpu", bos_id=ds.meta["bos_id"])
        step, scales = trainer.optimizer.step, []
        trainer.optimizer.step = lambda closure=None, **kw: (scales.append(kw.get("grad_scale")), step(**kw))[1]
        trainer.fit(until_step=3)
        return trainer, scales

    if torch.cuda.is_available():
        pytest.skip("CPU run (the interpreter); test_gpu_matches_torch_fused covers CUDA")
    (ref, _), (tri, scales) = run("torch"), run("triton")
    assert isinstance(tri.optimizer, TritonAdamW) and tri.optimizer._plan is not None  # the kernels ran
    assert all((s is not None) == (grad_clip > 0) for s in scales) and len(scales) == 3
    if grad_clip == 0.05:
        assert all(float(s) < 1 for s in scales)  # really clipping
    assert [h["loss"] for h in tri.history] == pytest.approx([h["loss"] for h in ref.history], rel=1e-5)
    for (name, a), b in zip(tri.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_config_field(kadamw):
    from moeflow.platform.train.config import PretrainConfig

    assert PretrainConfig().adamw_impl == "torch" and "adamw_impl" not in PretrainConfig().to_dict()
    assert PretrainConfig(adamw_impl="triton").to_dict()["adamw_impl"] == "triton"
    with pytest.raises(ValueError, match="adamw_impl"):
        PretrainConfig(adamw_impl="apex")


# ------------------------------------------------------------------ GPU: torch's fused kernel, CUDA graphs
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [True, False])
def test_gpu_matches_torch_fused(kadamw, dtype, exact):
    ours_p, torch_p = _params(dtype, "cuda"), _params(dtype, "cuda")
    ours = kadamw.TritonAdamW(_groups(ours_p), betas=BETAS, exact=exact)
    theirs = torch.optim.AdamW(_groups(torch_p), betas=BETAS, fused=True)
    for step in range(1, 6):
        _set_grads([ours_p, torch_p], step)
        ours.step(), theirs.step()
        for a, b in zip(ours_p, torch_p):
            # on the H100 exact mode was not bit-equal (1 of 4,096 elements differed at step 3: an FMA contraction
            # made differently), so both modes are held to rounding here; the interpreter tests hold exact mode
            # to the formula bit for bit
            assert_within_rounding(a.detach(), b.detach(), f"step {step} {tuple(a.shape)}")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_gpu_step_under_cuda_graph_capture_matches_torch_fused(kadamw, tensor_lr):
    """Warm up eagerly, capture one step (gradients at new addresses, as in GraphedStep), replay it."""
    ours_p, torch_p = _params(torch.bfloat16, "cuda"), _params(torch.bfloat16, "cuda")
    ours = kadamw.TritonAdamW(_groups(ours_p), betas=BETAS, exact=True, capturable=True)
    theirs = torch.optim.AdamW(_groups(torch_p), betas=BETAS, fused=True)
    if tensor_lr:
        for group in ours.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device="cuda")
    _set_grads([ours_p, torch_p], 1)
    ours.step(), theirs.step()
    static = [torch.empty_like(p) for p in ours_p]  # the graph's gradients live here
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        for p, s in zip(ours_p, static):
            p.grad = s
        with torch.cuda.graph(graph):
            ours.step()
    torch.cuda.current_stream().wait_stream(side)
    for step in range(2, 5):
        _set_grads([torch_p], step)
        for p, s in zip(torch_p, static):
            s.copy_(p.grad)
        if tensor_lr and step == 4:
            for go, gt in zip(ours.param_groups, theirs.param_groups):
                go["lr"].fill_(gt["lr"] * 0.5)
                gt["lr"] *= 0.5
        graph.replay()
        theirs.step()
        for a, b in zip(ours_p, torch_p):
            assert_within_rounding(a.detach(), b.detach(), f"step {step} {tuple(a.shape)}")  # see above


# ------------------------------------------------------------------ compiled for the H100, without one
_COMPILE_FOR_SM90 = r"""
import json, os, re, subprocess, tempfile
import triton.backends.nvidia
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from moeflow.models.kernels import adamw as ka

aligned = [["tt.divisibility", 16]]  # what the launcher specialises 16-byte-aligned pointers to
cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
report = {}
variants = (("bf16", tl.bfloat16, tl.bfloat16, False), ("bf16_exact", tl.bfloat16, tl.bfloat16, True),
            ("fp32", tl.float32, tl.float32, False))
for name, p_ty, s_ty, exact in variants:
    fn = ka._adamw_kernel
    pointers = ["*i32", "*i64", "*i64", "*fp64", "*fp32"]
    signature = {n: (pointers[i] if i < len(pointers) else "constexpr") for i, n in enumerate(fn.arg_names)}
    consts = dict(P_TY=p_ty, S_TY=s_ty, BLOCK=ka.BLOCK_SIZE, HAS_SCALE=True, EXACT=exact, INTERPRET=False)
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs={(i,): aligned for i in range(5)})
    kernel = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": ka.NUM_WARPS})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    ptx = kernel.asm["ptx"]
    report[name] = {"v4_loads": ptx.count("ld.global.v4"), "v4_stores": ptx.count("st.global.v4"),
                    "div_rn": ptx.count("div.rn."), "sqrt_rn": ptx.count("sqrt.rn."),
                    "approx": len(re.findall(r"(div|sqrt)\.(approx|full)", ptx)),
                    **{k: int(v) for k, v in re.findall(r"(REG|LOCAL):(\d+)", usage)}}
names = ka._pack_addresses_kernel.arg_names
pack_signature = {n: "*i64" if i == 0 else "*bf16" for i, n in enumerate(names)}
pack = compile(ASTSource(fn=ka._pack_addresses_kernel, signature=pack_signature, constexprs={},
                         attrs={(i,): aligned for i in range(len(names))}),
               target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
report["pack_stores"] = pack.asm["ptx"].count("st.global")
print(json.dumps(report))
"""


def test_kernels_compile_for_sm90_with_vector_loads_and_ieee_division(kadamw):
    """The interpreter is lenient: compile for real (Triton's own ptxas, no GPU needed). The full-block path
    must load and store 16 bytes at a time (the alignment hints on the table's addresses work: 2 vectors a
    thread per bf16 tensor at 16 elements a thread), the sqrt and divisions must be the IEEE ones (torch's
    kernel's; an approximate division would break the bit-for-bit match), and nothing may spill."""
    report = sm90_compile_report(_COMPILE_FOR_SM90)
    assert report["pack_stores"] == 16, report
    for name in ("bf16", "bf16_exact", "fp32"):
        r = report[name]
        per_tensor = 2 if name != "fp32" else 4  # 16 elements a thread: 32 bytes (bf16) or 64 bytes (fp32)
        assert r["v4_loads"] >= 4 * per_tensor and r["v4_stores"] >= 3 * per_tensor, (name, r)
        assert r["div_rn"] > 0 and r["sqrt_rn"] > 0 and r["approx"] == 0, (name, r)
        assert r["LOCAL"] == 0 and r["REG"] <= 255, (name, r)


@pytest.mark.gpu
@cuda
def test_gpu_graphed_training_loop_with_triton_adamw(kadamw, monkeypatch):
    """bench_ref's configuration in small: bf16 weights, the whole step one CUDA graph (cuda_graph=True), clipping
    folded into the kernel. Against torch's fused AdamW in the same graphed loop (they differ in the last bits:
    clip multiply rounding, fp32 arithmetic, which AdamW's normalised update amplifies; bounds as in
    test_train_speed_options) and against its own uncaptured body (the capture replays what it captured)."""
    from moeflow.models.train import loop as loop_mod
    from test_train_speed_options import _distance, _initial_params, _params as weights, _run

    steps = 7
    kw = dict(steps=steps, device="cuda", param_dtype="bf16", model_kw={}, compile=False)
    ref, ref_hist = _run(**kw, cuda_graph=True)
    tri, tri_hist = _run(**kw, cuda_graph=True, adamw_impl="triton")
    assert isinstance(tri.optimizer, kadamw.TritonAdamW) and tri._graphed.captured
    monkeypatch.setattr(loop_mod, "GRAPH_WARMUP_STEPS", steps + 1)  # the graphed body, never captured
    body, _ = _run(**kw, cuda_graph=True, adamw_impl="triton")
    body2, _ = _run(**kw, cuda_graph=True, adamw_impl="triton")
    moved = _distance(weights(ref), _initial_params(**kw))
    spread = _distance(weights(body2), weights(body))
    graph = _distance(weights(tri), weights(body))
    vs_torch = _distance(weights(tri), weights(ref))
    print(f"\nmoved {moved:.4g}; triton graph vs its body {graph:.4g} (run to run {spread:.4g}); "
          f"vs torch {vs_torch:.4g}")
    assert [h["loss"] for h in tri_hist] == pytest.approx([h["loss"] for h in ref_hist], rel=1e-3)
    assert graph <= max(1e-3 * moved, 3 * spread), (graph, spread, moved)
    assert vs_torch <= 0.05 * moved, (vs_torch, moved)
