"""Pipeline parallelism (PP), applied from outside the model with ``torch.distributed.pipelining``.

``PipelineRunner(model, cfg, mesh)`` cuts a built ``MoETransformer`` into stages of consecutive
decoder blocks (``split_layers``) and runs one optimiser step per ``train_step(batch)`` with a
1F1B schedule (``Schedule1F1B``: one stage per rank) or the interleaved one
(``ScheduleInterleaved1F1B``: two stages per rank, r and r + pp). The micro-batches of a step are
the pipeline's micro-batches (``grad_accum_steps`` in ``PretrainConfig``).

Each stage is a ``StageModel``: a ``MoETransformer`` with the blocks of other stages removed, so
parameter names stay the one-process names (``model.layers.3.…``) and a stage's state dict is a
subset of the full one. The first stage embeds; the last holds the final norm, the LM head and
the MTP blocks, whose loss (with the LM loss) is the schedule's ``loss_fn`` on that stage. MTP
embeds the shifted tokens, so the last stage keeps a copy of the embedding; after each backward
the two copies' gradients are summed (one all-reduce between the first and the last stage, as
Megatron does for tied embeddings), so they stay identical.

The objective is the loop's (``models.train.loop``, "Token weighting"): micro-batch m adds
``lm_m · n_m / N`` (N the valid targets of the whole global batch) and each MTP depth likewise,
plus its balancing losses ÷ M. A stage's balancing losses never travel: ``_AttachLoss`` returns
the hidden state unchanged and, in backward, seeds the loss with its weight (DeepSeek-MoE's
``AddAuxiliaryLoss``). Gradients are scaled by us (``scale_grads=False``).

Data parallelism composes over the ``dp`` mesh dimension: after the schedule every gradient is
averaged over ``dp`` (one all-reduce per tensor, not overlapped with backward: simple and exact,
not yet fast). The gradient norm is summed over stages (the last stage's embedding copy left
out), router counts are all-reduced over ``dp`` and each stage updates its own routers' biases.

Not yet: document masking (stages see plain causal rows), activation checkpointing, EP inside
a stage, and the pretraining worker (which refuses pipeline_parallel > 1).

Shape suffixes: B rows, T tokens, D hidden, L router layers of a stage, E experts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moeflow.models import MoETransformer
from moeflow.models.mtp import IGNORE_INDEX, mtp_targets
from moeflow.models.train.optim import build_adamw, set_lr


def build_mesh(device_type: str, dp: int, pp: int) -> DeviceMesh:
    """The 2-D ``(dp, pp)`` mesh over the whole world (stages of one replica on adjacent ranks)."""
    if dp * pp != dist.get_world_size():
        raise ValueError(f"mesh dp={dp} x pp={pp} = {dp * pp} does not match the world size {dist.get_world_size()}")
    return init_device_mesh(device_type, (dp, pp), mesh_dim_names=("dp", "pp"))


def split_layers(num_layers: int, num_stages: int) -> list[list[int]]:
    """Consecutive decoder-block ids per stage, as even as possible (earlier stages take the remainder)."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"{num_stages} pipeline stages need 1..{num_layers} layers each at least one")
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


class _AttachLoss(torch.autograd.Function):
    """Identity on x; backward also seeds ``loss`` with ``weight`` (a stage-local loss joins the objective)."""

    @staticmethod
    def forward(ctx, x, loss, weight: float):
        ctx.weight = weight
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        shape, dtype, device = ctx.loss_meta
        return grad_x, torch.full(shape, ctx.weight, dtype=dtype, device=device), None


class StageModel(MoETransformer):
    """The blocks ``layer_ids`` of a ``MoETransformer`` (plus the embedding on the first stage and the
    norm, LM head and MTP on the last); ``forward`` maps ids (first) or hidden states to hidden states."""

    def __init__(self, full: MoETransformer, layer_ids: list[int], is_first: bool, is_last: bool,
                 balance_weight: float) -> None:
        super().__init__(full.cfg)
        self.layer_ids, self.is_first, self.is_last = list(layer_ids), is_first, is_last
        self.balance_weight = balance_weight
        for i in range(len(self.model.layers)):
            if i not in self.layer_ids:
                self.model.layers[i] = nn.Identity()
        if not is_first and not (is_last and len(self.mtp)):
            self.model.embed_tokens = None
        if not is_last:
            self.model.norm, self.lm_head, self.mtp = None, None, nn.ModuleList()
        own = self.state_dict()
        missing = self.load_state_dict({k: v for k, v in full.state_dict().items() if k in own}, strict=True)
        assert not missing.missing_keys
        self.counts_LE: torch.Tensor | None = None  # router counts of this step, summed over micro-batches

    def routers(self):
        if "layer_ids" not in self.__dict__:  # MoETransformer.__init__ (init_weights) runs before the pruning
            return super().routers()
        blocks = [self.model.layers[i] for i in self.layer_ids] + [m.block for m in self.mtp]
        return [b.mlp.gate for b in blocks if b.is_moe]

    def _count(self, counts_E: torch.Tensor, row: int) -> None:
        if self.counts_LE is None:
            self.counts_LE = torch.zeros(len(self.routers()), self.cfg.num_routed_experts, dtype=torch.float64,
                                         device=counts_E.device)
        self.counts_LE[row] += counts_E.detach().double()

    def rope(self, x_BTD: torch.Tensor):
        B, T = x_BTD.shape[:2]
        return self.rotary(torch.arange(T, device=x_BTD.device).expand(B, T))

    def forward(self, x):  # (B, T) ids on the first stage, else (B, T, D)
        x_BTD = self._embed(x) if self.is_first else x
        cos, sin = self.rope(x_BTD)
        row = 0
        for i in self.layer_ids:
            x_BTD, stats = self.model.layers[i](x_BTD, cos, sin, None, None, None, True)
            if stats is not None:
                self._count(stats.tokens_per_expert_E, row)
                row += 1
                x_BTD = _AttachLoss.apply(x_BTD, stats.seq_aux_loss + stats.z_loss + stats.lb_loss,
                                          self.balance_weight)
        return x_BTD


class _LastStageLoss:
    """The schedule's ``loss_fn`` on the last stage: LM head, LM loss, MTP losses, token-weighted."""

    def __init__(self, stage: StageModel, dp: int, num_micro: int) -> None:
        self.stage, self.dp, self.num_micro = stage, dp, num_micro
        self.global_counts: torch.Tensor | None = None
        self.parts: dict[str, torch.Tensor] = {}

    def __call__(self, h_BTD: torch.Tensor, packed_B2T: torch.Tensor) -> torch.Tensor:
        m, cfg = self.stage, self.stage.cfg
        inputs_BT, targets_BT = packed_B2T[:, 0], packed_B2T[:, 1]
        share = target_counts(targets_BT, len(m.mtp)) / self.global_counts.clamp_min(1) * self.dp
        lm = m._loss_fn(m.lm_head(m.model.norm(h_BTD)), targets_BT)
        loss = lm * share[0].to(lm.dtype)
        self.parts["lm_loss"] = self.parts.get("lm_loss", 0) + lm.detach() * share[0] / self.dp
        if len(m.mtp):
            cos, sin = m.rope(h_BTD)
            stats: list = []
            losses = m._mtp_losses(h_BTD, inputs_BT, targets_BT, cos, sin, None, stats)
            mtp = sum(l_ * share[1 + j].to(l_.dtype) for j, l_ in enumerate(losses)) / len(losses)
            loss = loss + cfg.mtp_loss_weight * mtp
            self.parts["mtp_loss"] = self.parts.get("mtp_loss", 0) + mtp.detach() / self.dp
            first_mtp_row = len(m.routers()) - len(stats)
            for j, s in enumerate(stats):
                m._count(s.tokens_per_expert_E, first_mtp_row + j)
                loss = loss + (s.seq_aux_loss + s.z_loss + s.lb_loss) / self.num_micro
        return loss


def target_counts(targets_BT: torch.Tensor, mtp_depth: int) -> torch.Tensor:
    """Valid targets of the LM loss and of each MTP depth, (1 + depth,) float64 (as the loop counts them)."""
    counts = [(targets_BT != IGNORE_INDEX).sum()]
    counts += [(mtp_targets(targets_BT, d) != IGNORE_INDEX).sum() for d in range(1, mtp_depth + 1)]
    return torch.stack(counts).double()


class PipelineRunner:
    """This rank's stages, schedule, optimiser and one-step loop (see the module docstring)."""

    def __init__(self, model: MoETransformer, cfg, mesh: DeviceMesh, device: torch.device,
                 schedule: str = "1f1b") -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        self.cfg, self.device = cfg, device
        self.num_micro = cfg.grad_accum_steps
        self.pp_mesh, self.dp_mesh = mesh["pp"], mesh["dp"]
        pp, pp_rank, dp = self.pp_mesh.size(), self.pp_mesh.get_local_rank(), self.dp_mesh.size()
        per_rank = 2 if schedule == "interleaved_1f1b" else 1
        num_stages = pp * per_rank
        layers = split_layers(model.cfg.num_layers, num_stages)
        stage_ids = [pp_rank + k * pp for k in range(per_rank)]
        self.stages = [StageModel(model, layers[s], s == 0, s == num_stages - 1, 1.0 / self.num_micro).to(device)
                       for s in stage_ids]
        self.last = next((st for st in self.stages if st.is_last), None)
        self.loss_fn = _LastStageLoss(self.last, dp, self.num_micro) if self.last is not None else None
        group = self.pp_mesh.get_group()
        # static shapes (micro-batch rows x seq_len): dynamic inference would run an extra forward and loss
        # on the first step, which our router counts and loss parts would see
        rows, T, D = cfg.micro_batch_size, cfg.seq_len, model.cfg.hidden_size
        hidden = torch.empty(rows, T, D, device=device, requires_grad=True)  # a stage input that wants a gradient
        ids = torch.zeros(rows, T, dtype=torch.long, device=device)
        pipe = [PipelineStage(st, s, num_stages, device, input_args=ids if s == 0 else hidden, output_args=hidden,
                              group=group) for st, s in zip(self.stages, stage_ids)]
        loss_fn = self.loss_fn if self.loss_fn is not None else _never_called
        if per_rank == 1:
            self.schedule = Schedule1F1B(pipe[0], self.num_micro, loss_fn=loss_fn, scale_grads=False)
        else:
            self.schedule = ScheduleInterleaved1F1B(pipe, self.num_micro, loss_fn=loss_fn, scale_grads=False)
        self.container = nn.ModuleList(self.stages)
        self.optimizer = build_adamw(self.container, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                                     eps=cfg.eps, decay_embeddings=cfg.decay_embeddings)
        self.embed_group = self._embedding_group(model, num_stages)
        self.step = 0

    def _embedding_group(self, model: MoETransformer, num_stages: int):
        """The process group of this replica's first- and last-stage ranks (both hold the embedding)."""
        if not len(model.mtp) or self.pp_mesh.size() == 1:
            return None
        full = self.pp_mesh._get_root_mesh().mesh  # (dp, pp) global ranks
        last_pp = (num_stages - 1) % self.pp_mesh.size()
        mine = None
        for row in full.tolist():  # every rank creates every group (new_group is collective)
            group = dist.new_group([row[0], row[last_pp]])
            if dist.get_rank() in (row[0], row[last_pp]):
                mine = group
        return mine

    def train_step(self, batch_BT1: torch.Tensor) -> dict[str, float]:
        """One optimiser step on this replica's rows (B, T + 1); returns the step's global metrics."""
        from moeflow.models.train.schedules import lr_at

        cfg = self.cfg
        lr = lr_at(self.step, schedule=cfg.schedule, max_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                   total_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
        set_lr(self.optimizer, lr)
        batch_BT1 = batch_BT1.to(self.device)
        inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
        for st in self.stages:
            st.counts_LE = None
        if self.loss_fn is not None:
            counts = target_counts(targets_BT, len(self.last.mtp))
            self.loss_fn.global_counts = self._dp_sum(counts)
            self.loss_fn.parts = {}
        self.schedule.step(inputs_BT, target=torch.stack([inputs_BT, targets_BT], dim=1))
        self._sync_gradients()
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for st in self.stages:
            if st.counts_LE is not None:
                st.apply_router_bias_update(self._dp_sum(st.counts_LE).float())
        self.step += 1
        return {"grad_norm": float(grad_norm), **self._parts()}

    def _dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.dp_mesh.size() > 1:
            dist.all_reduce(t, group=self.dp_mesh.get_group())
        return t

    def _sync_gradients(self) -> None:
        if self.embed_group is not None:
            for st in self.stages:
                if st.model.embed_tokens is not None and st.model.embed_tokens.weight.grad is not None:
                    dist.all_reduce(st.model.embed_tokens.weight.grad, group=self.embed_group)
        if self.dp_mesh.size() > 1:
            for p in self.container.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.dp_mesh.get_group())
                    p.grad.div_(self.dp_mesh.size())

    def _clip(self) -> torch.Tensor:
        """Global gradient norm over all stages (each parameter once), then the loop's clipping rule."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for st in self.stages:
            for name, p in st.named_parameters():
                duplicate = st.is_last and not st.is_first and name == "model.embed_tokens.weight"
                if p.grad is not None and not duplicate:
                    sq += p.grad.double().pow(2).sum()
        dist.all_reduce(sq, group=self.pp_mesh.get_group())
        norm = sq.sqrt().float()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        params = [p for p in self.container.parameters() if p.grad is not None]
        if max_norm != math.inf:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return norm

    def _parts(self) -> dict[str, float]:
        """LM and MTP losses of the global batch (from the last stage, broadcast over the pipeline)."""
        vals = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.loss_fn is not None:
            vals[0] = float(self.loss_fn.parts.get("lm_loss", 0))
            vals[1] = float(self.loss_fn.parts.get("mtp_loss", 0))
        dist.all_reduce(vals, group=self.pp_mesh.get_group())  # only the last stage is non-zero
        vals = self._dp_sum(vals)
        return {"lm_loss": float(vals[0]), "mtp_loss": float(vals[1])}


def _never_called(*_args, **_kwargs):
    raise AssertionError("loss_fn runs on the last stage only")
