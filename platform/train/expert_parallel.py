"""Expert parallelism (EP), applied from outside the model: routed experts sharded over an EP group.

``apply_expert_parallel(model, mesh)`` swaps every ``DeepSeekMoE.experts`` (``RoutedExperts``, all E
experts) for an ``ExpertParallelExperts`` that holds E/ep of them. The router, shared experts and
everything else stay replicated; only the routed-expert compute is distributed. The module keeps
the HF names and the (E, ...) global shapes: its two weights are DTensors ``Shard(0)`` on the
``"ep"`` mesh dimension, so ``torch.distributed.checkpoint.state_dict`` (full state dicts, what
``models.train.state`` writes) and DCP gather/reshard them with no key map, and a checkpoint of
an EP run loads into a one-process model (``plain_state_dict`` / ``load_plain_state_dict``).

One forward of an MoE layer on one rank (T local tokens, K slots each):

1. slots sorted by expert id (stable argsort, as ``RoutedExperts``): the rows bound for EP rank
   p (experts [p·El, (p+1)·El)) are contiguous;
2. the per-expert counts go to their owners by one ``all_to_all_single`` of E int64 counts, and
   the per-rank split sizes are copied to the host ONCE per layer per forward: ``all_to_all_single``
   takes its variable split sizes as Python lists, so this one sync is unavoidable with the public
   API (torchtitan does the same); there is no per-expert sync;
3. dispatch: the rows by ``all_to_all_single`` with those splits (``_AllToAll``, whose backward is
   the reverse exchange); the received rows (source-major) are regrouped expert-major on the device;
4. the local experts' SwiGLU (``torch._grouped_mm`` on CUDA in bf16, a per-expert loop elsewhere);
5. combine: un-group, the reverse ``all_to_all_single``, un-permute, gate-weighted sum over K on
   the token's own rank (so the router's gradient never crosses ranks).

Data parallelism composes on a 2-D mesh ``(dp, ep)``: every rank of the world reads its own data,
so the replicated parameters are averaged over the whole world (DDP or FSDP2 over the flattened
mesh), while an expert's gradient already sums the tokens of its EP group (the all-to-all backward
brings them): it is summed over the ``dp`` dimension and divided by the world size, which gives
exactly the single-process gradient of the global batch. The router counts for the bias update
and MaxVio need nothing here: the loop all-reduces them over the whole world.

Shape suffixes: T tokens, K experts per token, N = T·K slots, D hidden, E experts, El = E/ep local
experts, P EP ranks, R rows received by this rank, F expert width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from moeflow.models import balancing
from moeflow.models.moe import DeepSeekMoE, RoutedExperts, _GatherTokenSlots, _PermuteRows


def build_mesh(device_type: str, dp: int, ep: int) -> DeviceMesh:
    """The 2-D ``(dp, ep)`` mesh over the whole world (ep ranks adjacent: one host's fast links)."""
    world = dist.get_world_size()
    if dp * ep != world:
        raise ValueError(f"mesh dp={dp} x ep={ep} = {dp * ep} does not match the world size {world}")
    return init_device_mesh(device_type, (dp, ep), mesh_dim_names=("dp", "ep"))


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; backward is the reverse exchange of the gradient."""

    @staticmethod
    def forward(ctx, x_ND, out_splits: list[int], in_splits: list[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x_ND.new_empty((sum(out_splits),) + tuple(x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.in_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def _inverse(perm_N: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(perm_N).scatter_(0, perm_N, torch.arange(perm_N.numel(), device=perm_N.device))


class ExpertParallelExperts(nn.Module):
    """This rank's El = E/ep routed experts; same call as ``RoutedExperts`` (see the module docstring)."""

    def __init__(self, experts: RoutedExperts, ep_mesh: DeviceMesh) -> None:
        super().__init__()
        E, P = experts.num_experts, ep_mesh.size()
        if E % P:
            raise ValueError(f"expert parallelism: {P} EP ranks do not divide {E} routed experts")
        self.num_experts, self.width, self.ep_size = E, experts.width, P
        self.num_local = E // P
        self.ep_rank = ep_mesh.get_local_rank()
        self.group = ep_mesh.get_group()
        self.use_grouped_mm = experts.use_grouped_mm
        lo, hi = self.ep_rank * self.num_local, (self.ep_rank + 1) * self.num_local
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name).detach()
            local = DTensor.from_local(full[lo:hi].clone(), ep_mesh, [Shard(0)], run_check=False)
            setattr(self, name, nn.Parameter(local, requires_grad=getattr(experts, name).requires_grad))

    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        T, K = idx_TK.shape
        P, El = self.ep_size, self.num_local
        flat_N = idx_TK.reshape(-1)
        order_N = torch.argsort(flat_N, stable=True)
        inv_order_N = _inverse(order_N)
        send_E = balancing.tokens_per_expert(idx_TK, self.num_experts).long()
        recv_PEl = torch.empty_like(send_E)
        dist.all_to_all_single(recv_PEl, send_E, group=self.group)  # El counts to each owner
        recv_PEl = recv_PEl.view(P, El)
        # the one host sync of the layer: all_to_all_single wants its split sizes as lists
        send_P, recv_P = torch.stack([send_E.view(P, El).sum(1), recv_PEl.sum(1)]).tolist()
        x_sorted_ND = _GatherTokenSlots.apply(x_TD, order_N, inv_order_N, K)
        x_recv_RD = _AllToAll.apply(x_sorted_ND, recv_P, send_P, self.group)
        # received rows are source-major; group them by local expert (stable: source order kept)
        local_ids = torch.arange(El, device=x_TD.device).repeat(P)
        expert_R = torch.repeat_interleave(local_ids, recv_PEl.reshape(-1), output_size=x_recv_RD.shape[0])
        group_R = torch.argsort(expert_R, stable=True)
        inv_group_R = _inverse(group_R)
        x_local_RD = _PermuteRows.apply(x_recv_RD, group_R, inv_group_R)
        y_local_RD = self._experts(x_local_RD, recv_PEl.sum(0))
        y_recv_RD = _PermuteRows.apply(y_local_RD, inv_group_R, group_R)
        y_sorted_ND = _AllToAll.apply(y_recv_RD, send_P, recv_P, self.group)
        y_ND = _PermuteRows.apply(y_sorted_ND, inv_order_N, order_N)
        return (y_ND.view(T, K, -1) * weight_TK.to(y_ND.dtype)[:, :, None]).sum(dim=1)

    def _local(self, name: str) -> torch.Tensor:
        w = getattr(self, name)
        return w.to_local() if isinstance(w, DTensor) else w

    def _experts(self, x_RD: torch.Tensor, counts_El: torch.Tensor) -> torch.Tensor:
        # The same SwiGLU maths as RoutedExperts._grouped/_looped, on the local shard (they read the
        # module's full (E, ...) weights, which this module does not have).
        gate_up, down = self._local("gate_up_proj"), self._local("down_proj")
        dtype = RoutedExperts.compute_dtype(x_RD)
        grouped = self.use_grouped_mm if self.use_grouped_mm is not None else (x_RD.is_cuda and dtype == torch.bfloat16)
        if grouped:
            offs = torch.cumsum(counts_El, 0, dtype=torch.int32)
            h = torch._grouped_mm(x_RD.to(dtype), gate_up.to(dtype).transpose(-2, -1), offs=offs)
            return torch._grouped_mm(self._swiglu(h), down.to(dtype).transpose(-2, -1), offs=offs)
        outs = [x_RD[:0].new_zeros(0, down.shape[1])]  # keeps the row dim when nothing arrived
        for e, rows_XD in enumerate(torch.split(x_RD, counts_El.tolist())):
            outs.append(self._swiglu(rows_XD @ gate_up[e].t()) @ down[e].t())
        return torch.cat(outs, dim=0)

    def _swiglu(self, h_X2F: torch.Tensor) -> torch.Tensor:
        gate, up = h_X2F.split(self.width, dim=-1)
        return F.silu(gate) * up


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> list[ExpertParallelExperts]:
    """Shard the routed experts of every MoE layer (MTP blocks included) over ``ep_mesh``, in place.

    Every rank must hold the same full model first (same seed); each keeps its El experts.
    """
    swapped = []
    for module in model.modules():
        if isinstance(module, DeepSeekMoE) and isinstance(module.experts, RoutedExperts):
            module.experts = ExpertParallelExperts(module.experts, ep_mesh)
            swapped.append(module.experts)
    if not swapped:
        raise ValueError("expert parallelism needs MoE layers; this model has none")
    return swapped


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The EP-sharded parameters by name (they are synchronised over ``dp`` only)."""
    return {f"{name}.{p_name}": p for name, mod in model.named_modules() if isinstance(mod, ExpertParallelExperts)
            for p_name, p in mod.named_parameters(recurse=False)}


# ------------------------------------------------------------------ data parallelism around EP
def parallelize(model: nn.Module, mesh: DeviceMesh, parallelism: str, dtype: str, device: torch.device,
                find_unused_parameters: bool = False) -> nn.Module:
    """EP on ``mesh["ep"]`` and DDP or FSDP2 over the world; returns the module to call forward on."""
    apply_expert_parallel(model, mesh["ep"])
    world = mesh.size()
    if parallelism == "fsdp":
        return _fully_shard(model, mesh, dtype, device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    experts = expert_parameters(model)
    DDP._set_params_and_buffers_to_ignore_for_model(model, list(experts))
    ids = [device.index] if device.type == "cuda" else None
    ddp = DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    dp_group = mesh["dp"].get_group() if mesh["dp"].size() > 1 else None

    def sync_expert_grad(p: torch.Tensor) -> None:
        if not ddp.require_backward_grad_sync:  # inside no_sync: accumulate, reduce on the last micro-batch
            return
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        if dp_group is not None:
            dist.all_reduce(local, group=dp_group)
        local.div_(world)

    for p in experts.values():
        p.register_post_accumulate_grad_hook(sync_expert_grad)
    return ddp


def _fully_shard(model: nn.Module, mesh: DeviceMesh, dtype: str, device: torch.device) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    world_mesh = mesh["dp", "ep"]._flatten("dp_ep")
    blocks = list(model.model.layers) + [m.block for m in model.mtp]
    for block in blocks:
        if block.is_moe:
            _shard_experts(block.mlp.experts, mesh["dp"], mesh.size(), mp)
    for layer in model.model.layers:
        fully_shard(layer, mesh=world_mesh, mp_policy=mp)
    for module in model.mtp:
        fully_shard(module, mesh=world_mesh, mp_policy=mp)
    fully_shard(model, mesh=world_mesh, mp_policy=mp)
    return model


def _shard_experts(experts: nn.Module, dp_mesh: DeviceMesh, world: int, mp) -> None:
    """FSDP2 over ``dp`` for one layer's experts: the gradient summed over dp, divided by the world size."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(experts, mesh=dp_mesh, mp_policy=mp)
    experts.set_gradient_divide_factor(float(world))
    # The factor is NCCL's PREMUL_SUM, which gloo lacks: SUM, then scale. Not at dp 1, where nothing is
    # reduced: torch 2.13's one-rank path divides by the factor as it copies, and forced SUM divides again
    # (at dp 1 x ep 2 the expert gradients came out halved).
    if dp_mesh.device_type == "cpu" and dp_mesh.size() > 1:
        experts.set_force_sum_reduction_for_comms(True)


# ------------------------------------------------------------------ the plain (one-process) layout
def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of an EP (and/or FSDP2) model in the one-process layout, CPU tensors.

    Collective: every rank calls it; rank 0 gets the tensors (expert shards gathered into (E, ...)),
    the others an empty dict (``cpu_offload`` keeps one copy, as ``models.train.state.capture`` does).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_plain_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a one-process state dict (any EP size wrote it) into an EP model: each rank keeps its experts.

    Collective; ``state`` is read on rank 0 only (the others may pass ``{}``) and broadcast.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # a shallow copy: set_model_state_dict replaces the dict's entries with this rank's shards
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
