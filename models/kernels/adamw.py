"""AdamW as one Triton kernel launch over all parameters: ``TritonAdamW``, a drop-in ``torch.optim.AdamW``.

Measured (H100, 2026-12-07, benchmarks/RESULTS.md): NOT faster where it was meant to pay. The bench_ref training
step replayed as a CUDA graph ran 218,743 tok/s with it against 223,385 with torch's fused AdamW (same call), so
``PretrainConfig.adamw_impl`` stays ``torch`` by default and this is an opt-in kept for its clip folding (the real
loop's gradient clipping, not in that benchmark; unmeasured). On the GPU ``exact=True`` was not bit-equal to
torch's fused kernel (1 of 4,096 elements differed at step 3: an FMA contraction the two compilers make
differently); both modes stay within rounding of it (GPU tests).

Why: on an H100 the ``bench_ref`` step spends 5.05 ms in torch's fused AdamW (issue 16): 819 M bf16 parameters
with bf16 gradients and states are 11.5 GB of traffic (read p, g, m, v; write p, m, v: 7 × 2 bytes an element),
moved at ~2.3 TB/s in ~40 ``multi_tensor_apply`` launches, where a streaming kernel reaches ~3 TB/s (3.8 ms).

How (the choice): ONE launch per (parameter dtype, state dtype) covers every tensor. Triton kernels cannot take
torch's ``TensorListMetadata`` struct of addresses, so the addresses live in device tables instead:

* ``rows`` (int64, one row of ``ROW`` fields per tensor): addresses of the parameter, ``exp_avg``, ``exp_avg_sq``
  and ``step``, its element count, its first block and its parameter group. Static between plan rebuilds (a
  parameter set, a state or a hyperparameter that changes); uploaded eagerly, never during a graph capture.
* ``grad_addrs`` (int64): the gradients' addresses. Autograd allocates fresh gradients every step (the loop
  zeroes with ``set_to_none``) and a captured graph has its own, so they are written on the device every step by
  ``_pack_addresses_kernel`` (16 tensors a launch, the addresses are its pointer arguments): capture-safe (a
  kernel's arguments are recorded by value) and no host-to-device copy, so no host synchronisation.
* ``block_tensor`` (int32, one entry per ``block_size`` elements of every tensor): which tensor a program works
  on; the program's offset is ``(pid - first_block) * block_size``. A flat grid of equal blocks keeps every SM
  streaming; a tensor's last block is masked, the others take the unmasked branch, where the 16-byte alignment
  hints (``tl.multiple_of``; checked on the host) let Triton issue 16-byte vector loads.
* ``hyper`` (float64, one row per group): lr, beta1, beta2, weight_decay, eps. The lr column is written on the
  device every step (``copy_`` of a device-tensor lr, the graphed loop's; ``fill_`` of a float), so a replayed
  graph reads the current lr; ``step`` counters are one float32 vector (the state's ``step`` entries are views
  of it) incremented by one ``add_`` before the kernel, as torch's capturable/fused AdamW increments before its.

Per step: 2 small lr writes, ceil(N / 16) pack launches, one ``add_`` and one AdamW launch per dtype pair;
no host synchronisation, so the whole step can be captured in a CUDA graph (models/kernels/graph_step.py).

Maths (torch's CUDA fused AdamW, aten/src/ATen/native/cuda/fused_adam_utils.cuh, ``adam_math``, ADAMW mode):
loads widened to fp32, then ``p -= lr·wd·p``; ``m = β1·m + (1-β1)·g``; ``v = β2·v + (1-β2)·g·g``;
``step_size = lr / bc1``; ``denom = sqrt(v) / sqrt(bc2) + eps``; ``p -= step_size·m / denom``, with
``bc1 = 1 - β1^step`` and ``sqrt(bc2) = sqrt(1 - β2^step)`` rounded to fp32. torch passes lr, betas, wd and eps
as C++ ``double``, so the decay, both moments and ``+ eps`` are evaluated in double there and rounded to fp32
once. ``exact=True`` does the same (fp64 for those sub-expressions, fp32 IEEE sqrt/div for the rest): the
results equal torch's bit for bit in the interpreter, up to the rare double-rounding of a fused multiply-add
(on the H100, 1 element of 4,096 at step 3 differed). ``exact=False`` (the
default) evaluates everything in fp32 (on an H100 fp64 arithmetic runs at half the fp32 rate and conversions
to and from fp64 at 16 a clock per SM, which the exact mode needs ~9 of per element):
within 1 fp32 ulp of torch in the states, which in bf16 storage is the same value except for rare 1-ulp
flips. Both modes round to the storage dtype to nearest-even. Which is faster is for the GPU to say
(benchmarks/bench_adamw.py times both). One difference from torch's kernel remains in both: Triton links
libdevice with flush-to-zero, so the IEEE sqrt and divisions (``sqrt.rn.ftz``/``div.rn.ftz``) flush subnormal
fp32 operands (|x| < 1.2e-38, e.g. v from gradients below ~1e-19) to zero: a subnormal v moves the
denominator by under 1e-9 relative (it is eps-dominated), a subnormal m's update (at most lr·1.2e-38 / eps)
becomes 0.

Registers (ptxas for sm_90, tests/test_adamw_triton.py): ~170 a thread at the default 2048-element blocks of 4
warps (16 elements a thread), ~85 at 1024; either way ~48 KB of loads in flight per SM. Each program first
loads its table entries (two dependent loads), issues its block's loads, and computes the bias corrections
(two fp64 pows) while they are in flight.

Optional ``grad_scale`` (a device fp32 scalar, e.g. the gradient-clipping coefficient): gradients are multiplied
by it inside the kernel (torch's fused kernel divides by its AMP scale; this is the clip use), so a separate
clipping pass over the gradients can be skipped. The gradients themselves are not written.

Off CUDA, ``TritonAdamW`` is torch's AdamW (``super().step()``), unless ``TRITON_INTERPRET=1`` is set before
triton is imported: then the kernels run in Triton's interpreter on the CPU (the tests do). The interpreter
truncates float-to-bf16 casts and has no libdevice, so under it the bf16 rounding is done on the bits and
``β^step`` is ``exp(step·log β)`` (the ``INTERPRET`` constexpr).

Checkpoints: ``state_dict`` has torch.optim.AdamW's keys (``step``, ``exp_avg``, ``exp_avg_sq``; the param groups
carry AdamW's options), so a checkpoint loads into either optimiser. torch's ``load_state_dict`` takes the saved
groups whole, implementation flags (``fused``, ``foreach``, ``capturable``) included: a torch.optim.AdamW loading
a TritonAdamW checkpoint gets ``fused=None`` (any AdamW checkpoint does that to it); ``TritonAdamW`` keeps its own.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # optional accelerator: TritonAdamW then is torch's AdamW everywhere
    triton = tl = libdevice = None

HAS_TRITON = triton is not None
ROW = 8  # int64 fields of a tensor's row: p, exp_avg, exp_avg_sq, step addresses, numel, first block, group, unused
HYPER = 5  # float64 fields of a group's row: lr, beta1, beta2, weight_decay, eps
PACK = 16  # gradient addresses written per _pack_addresses_kernel launch (its pointer arguments)
BLOCK_SIZE = 2048  # elements per program (16 per thread at 4 warps: two 16-byte bf16 vectors per tensor)
NUM_WARPS = 4
IMPL_FLAGS = ("foreach", "fused", "capturable", "differentiable")  # param-group keys that pick an implementation
ALIGN = 16  # bytes: the tables' addresses are hinted multiples of this (vector loads); checked on the host


def interpreting() -> bool:
    """Triton's CPU interpreter is on (it must be set before triton is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAS_TRITON:

    @triton.jit
    def _pow(base, exponent, INTERPRET: tl.constexpr):
        """base ** exponent in fp64: CUDA's pow (torch's std::pow) on the GPU; exp·log in the interpreter."""
        if INTERPRET:
            return tl.exp(exponent * tl.log(base))
        else:
            return libdevice.pow(base, exponent)

    @triton.jit
    def _to_storage(x, TY: tl.constexpr, INTERPRET: tl.constexpr):
        """fp32 ``x`` rounded to nearest-even in ``TY``. The interpreter truncates a bf16 cast, so there the
        rounding is done on the bits (finite values; the result is then exact in bf16)."""
        if INTERPRET and TY == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            return u.to(tl.float32, bitcast=True).to(TY)
        else:
            return x.to(TY)

    @triton.jit
    def _pack_addresses_kernel(dst_ptr, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15):
        """dst[i] = address of tensor ai (PACK = 16 a launch; the caller pads with repeats)."""
        tl.store(dst_ptr + 0, a0.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 1, a1.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 2, a2.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 3, a3.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 4, a4.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 5, a5.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 6, a6.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 7, a7.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 8, a8.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 9, a9.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 10, a10.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 11, a11.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 12, a12.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 13, a13.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 14, a14.to(tl.int64, bitcast=True))
        tl.store(dst_ptr + 15, a15.to(tl.int64, bitcast=True))

    @triton.jit
    def _adamw_math(p, g, m, v, lr_wd, beta1, beta2, eps, step_size, bc2_sqrt, EXACT: tl.constexpr):
        """One AdamW update of fp32 blocks (see the module docstring). Scalars: lr_wd, beta1, beta2, eps fp64;
        step_size, bc2_sqrt fp32."""
        if EXACT:  # where torch's kernel computes in double (its lr, betas, wd, eps are doubles)
            p64 = p.to(tl.float64)
            g64 = g.to(tl.float64)
            p = (p64 - lr_wd * p64).to(tl.float32)
            m = (beta1 * m.to(tl.float64) + (1.0 - beta1) * g64).to(tl.float32)
            v = (beta2 * v.to(tl.float64) + (1.0 - beta2) * g64 * g64).to(tl.float32)
            denom = (tl.div_rn(tl.sqrt_rn(v), bc2_sqrt).to(tl.float64) + eps).to(tl.float32)
        else:
            b1 = beta1.to(tl.float32)
            b2 = beta2.to(tl.float32)
            p = p - lr_wd.to(tl.float32) * p
            m = b1 * m + (1.0 - beta1).to(tl.float32) * g
            v = b2 * v + (1.0 - beta2).to(tl.float32) * g * g
            denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps.to(tl.float32)
        p = p - tl.div_rn(step_size * m, denom)
        return p, m, v

    @triton.jit
    def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, step_ptr, hyper, scale_ptr, P_TY: tl.constexpr,
                     S_TY: tl.constexpr, HAS_SCALE: tl.constexpr, EXACT: tl.constexpr, INTERPRET: tl.constexpr):
        # the block's loads first: the scalar maths below (two fp64 pows) runs while they are in flight
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        lr = tl.load(hyper + 0)
        beta1 = tl.load(hyper + 1)
        beta2 = tl.load(hyper + 2)
        lr_wd = lr * tl.load(hyper + 3)
        eps = tl.load(hyper + 4)
        # bias corrections as torch computes them: in double, then rounded to fp32 (its opmath_t)
        step = tl.load(step_ptr).to(tl.float64)
        bc1 = (1.0 - _pow(beta1, step, INTERPRET)).to(tl.float32)
        bc2_sqrt = tl.sqrt(1.0 - _pow(beta2, step, INTERPRET)).to(tl.float32)
        step_size = (lr / bc1.to(tl.float64)).to(tl.float32)
        if HAS_SCALE:
            g = g * tl.load(scale_ptr).to(tl.float32)
        p, m, v = _adamw_math(p, g, m, v, lr_wd, beta1, beta2, eps, step_size, bc2_sqrt, EXACT)
        tl.store(p_ptr + offs, _to_storage(p, P_TY, INTERPRET), mask=mask)
        tl.store(m_ptr + offs, _to_storage(m, S_TY, INTERPRET), mask=mask)
        tl.store(v_ptr + offs, _to_storage(v, S_TY, INTERPRET), mask=mask)

    @triton.jit
    def _adamw_kernel(block_tensor_ptr, rows_ptr, grad_addrs_ptr, hyper_ptr, scale_ptr,
                      P_TY: tl.constexpr, S_TY: tl.constexpr, BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr,
                      EXACT: tl.constexpr, INTERPRET: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(block_tensor_ptr + pid).to(tl.int64)
        row = rows_ptr + t * 8  # ROW
        p_ptr = tl.multiple_of(tl.load(row + 0).to(tl.pointer_type(P_TY)), 16)
        m_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(S_TY)), 16)
        v_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(S_TY)), 16)
        step_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        numel = tl.load(row + 4)
        block = pid - tl.load(row + 5)  # this program's block within its tensor
        hyper = hyper_ptr + tl.load(row + 6) * 5  # HYPER
        g_ptr = tl.multiple_of(tl.load(grad_addrs_ptr + t).to(tl.pointer_type(P_TY)), 16)
        offs = block * BLOCK + tl.arange(0, BLOCK)
        if (block + 1) * BLOCK <= numel:  # a full block: unmasked, so the loads vectorise
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, None, step_ptr, hyper, scale_ptr,
                         P_TY, S_TY, HAS_SCALE, EXACT, INTERPRET)
        else:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < numel, step_ptr, hyper, scale_ptr,
                         P_TY, S_TY, HAS_SCALE, EXACT, INTERPRET)


def _triton_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters, their gradients and states), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


@dataclass
class _Launch:
    """One kernel launch: the tensors of one (parameter dtype, state dtype) pair."""

    key: tuple[torch.dtype, torch.dtype]
    indices: list[int]          # into _Plan.params (tensors with elements)
    rows: torch.Tensor          # (n, ROW) int64
    grad_addrs: torch.Tensor    # (ceil(n / PACK) * PACK,) int64, written every step
    block_tensor: torch.Tensor  # (num_blocks,) int32
    num_blocks: int


@dataclass
class _Plan:
    """Device tables of one parameter set (see the module docstring); rebuilt when it changes."""

    params: list[torch.Tensor]          # parameters with a gradient, in group order
    signature: tuple                    # ids of params and their states, group hyperparameters
    group_of: list[int]                 # param_groups index of each
    steps: torch.Tensor                 # (N,) float32: state["step"] are views of it
    hyper: torch.Tensor                 # (G, HYPER) float64
    launches: list[_Launch] = field(default_factory=list)


class TritonAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose CUDA step is ``_adamw_kernel`` (one launch over all tensors, capturable).

    Same constructor as torch's (``amsgrad``/``maximize``/``differentiable`` are not supported), plus
    ``exact`` (torch's double-precision sub-expressions, see the module docstring), ``state_dtype``
    (``exp_avg``/``exp_avg_sq`` dtype; default the parameter's, as torch), ``block_size`` and ``num_warps``.
    ``step(grad_scale=...)`` multiplies the gradients by a device scalar inside the kernel. Whatever the
    ``capturable`` flag, the CUDA step never synchronises the host (the flag is kept for ``GraphedStep``'s check).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, capturable: bool = False, exact: bool = False, state_dtype: torch.dtype | None = None,
                 block_size: int = BLOCK_SIZE, num_warps: int = NUM_WARPS, **torch_kwargs) -> None:
        for name in ("amsgrad", "maximize", "differentiable"):
            if torch_kwargs.get(name):
                raise ValueError(f"TritonAdamW: {name}=True is not supported")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"TritonAdamW: block_size must be a power of two >= 16, got {block_size}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, capturable=capturable,
                         **torch_kwargs)
        self.exact, self.state_dtype = exact, state_dtype
        self.block_size, self.num_warps = block_size, num_warps
        self._plan: _Plan | None = None

    # ------------------------------------------------------------------ torch.optim.Optimizer interface
    def load_state_dict(self, state_dict) -> None:
        """torch's, except that the groups keep this optimiser's implementation flags: torch's load takes the
        whole saved group, flags included (a torch.optim.AdamW loading any checkpoint does that too)."""
        flags = [{k: g[k] for k in IMPL_FLAGS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, kept in zip(self.param_groups, flags):
            group.update(kept)
        self._plan = None  # new state tensors: the tables must point at them

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        self._plan = None

    def state_dict(self):
        """torch's, with each ``step`` a tensor of its own (here they are views of one vector)."""
        sd = super().state_dict()
        sd["state"] = {k: {**v, "step": v["step"].clone()} if torch.is_tensor(v.get("step")) else dict(v)
                       for k, v in sd["state"].items()}
        return sd

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None):
        if not self._runs_triton():
            if grad_scale is not None:
                torch._foreach_mul_([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None],
                                    grad_scale)
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._triton_step(grad_scale)
        return loss

    # ------------------------------------------------------------------ the Triton step
    def _runs_triton(self) -> bool:
        if not HAS_TRITON:
            return False
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is None:
            return False
        # the interpreter reads the tables' raw addresses as host memory: CPU tensors only
        return _local(first).is_cuda != interpreting()

    def _params_with_grads(self) -> tuple[list[torch.Tensor], list[int]]:
        params, group_of = [], []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("TritonAdamW does not support sparse gradients")
                    params.append(p)
                    group_of.append(gi)
        return params, group_of

    def _signature(self, params: list[torch.Tensor]) -> tuple:
        states = tuple((id(p), id(self.state[p].get("exp_avg")), id(self.state[p].get("exp_avg_sq"))) for p in params)
        hyper = tuple((tuple(g["betas"]), g["weight_decay"], g["eps"]) for g in self.param_groups)
        return states, hyper

    def _triton_step(self, grad_scale: torch.Tensor | None) -> None:
        params, group_of = self._params_with_grads()
        if not params:
            return
        capturing = params[0].is_cuda and torch.cuda.is_current_stream_capturing()
        plan = self._plan
        if plan is None or plan.signature != self._signature(params) or plan.group_of != group_of:
            if capturing:
                raise RuntimeError("TritonAdamW: the parameters, their states or the group hyperparameters changed "
                                   "during a CUDA graph capture; run one eager step first")
            plan = self._plan = self._build_plan(params, group_of)
        for gi, group in enumerate(self.param_groups):  # on the device: a replayed graph reads the current lr
            lr = group["lr"]
            if torch.is_tensor(lr):
                plan.hyper[gi, 0].copy_(lr.reshape(()))
            else:
                plan.hyper[gi, 0].fill_(float(lr))
        plan.steps.add_(1)
        scale = None
        if grad_scale is not None:
            scale = grad_scale.reshape(()).to(device=plan.steps.device, dtype=torch.float32)
        keep = []  # contiguous copies of odd gradients, alive until their kernels are enqueued
        for launch in plan.launches:
            grads = []
            for i in launch.indices:
                g = _local(plan.params[i].grad)
                if g.dtype != plan.params[i].dtype:
                    raise RuntimeError(f"TritonAdamW: gradient dtype {g.dtype} differs from the parameter's "
                                       f"{plan.params[i].dtype}")
                if not g.is_contiguous() or (g.is_cuda and g.data_ptr() % ALIGN):
                    g = g.clone(memory_format=torch.contiguous_format)
                    keep.append(g)
                grads.append(g)
            self._write_grad_addresses(launch, grads)
            _adamw_kernel[(launch.num_blocks,)](
                launch.block_tensor, launch.rows, launch.grad_addrs, plan.hyper,
                scale if scale is not None else plan.hyper,
                P_TY=_triton_dtype(launch.key[0]), S_TY=_triton_dtype(launch.key[1]), BLOCK=self.block_size,
                HAS_SCALE=scale is not None, EXACT=bool(self.exact), INTERPRET=interpreting(),
                num_warps=self.num_warps)

    @staticmethod
    def _write_grad_addresses(launch: _Launch, grads: list[torch.Tensor]) -> None:
        padded = grads + [grads[-1]] * (-len(grads) % PACK)
        for start in range(0, len(padded), PACK):
            _pack_addresses_kernel[(1,)](launch.grad_addrs[start:], *padded[start:start + PACK], num_warps=1)

    # ------------------------------------------------------------------ plan (device tables)
    def _init_state(self, p: torch.Tensor, device: torch.device) -> None:
        state = self.state[p]
        dtype = self.state_dtype or p.dtype
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        for key in ("exp_avg", "exp_avg_sq"):  # e.g. a checkpoint's states, cast to the parameter's dtype on load
            if state[key].dtype != dtype:
                state[key] = state[key].to(dtype)

    def _build_plan(self, params: list[torch.Tensor], group_of: list[int]) -> _Plan:
        device = _local(params[0]).device
        for p in params:
            self._init_state(p, device)
        steps = torch.stack([torch.as_tensor(self.state[p]["step"]).to(device=device, dtype=torch.float32).reshape(())
                             for p in params])
        for i, p in enumerate(params):
            self.state[p]["step"] = steps[i]
        rows = [[0.0, g["betas"][0], g["betas"][1], g["weight_decay"], g["eps"]] for g in self.param_groups]
        hyper = torch.tensor(rows, dtype=torch.float64, device=device)  # lr (column 0) is written every step
        plan = _Plan(params=params, signature=self._signature(params), group_of=group_of, steps=steps, hyper=hyper)
        by_key: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            if _local(p).numel():
                by_key.setdefault((p.dtype, self.state[p]["exp_avg"].dtype), []).append(i)
        for key, indices in by_key.items():
            plan.launches.append(self._build_launch(plan, key, indices))
        return plan

    def _build_launch(self, plan: _Plan, key: tuple, indices: list[int]) -> _Launch:
        device, block = plan.steps.device, self.block_size
        rows, counts, first = [], [], 0
        for i in indices:
            p, state = plan.params[i], self.state[plan.params[i]]
            tensors = [_local(p), _local(state["exp_avg"]), _local(state["exp_avg_sq"])]
            for t in tensors:
                if not t.is_contiguous() or (t.is_cuda and t.data_ptr() % ALIGN):
                    raise ValueError(f"TritonAdamW needs contiguous, {ALIGN}-byte aligned parameters and states; "
                                     f"got shape {tuple(t.shape)}, strides {t.stride()}, address {t.data_ptr()}")
            numel = tensors[0].numel()
            step_addr = plan.steps.data_ptr() + 4 * i
            rows.append([t.data_ptr() for t in tensors] + [step_addr, numel, first, plan.group_of[i], 0])
            counts.append(math.ceil(numel / block))
            first += counts[-1]
        block_tensor = torch.repeat_interleave(torch.arange(len(indices), dtype=torch.int32),
                                               torch.tensor(counts, dtype=torch.int64))
        return _Launch(key=key, indices=indices, rows=torch.tensor(rows, dtype=torch.int64, device=device),
                       grad_addrs=torch.zeros(len(indices) + (-len(indices) % PACK), dtype=torch.int64, device=device),
                       block_tensor=block_tensor.to(device), num_blocks=first)
