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

Document masking (``document_bos_id``): every stage needs the rows' document boundaries, but a stage
receives only the previous stage's output, so the first stage appends the BOS flags (0/1: exact in any
dtype) as one extra channel of the hidden state (D + 1); each stage rebuilds the one-process document
ids (``cumsum(BOS)``: block-diagonal mask, RoPE restarting per document) from it. The MTP chain breaks
(targets that start a document) travel with the targets to the last stage.

``PipelineTrainer`` is the loop's ``Trainer`` over a ``PipelineRunner``: what the pretraining worker
runs for pipeline_parallel > 1 (loader split over dp, validation through the stages, the global router
counts and biases, checkpoints of the stages' union under one-process names).

Not yet: activation checkpointing, EP inside a stage, FSDP over dp (plain all-reduce), compile, FP8,
CUDA graphs, bf16 autocast (stages run in the parameters' dtype).

Shape suffixes: B rows, T tokens, D hidden, L router layers of a stage, E experts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moeflow.models import MoETransformer
from moeflow.models.attention import document_attention
from moeflow.models.mtp import IGNORE_INDEX, mtp_targets
from moeflow.models.train.loop import Trainer, router_biases
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
                 balance_weight: float, document_bos_id: int | None = None) -> None:
        super().__init__(full.cfg)
        self.layer_ids, self.is_first, self.is_last = list(layer_ids), is_first, is_last
        self.balance_weight = balance_weight
        self.document_bos_id = document_bos_id
        # this stage's router rows in the one-process (L, E) order: main MoE layers, then MTP blocks
        moe_layers = [i for i, block in enumerate(full.model.layers) if block.is_moe]
        self.global_rows = [moe_layers.index(i) for i in layer_ids if full.model.layers[i].is_moe]
        if is_last:
            self.global_rows += [len(moe_layers) + j for j, m in enumerate(full.mtp) if m.block.is_moe]
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
        self.balance_3: torch.Tensor | None = None  # (seq_aux, z, lb) of this step, ÷ micro-batches, detached
        self.entropy_L: torch.Tensor | None = None  # router entropies of this step, summed over micro-batches

    def routers(self):
        if "layer_ids" not in self.__dict__:  # MoETransformer.__init__ (init_weights) runs before the pruning
            return super().routers()
        blocks = [self.model.layers[i] for i in self.layer_ids] + [m.block for m in self.mtp]
        return [b.mlp.gate for b in blocks if b.is_moe]

    def _count(self, counts_E: torch.Tensor, row: int, stats=None) -> None:
        if not torch.is_grad_enabled():  # validation: no balancing statistics
            return
        if stats is not None:
            part = torch.stack([stats.seq_aux_loss, stats.z_loss, stats.lb_loss]).detach().double()
            part = part * self.balance_weight
            self.balance_3 = part if self.balance_3 is None else self.balance_3 + part
            if self.entropy_L is None:
                self.entropy_L = torch.zeros(len(self.routers()), dtype=torch.float64, device=counts_E.device)
            self.entropy_L[row] += stats.router_entropy.detach().double()
        if self.counts_LE is None:
            self.counts_LE = torch.zeros(len(self.routers()), self.cfg.num_routed_experts, dtype=torch.float64,
                                         device=counts_E.device)
        self.counts_LE[row] += counts_E.detach().double()

    def attention(self, x_BTD: torch.Tensor, starts_BT: torch.Tensor | None):
        """(cos, sin, mask) of the rows: plain causal, or per document when ``starts_BT`` (BOS flags) is given
        (the one-process ``document_ids_BT = cumsum(BOS)``: block-diagonal mask, RoPE restarting per document)."""
        B, T = x_BTD.shape[:2]
        if starts_BT is None:
            return (*self.rotary(torch.arange(T, device=x_BTD.device).expand(B, T)), None)
        positions, mask, _ = document_attention(starts_BT.long().cumsum(dim=1))
        return (*self.rotary(positions), mask)

    def split_input(self, x):
        """(hidden (B, T, D) or ids (B, T), BOS flags (B, T) or None) of what this stage receives.

        With document masking every stage needs the rows' document boundaries, but a pipeline stage
        receives only the previous stage's output: so the BOS flags travel as one extra channel of the
        hidden state (0/1, exact in any dtype), set by the first stage from the token ids."""
        if self.is_first:
            return x, (x == self.document_bos_id) if self.document_bos_id is not None else None
        if self.document_bos_id is None:
            return x, None
        return x[..., :-1], x[..., -1] > 0.5

    def forward(self, x):  # (B, T) ids on the first stage, else (B, T, D) (+ 1 flag channel: document masking)
        x_BTD, starts_BT = self.split_input(x)
        if self.is_first:
            x_BTD = self._embed(x_BTD)
        cos, sin, mask = self.attention(x_BTD, starts_BT)
        row = 0
        for i in self.layer_ids:
            x_BTD, stats = self.model.layers[i](x_BTD, cos, sin, mask, None, None, True)
            if stats is not None:
                self._count(stats.tokens_per_expert_E, row, stats)
                row += 1
                if torch.is_grad_enabled():
                    x_BTD = _AttachLoss.apply(x_BTD, stats.seq_aux_loss + stats.z_loss + stats.lb_loss,
                                              self.balance_weight)
        if starts_BT is not None:
            x_BTD = torch.cat([x_BTD, starts_BT.unsqueeze(-1).to(x_BTD.dtype)], dim=-1)
        return x_BTD


class _LastStageLoss:
    """The schedule's ``loss_fn`` on the last stage: LM head, LM loss, MTP losses, token-weighted."""

    def __init__(self, stage: StageModel, dp: int, num_micro: int) -> None:
        self.stage, self.dp, self.num_micro = stage, dp, num_micro
        self.global_counts: torch.Tensor | None = None
        self.parts: dict[str, torch.Tensor] = {}

    def __call__(self, h, packed_B3T: torch.Tensor) -> torch.Tensor:
        """``packed_B3T``: inputs, targets and the MTP chain breaks (1 where a target starts a document)."""
        m, cfg = self.stage, self.stage.cfg
        inputs_BT, targets_BT, boundary_BT = packed_B3T[:, 0], packed_B3T[:, 1], packed_B3T[:, 2] > 0
        h_BTD, starts_BT = (h[..., :-1], h[..., -1] > 0.5) if m.document_bos_id is not None else (h, None)
        chain_BT = targets_BT.masked_fill(boundary_BT, IGNORE_INDEX)  # MTP only (the LM loss keeps them)
        share = target_counts(targets_BT, len(m.mtp), chain_BT) / self.global_counts.clamp_min(1) * self.dp
        lm = m._loss_fn(m.lm_head(m.model.norm(h_BTD)), targets_BT)
        loss = lm * share[0].to(lm.dtype)
        self.parts["lm_loss"] = self.parts.get("lm_loss", 0) + lm.detach() * share[0] / self.dp
        if len(m.mtp):
            cos, sin, mask = m.attention(h_BTD, starts_BT)
            stats: list = []
            losses = m._mtp_losses(h_BTD, inputs_BT, chain_BT, cos, sin, mask, stats)
            mtp = sum(l_ * share[1 + j].to(l_.dtype) for j, l_ in enumerate(losses)) / len(losses)
            loss = loss + cfg.mtp_loss_weight * mtp
            self.parts["mtp_loss"] = self.parts.get("mtp_loss", 0) + mtp.detach() / self.dp
            first_mtp_row = len(m.routers()) - len(stats)
            for j, s in enumerate(stats):
                m._count(s.tokens_per_expert_E, first_mtp_row + j, s)
                loss = loss + (s.seq_aux_loss + s.z_loss + s.lb_loss) / self.num_micro
        return loss


def target_counts(targets_BT: torch.Tensor, mtp_depth: int, chain_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Valid targets of the LM loss and of each MTP depth, (1 + depth,) float64 (as the loop counts them);
    ``chain_BT``: the targets with the MTP chain breaks (document starts) set to -100 (default: targets)."""
    chain_BT = targets_BT if chain_BT is None else chain_BT
    counts = [(targets_BT != IGNORE_INDEX).sum()]
    counts += [(mtp_targets(chain_BT, d) != IGNORE_INDEX).sum() for d in range(1, mtp_depth + 1)]
    return torch.stack(counts).double()


class PipelineRunner:
    """This rank's stages, schedule, optimiser and one-step loop (see the module docstring)."""

    def __init__(self, model: MoETransformer, cfg, mesh: DeviceMesh, device: torch.device,
                 schedule: str = "1f1b", document_bos_id: int | None = None) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        self.cfg, self.device = cfg, device
        self.num_micro = cfg.grad_accum_steps
        self.pp_mesh, self.dp_mesh = mesh["pp"], mesh["dp"]
        pp, pp_rank, dp = self.pp_mesh.size(), self.pp_mesh.get_local_rank(), self.dp_mesh.size()
        per_rank = 2 if schedule == "interleaved_1f1b" else 1
        num_stages = pp * per_rank
        layers = split_layers(model.cfg.num_layers, num_stages)
        stage_ids = [pp_rank + k * pp for k in range(per_rank)]
        self.num_stages, self.stage_ids = num_stages, stage_ids
        self.document_bos_id = document_bos_id
        self.stages = [StageModel(model, layers[s], s == 0, s == num_stages - 1, 1.0 / self.num_micro,
                                  document_bos_id).to(device) for s in stage_ids]
        self.union = self._union(model)
        self.last = next((st for st in self.stages if st.is_last), None)
        self.loss_fn = _LastStageLoss(self.last, dp, self.num_micro) if self.last is not None else None
        group = self.pp_mesh.get_group()
        # static shapes (micro-batch rows x seq_len): dynamic inference would run an extra forward and loss
        # on the first step, which our router counts and loss parts would see
        rows, T, D = cfg.micro_batch_size, cfg.seq_len, model.cfg.hidden_size
        self.hidden_width = D + (1 if document_bos_id is not None else 0)  # + the BOS-flag channel
        self.dtype = next(model.parameters()).dtype
        hidden = torch.empty(rows, T, self.hidden_width, device=device, dtype=self.dtype,
                             requires_grad=True)  # a stage input that wants a gradient
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
                                     eps=cfg.eps, decay_embeddings=cfg.decay_embeddings,
                                     impl=getattr(cfg, "adamw_impl", "torch"))
        self.embed_group = self._embedding_group(model, num_stages)
        self.step = 0

    def _union(self, model: MoETransformer) -> StageModel:
        """One module holding this rank's stages under the one-process names (the stage itself for 1F1B;
        for two interleaved stages a pruned model whose blocks ARE the stages' blocks): what checkpoints
        capture (``get_state_dict``), so the union of every rank's state dict is the plain layout."""
        if len(self.stages) == 1:
            return self.stages[0]
        ids = sorted(i for st in self.stages for i in st.layer_ids)
        union = StageModel(model, ids, any(st.is_first for st in self.stages), any(st.is_last for st in self.stages),
                           1.0 / self.num_micro, self.document_bos_id).to(self.device)
        for st in self.stages:
            for i in st.layer_ids:
                union.model.layers[i] = st.model.layers[i]
            if st.is_first:
                union.model.embed_tokens = st.model.embed_tokens
            if st.is_last:
                union.model.embed_tokens = st.model.embed_tokens if st.model.embed_tokens is not None \
                    else union.model.embed_tokens
                union.model.norm, union.lm_head, union.mtp = st.model.norm, st.lm_head, st.mtp
        return union

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
        global_counts = self._dp_sum(target_counts(targets_BT, self.stages[0].cfg.mtp_depth))
        self.forward_backward(inputs_BT, targets_BT, torch.zeros_like(targets_BT), global_counts)
        grad_norm = self.sync_and_clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for st in self.stages:
            if st.counts_LE is not None:
                st.apply_router_bias_update(self._dp_sum(st.counts_LE).float())
        self.step += 1
        return {"grad_norm": float(grad_norm), **self._parts()}

    def forward_backward(self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor, boundary_BT: torch.Tensor,
                         global_counts: torch.Tensor) -> None:
        """The schedule over this replica's micro-batches (rows of the (M·B, T) tensors, in order):
        gradients accumulate, each stage's router counts (``counts_LE``) and balancing losses
        (``balance_3``) are reset, then summed. ``global_counts``: valid targets of the global batch."""
        for st in self.stages:
            st.counts_LE = st.balance_3 = st.entropy_L = None
        if self.loss_fn is not None:
            self.loss_fn.global_counts = global_counts
            self.loss_fn.parts = {}
        target = torch.stack([inputs_BT, targets_BT, boundary_BT.long()], dim=1)
        self.schedule.step(inputs_BT, target=target)

    def sync_and_clip(self) -> torch.Tensor:
        """Tie the embedding copies, average gradients over ``dp``, clip by the global norm; returns it."""
        self._sync_gradients()
        return self._clip()

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


class PipelineTrainer(Trainer):
    """The loop's ``Trainer`` over pipeline stages: what the pretraining worker runs with pipeline_parallel > 1.

    Everything around the optimiser step is the Trainer's (LR schedule, logging and the metrics history,
    callbacks, validation cadence, the checkpointed loop state); the step itself (``_device_step``) runs
    the ``PipelineRunner``'s schedule, and ``evaluate`` passes the validation rows through the stages
    (forward only, point to point). ``model`` is this rank's stages under one-process names
    (``PipelineRunner.union``) and ``optimizer`` the runner's, so ``models.train.state`` captures and
    restores them unchanged: DCP writes each rank's parameters, the union over the ranks is the plain
    model (the last stage's embedding copy equals the first stage's: saved once).

    The balancing statistics are the one-process ones: each stage writes its routers' counts into
    its rows of the full (L, E) matrix, one all-reduce over the whole mesh sums the stages (disjoint
    rows) and the replicas, and each stage updates its own routers' biases from its rows (router
    entropies are placed and summed the same way). The batch's rows are this replica's (the loader
    is split over ``dp`` only: every stage of a replica reads the same rows; the first stage uses the
    inputs, the last the targets). Not here (refused by ``PretrainConfig``): torch.compile, activation
    checkpointing, FP8, CUDA graphs; bf16 autocast is off (the stages run in the parameters' dtype).
    """

    def __init__(self, cfg, model: MoETransformer, train_batches, *, mesh: DeviceMesh, device: torch.device,
                 schedule: str = "1f1b", val_batches=None, logger=None, bytes_per_token: float | None = None,
                 bos_id: int | None = None) -> None:
        for name, off in (("compile", False), ("cuda_graph", False), ("activation_checkpointing", "none")):
            if getattr(cfg, name, off) != off:
                raise ValueError(f"pipeline_parallel > 1 does not support {name}={getattr(cfg, name)!r} yet")
        if getattr(cfg, "fp8", None):
            raise ValueError("pipeline_parallel > 1 does not support fp8 yet")
        doc_bos = bos_id if getattr(cfg, "document_masking", False) else None
        if getattr(cfg, "document_masking", False) and bos_id is None:
            raise ValueError("document_masking needs the data's bos_id")
        self.runner = PipelineRunner(model, cfg, mesh, device, schedule=schedule, document_bos_id=doc_bos)
        super().__init__(cfg, self.runner.union, train_batches, wrapped=self.runner.union, val_batches=val_batches,
                         device=device, logger=logger, bytes_per_token=bytes_per_token, bos_id=bos_id)
        self.optimizer = self.runner.optimizer
        self.flat_optimizer_state = True  # ranks hold different parameters (see models.train.state.capture)
        self.mesh, self.dp_mesh, self.pp_mesh = mesh, mesh["dp"], mesh["pp"]
        self.data_parallel_size = self.dp_mesh.size()
        self.num_routers = len(model.routers())
        self.mtp_depth = int(model.cfg.mtp_depth)  # the union of a middle rank has no MTP blocks
        self.flops_per_token = model.cfg.flops_per_token(cfg.seq_len)
        zeros = lambda: torch.zeros(self.num_routers, model.cfg.num_routed_experts,  # noqa: E731
                                    dtype=torch.float64, device=self.device)
        self.cumulative_counts_LE, self.interval_counts_LE, self.last_counts_LE = zeros(), zeros(), zeros()
        self.logged_interval_counts_LE = zeros().cpu()
        self.use_bf16 = False

    def _full(self, per_stage: dict[int, torch.Tensor | None], width: int) -> torch.Tensor:
        """Stage tensors (one row per router of the stage) placed into the one-process (L, width) order."""
        full = torch.zeros(self.num_routers, width, dtype=torch.float64, device=self.device)
        for st in self.runner.stages:
            value = per_stage.get(id(st))
            if value is not None:
                full[st.global_rows] += value.double().reshape(len(st.global_rows), width)
        return full

    def _device_step(self, micro_batches):
        runner = self.runner
        counts_MC = torch.stack([self._target_counts(t, extra) for _, t, extra in micro_batches])
        global_counts = runner._dp_sum(counts_MC.sum(0))
        inputs_BT = torch.cat([i for i, _, _ in micro_batches])
        targets_BT = torch.cat([t for _, t, _ in micro_batches])
        boundary_BT = torch.cat([extra["mtp_boundary_BT"] if "mtp_boundary_BT" in extra else torch.zeros_like(t)
                                 for _, t, extra in micro_batches])
        runner.forward_backward(inputs_BT, targets_BT, boundary_BT, global_counts)
        grad_norm = runner.sync_and_clip().detach().float()
        self.optimizer.step()
        # one all-reduce over the whole mesh: the router counts (stages: disjoint rows; replicas: summed),
        # the LM/MTP losses (last stages) and the balancing losses (every stage, ÷ replicas)
        E = self.runner.stages[0].cfg.num_routed_experts
        counts_LE = self._full({id(st): st.counts_LE for st in runner.stages}, E)
        entropy_L1 = self._full({id(st): st.entropy_L for st in runner.stages}, 1) / self.data_parallel_size
        parts_5 = torch.zeros(5, dtype=torch.float64, device=self.device)
        if runner.loss_fn is not None:
            parts_5[0] = torch.as_tensor(runner.loss_fn.parts.get("lm_loss", 0.0)).double()
            parts_5[1] = torch.as_tensor(runner.loss_fn.parts.get("mtp_loss", 0.0)).double()
        for st in runner.stages:
            if st.balance_3 is not None:
                parts_5[2:] += st.balance_3 / self.data_parallel_size
        flat = torch.cat([counts_LE.flatten(), entropy_L1.flatten(), parts_5])
        if _world() > 1:
            dist.all_reduce(flat)
        L = self.num_routers
        counts_LE, entropy_L = flat[:L * E].view_as(counts_LE), flat[L * E:L * E + L].float()
        parts_5 = flat[-5:].float()
        if self.update_router_bias and self.num_routers:
            for st in runner.stages:
                if st.global_rows:
                    st.apply_router_bias_update(counts_LE[st.global_rows].float())
        parts = dict(zip(("lm_loss", "mtp_loss", "seq_aux_loss", "z_loss", "lb_loss"), parts_5.unbind()))
        parts["loss"] = parts["lm_loss"] + self.mtp_loss_weight * parts["mtp_loss"] + parts_5[2:].sum()
        self.last_target_counts = global_counts
        if not self.num_routers:
            return parts, None, None, grad_norm
        return parts, counts_LE, entropy_L, grad_norm

    def router_bias_LE(self) -> torch.Tensor | None:
        biases = {id(st): router_biases(st) for st in self.runner.stages}
        if not self.num_routers:
            return None
        full = self._full(biases, self.runner.stages[0].cfg.num_routed_experts)
        dist.all_reduce(full, group=self.pp_mesh.get_group())  # the replicas hold the same biases
        return full.float()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation LM loss over the global validation set: each replica's rows pass through its stages
        in order (blocking send/recv between consecutive stages' ranks), the last stage sums the loss."""
        runner, pp_group = self.runner, self.pp_mesh.get_group()
        owner = lambda s: dist.get_global_rank(pp_group, s % self.pp_mesh.size())  # noqa: E731
        by_id = dict(zip(runner.stage_ids, runner.stages))
        for st in runner.stages:
            st.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch_BT1 in self.val_batches():
            batch_BT1 = batch_BT1.to(self.device)
            inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
            x = inputs_BT
            for s in range(runner.num_stages):
                st = by_id.get(s)
                if st is None:
                    continue
                if s > 0:
                    x = torch.empty(*inputs_BT.shape, runner.hidden_width, dtype=runner.dtype, device=self.device)
                    dist.recv(x, src=owner(s - 1))
                x = st(x)
                if s < runner.num_stages - 1:
                    dist.send(x.contiguous(), dst=owner(s + 1))
                else:
                    h_BTD = x[..., :-1] if runner.document_bos_id is not None else x
                    lm = st._loss_fn(st.lm_head(st.model.norm(h_BTD)), targets_BT)
                    n = int((targets_BT != IGNORE_INDEX).sum())
                    sums += torch.stack([lm.double() * n, torch.tensor(n, dtype=torch.float64)])
        for st in runner.stages:
            st.train()
        if _world() > 1:
            dist.all_reduce(sums)  # only the last stages hold non-zero sums: the replicas' total
        return self._val_metrics(sums)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
