"""A whole training step (forward, backward, optimiser, router-bias update) replayed as one CUDA graph.

Why: the profile of the compiled ``bench_ref`` step on the H200 (benchmarks/RESULTS.md) shows the
GPU busy 48.7 ms of a 60.4 ms step: the rest is the host launching ~1,500 kernels (8 compiled
blocks forward and backward, the eager glue between them, AdamW, the bias update) one by one. A
captured graph launches them all with one call, so the step costs what its kernels cost.

How: ``GraphedStep(body, optimizers)`` calls ``body(*inputs)`` eagerly for its first
``warmup_steps`` calls (compilation, autotuning, cuDNN plans and allocator state settle; each is a
real optimiser step on its own batch, gradients zeroed after it), then captures the next call once
into a ``torch.cuda.CUDAGraph`` over static input buffers and replays it from then on: each call
copies its inputs into the static buffers, replays, and returns the static outputs (overwritten by
the next call; clone what you keep). Every call is exactly one optimiser step on its inputs.

Rules for ``body``: static shapes; no host synchronisation (no ``.item()``, ``.tolist()``, data-
dependent shapes); it must not zero the gradients (the graph was captured with ``.grad`` unset, so
its backward writes the gradients fresh on every replay); optimisers need ``capturable=True``.
``make_capture_safe(model)`` switches an MoETransformer's embedding backward from the sort-based
kernel (host sync beyond 3,072 indices, pytorch#82886) to a sync-free fp32 ``index_add_``.
Off CUDA, ``GraphedStep`` simply calls ``body`` every time (the reference path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class _SyncFreeEmbedding(torch.autograd.Function):
    """weight[ids] whose backward accumulates in fp32 with index_add_ (no sort, no host sync)."""

    @staticmethod
    def forward(ctx, ids_BT: torch.Tensor, weight_VD: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids_BT)
        ctx.weight_shape, ctx.weight_dtype = weight_VD.shape, weight_VD.dtype
        return weight_VD.index_select(0, ids_BT.reshape(-1)).view(*ids_BT.shape, weight_VD.shape[1])

    @staticmethod
    def backward(ctx, grad_BTD: torch.Tensor):
        (ids_BT,) = ctx.saved_tensors
        grad_VD = torch.zeros(ctx.weight_shape, dtype=torch.float32, device=grad_BTD.device)
        grad_VD.index_add_(0, ids_BT.reshape(-1), grad_BTD.reshape(-1, grad_BTD.shape[-1]).float())
        return None, grad_VD.to(ctx.weight_dtype)


def sync_free_embedding(ids_BT: torch.Tensor, weight_VD: torch.Tensor) -> torch.Tensor:
    return _SyncFreeEmbedding.apply(ids_BT, weight_VD)


def make_capture_safe(model) -> None:
    """Route an MoETransformer's embedding lookups through ``sync_free_embedding``."""
    model.capture_safe_embedding = True


def static_copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with ``x``'s strides. ``clone()`` makes a sliced input (the loop's ``batch[:, 1:]``)
    contiguous: compiled code guarded on the warm-up calls' strides would then recompile inside the
    capture, which CUDA forbids (measured: the loop's first capture failed in the compiled loss)."""
    out = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
    return out.copy_(x)


class GraphedStep:
    """See the module docstring. ``outputs`` of the last call are also kept as ``self.outputs``."""

    def __init__(self, body: Callable[..., object], optimizers: Sequence[torch.optim.Optimizer] = (),
                 warmup_steps: int = 3) -> None:
        if warmup_steps < 1:
            raise ValueError("GraphedStep: warmup_steps must be >= 1 (the first call compiles and warms up)")
        self.body, self.optimizers, self.warmup_steps = body, list(optimizers), warmup_steps
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.outputs = None
        self._side = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _zero_grads(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def __call__(self, *inputs: torch.Tensor):
        self.calls += 1
        on_cuda = all(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
        if not on_cuda or self.calls <= self.warmup_steps:
            if on_cuda:  # warm up on a side stream, as torch.cuda.graph's documentation asks
                self._side = self._side or torch.cuda.Stream()
                self._side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._side):
                    self.outputs = self.body(*inputs)
                    self._zero_grads()
                torch.cuda.current_stream().wait_stream(self._side)
            else:
                self.outputs = self.body(*inputs)
                self._zero_grads()
            return self.outputs
        if self.graph is None:
            for opt in self.optimizers:
                if not all(group.get("capturable", False) for group in opt.param_groups):
                    raise ValueError(f"GraphedStep: optimiser {type(opt).__name__} needs capturable=True on CUDA")
            self.static_inputs = tuple(static_copy(x) for x in inputs)
            self._zero_grads()  # the captured backward then writes (not accumulates) the gradients
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self.body(*self.static_inputs)
        else:
            for static, x in zip(self.static_inputs, inputs):
                if x is not static:
                    static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.outputs
