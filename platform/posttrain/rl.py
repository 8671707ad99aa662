"""The align stage's online-RL methods, ``method: grpo`` and ``method: ppo``, on the post-training engine.

Everything runs inside the engine core (``engine.py``: Ray Train launch, DDP, checkpoints and exact
resume, expert-load recording, HF export and registration); this module supplies its three parts:

* ``RolloutSource`` — the engine's micro-batch loader. When its buffer is used up it *generates*: this
  rank takes its shard of the next ``prompts_per_rollout`` prompts, samples ``samples_per_prompt``
  replies each with the policy's own latent-cache ``generate`` (token-in/token-out; temperature, top-k,
  top-p, stop tokens, ``max_new_tokens``; on GPU a bf16 copy of the policy, synced in place before each
  rollout, decoded with the CUDA-graph decoder), recording every token's
  sampling log-prob and every MoE layer's expert choice; scores them with the composite reward; computes
  the frozen reference's log-probs (and, for PPO, the value head's values, the KL-shaped per-token
  rewards and GAE); then serves ``ppo_epochs`` shuffled passes over the rows as micro-batches. Colocated
  like veRL's hybrid engine: every rank generates with the weights it trains, no copy between processes.
  Its ``state_dict`` holds the whole buffer, the position in it, the adaptive-KL value and the counters
  that seed the sampler, so a kill -9 between any two steps resumes exactly.
* ``RLObjective`` — the loss of a micro-batch: re-scores the rows with the current policy (optionally
  replaying the recorded routing, R3), the clipped surrogate on the advantages, the clipped value loss
  (PPO), the KL loss term (GRPO), reduced with the configured normalisation (``models.align.rl.aggregate``
  — the engine's count weighting makes it the full-batch value over micro-batches and ranks).
* ``evaluate`` — held-out headline figures: greedy replies' exact-match accuracy and mean reward (and
  each term), the exact KL(π ‖ π_ref) over the vocabulary at the reply tokens, and MaxVio per layer.

The reference is the input model version, frozen; a resumed run rebuilds it from the same registered
export, so it is not copied into checkpoints. PPO's value head sits on the policy's final hidden state
(one linear map, zero-initialised — "from the policy" —, or initialised with the reward model's head).
Logged per step: reward and per-term means, the share of identical-reward groups (GRPO), KL to the
reference, clip fraction, ratio, value loss, rollout MaxVio per layer, and the rollout/update routing
agreement (the update's own top-k against the recorded one; 1 by construction with replay on).

Shape suffixes: B rows, T positions, L MoE layers, K top-k, E experts, N prompts, G samples per prompt.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from moeflow.models.align import rl as R
from moeflow.models.align.rollout import pack_rollout, policy_pass, routing_agreement, routing_counts, routing_maxvio
from moeflow.platform.config import StageConfig

from . import data as D
from .engine import ObjectiveOutput, PostTrainJob, StageParts
from .rl_rewards import CompositeReward, ExactMatch, Sample, build_rewards

log = logging.getLogger(__name__)

RL_METHODS = ("grpo", "ppo")


# ------------------------------------------------------------------ config (mixed into AlignConfig)
class RLConfig(StageConfig):
    """Online RL settings of the align stage (used when ``method`` is grpo or ppo)."""

    prompts_per_rollout: int = Field(8, ge=1, le=65_536, description="prompts each rank samples per rollout batch")
    samples_per_prompt: int = Field(4, ge=1, le=1024, description="replies per prompt (GRPO's group size G)")
    max_new_tokens: int = Field(8, ge=1, le=65_536, description="longest reply generated")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="sampling temperature of rollouts (the update's "
                                                                   "log-probs use the same)")
    top_k: Optional[int] = Field(None, ge=1, le=1_000_000, description="rollout top-k filter (None: off)")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, description="rollout nucleus filter (None: off)")
    ppo_epochs: int = Field(1, ge=1, le=100, description="passes over each rollout batch (1 with one mini-batch: "
                                                         "on-policy, ratio 1)")
    clip_eps: float = Field(0.2, gt=0.0, le=1.0, description="PPO clip ε of the ratio")
    clip_eps_high: Optional[float] = Field(None, gt=0.0, le=10.0, description="upper clip (clip-higher; None: clip_eps)")
    dual_clip: Optional[float] = Field(None, gt=1.0, le=100.0, description="dual-clip bound c > 1 for negative "
                                                                           "advantages (None: off)")
    kl_coef: float = Field(0.02, ge=0.0, le=10.0, description="β of the KL to the reference: per-token reward "
                                                              "penalty (PPO) or loss term (GRPO)")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator (k1 in PPO's reward is usual)")
    kl_target: Optional[float] = Field(None, gt=0.0, le=100.0, description="adaptive KL controller target (None: "
                                                                           "fixed β)")
    kl_horizon: int = Field(10_000, ge=1, le=10_000_000, description="adaptive KL controller horizon (samples)")
    scale_rewards: bool = Field(True, description="GRPO: divide by the group's std (False: Dr.GRPO)")
    loss_normalisation: Literal["sequence_mean", "token_mean", "token_sum_const"] = Field(
        "token_mean", description="how per-token losses reduce: mean per reply then over replies; over all "
                                  "tokens; or reply sums / max_new_tokens (Dr.GRPO)")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="PPO discount γ")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="PPO GAE λ")
    value_coef: float = Field(0.5, ge=0.0, le=100.0, description="PPO value-loss weight")
    value_clip: Optional[float] = Field(0.2, gt=0.0, le=100.0, description="PPO value clip (None: unclipped)")
    value_init: Literal["policy", "reward_model"] = Field("policy", description="PPO value head: zero-initialised "
                                                                                 "on the policy, or the reward model's head")
    whiten_advantages: bool = Field(True, description="PPO: normalise advantages over the rollout batch of a rank")
    routing_replay: bool = Field(True, description="replay the rollout's expert choices in the update (R3)")
    rewards: dict[str, float] = Field(default_factory=lambda: {"exact_match": 1.0},
                                      description="reward terms and weights: exact_match, code, reward_model, "
                                                  "fluency, format, length")
    reward_model: Optional[str] = Field(None, description="model reference of the reward model (e.g. "
                                                          "'moe-reward@reward') for the reward_model term")
    shuffle_rewards: bool = Field(False, description="control experiment: permute rewards across the rollout's "
                                                     "samples before computing advantages")
    max_prompts: int = Field(0, ge=0, le=100_000_000, description="training prompts used (0 = all)")
    eval_prompts: int = Field(64, ge=1, le=1_000_000, description="held-out prompts answered greedily before/after")
    eval_samples: int = Field(4, ge=0, le=1024, description="held-out replies sampled per prompt at the rollout "
                                                           "temperature for sampled_reward/sampled_exact_match (0: off)")
    rollout_cuda_graph: bool = Field(True, description="decode rollouts with the CUDA-graph decoder on GPU (bf16 "
                                                       "weights only)")
    rollout_dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="weights rollouts sample with: bf16 = "
                                                           "a bf16 copy synced in place before each rollout (auto: "
                                                           "bf16 for fp32 weights on CUDA, else the policy itself)")

    @model_validator(mode="after")
    def _check_rewards(self):
        from .rl_rewards import NAMES

        unknown = sorted(set(self.rewards) - set(NAMES))
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown}: choose from {', '.join(NAMES)}")
        if not any(w != 0 for w in self.rewards.values()):
            raise ValueError("rewards: at least one term needs a non-zero weight")
        return self

    def rows_per_rollout(self) -> int:
        return self.prompts_per_rollout * self.samples_per_prompt


# ------------------------------------------------------------------ the PPO value head
class PolicyWithValue(nn.Module):
    """The policy LM plus a linear value head on its final hidden state; called like the LM, it adds
    ``aux["values"]`` (B, T) fp32. Routers and bias updates are the LM's, so the engine treats it alike."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.cfg = lm.cfg
        self.value_head = nn.Linear(lm.cfg.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def routers(self):
        return self.lm.routers()

    def apply_router_bias_update(self, counts_LE: torch.Tensor, gamma: float | None = None) -> None:
        self.lm.apply_router_bias_update(counts_LE, gamma)

    def forward(self, input_ids_BT: torch.Tensor, **kw):
        kw["return_hidden"] = True
        out = self.lm(input_ids_BT, **kw)
        out.aux["values"] = self.value_head(out.hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return out


def policy_lm(model: nn.Module) -> nn.Module:
    return model.lm if isinstance(model, PolicyWithValue) else model


# ------------------------------------------------------------------ prompts
def load_prompts(uri: str, split: str, limit: int = 0) -> list[D.PromptRecord]:
    records = list(D.load_data(uri, D.PROMPT, split=split).records)
    return records[:limit] if limit else records


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "big")


# ------------------------------------------------------------------ rollouts
class RolloutSource:
    """The engine loader of an RL run (see the module docstring)."""

    def __init__(self, model: nn.Module, reference: nn.Module, tokenizer, prompts: list[D.PromptRecord],
                 rewards: CompositeReward, cfg, *, method: str, rank: int = 0, world_size: int = 1,
                 device="cpu") -> None:
        from moeflow.models.chat import prompt_ids, stop_ids

        if not prompts:
            raise D.PostTrainDataError("RL needs at least one training prompt")
        self.model, self.reference, self.tokenizer, self.rewards, self.cfg = model, reference, tokenizer, rewards, cfg
        self.method, self.rank, self.world_size, self.device = method, rank, world_size, torch.device(device)
        self.prompts = prompts
        self.prompt_ids = [prompt_ids(tokenizer, list(p.prompt)) for p in prompts]
        self.stops = stop_ids(tokenizer)
        self.kl_ctl = R.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.rollout_index = 0
        self.position = 0
        self.order: list[list[int]] = []
        self.buffer: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, float] = {}
        self._graphs = None
        self._bf16_copy: nn.Module | None = None

    # -------------------------------------------------------------- the engine's loader protocol
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position >= len(self.order):
            self._rollout()
        rows = self.order[self.position]
        self.position += 1
        return self._micro_batch(rows)

    def state_dict(self) -> dict:
        return {"rollout_index": self.rollout_index, "position": self.position, "order": self.order,
                "buffer": self.buffer, "metrics": self.metrics, "kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rollout_index, self.position = int(state["rollout_index"]), int(state["position"])
        self.order, self.buffer, self.metrics = state["order"], state["buffer"], dict(state["metrics"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    def close(self) -> None:
        pass

    # -------------------------------------------------------------- one rollout batch
    def _prompt_shard(self) -> list[int]:
        """This rank's prompt indices for the current rollout: consecutive slices of a per-epoch permutation."""
        n = self.cfg.prompts_per_rollout * self.world_size
        per_epoch = max(1, len(self.prompts) // n)
        epoch, slot = divmod(self.rollout_index, per_epoch)
        order = list(range(len(self.prompts)))
        random.Random(_seed("prompts", self.cfg.seed, epoch)).shuffle(order)
        chosen = [order[(slot * n + j) % len(order)] for j in range(n)]
        return chosen[self.rank::self.world_size]

    def _rollout_lm(self) -> nn.Module:
        """The module that samples: the policy itself, or (``rollout_dtype`` bf16) a bf16 copy whose tensors are
        overwritten in place from the policy before every rollout — in place, so captured CUDA graphs stay valid;
        buffers too, so the router biases the update moved are the ones the rollout routes with."""
        lm = policy_lm(self.model)
        dtype = self.cfg.rollout_dtype
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" and lm.lm_head.weight.dtype == torch.float32 else "fp32"
        if dtype == "fp32" or lm.lm_head.weight.dtype == torch.bfloat16:
            return lm
        if self._bf16_copy is None:
            self._bf16_copy = copy.deepcopy(lm).to(torch.bfloat16).eval().requires_grad_(False)
        with torch.no_grad():
            for src, dst in zip(lm.state_dict().values(), self._bf16_copy.state_dict().values()):
                dst.copy_(src)
        return self._bf16_copy

    def _generate(self, ids: list[list[int]], seed: int):
        from moeflow.models.generation import CudaGraphPool, generate

        lm = self._rollout_lm()
        graph = False
        # the captured step needs the grouped-GEMM (bf16) expert path: the fp32 fallback syncs the host
        if self.cfg.rollout_cuda_graph and self.device.type == "cuda" and lm.lm_head.weight.dtype == torch.bfloat16:
            self._graphs = self._graphs or CudaGraphPool()
            graph = self._graphs
        was_training = lm.training
        lm.eval()
        try:
            return generate(lm, ids, self.cfg.max_new_tokens, temperature=self.cfg.temperature, top_k=self.cfg.top_k,
                            top_p=self.cfg.top_p, stop_token_ids=self.stops, seed=seed, pad_id=self.tokenizer.pad_id,
                            record_routing=lm.cfg.num_moe_layers > 0, return_logprobs=True, cuda_graph=graph)
        finally:
            lm.train(was_training)

    @torch.no_grad()
    def _rollout(self) -> None:
        cfg, G = self.cfg, self.cfg.samples_per_prompt
        shard = self._prompt_shard()
        ids = [self.prompt_ids[i] for i in shard for _ in range(G)]
        gen = self._generate(ids, _seed("rollout", cfg.seed, self.rank, self.rollout_index))
        samples = [self._sample(self.prompts[shard[r // G]], ids[r], toks, reason)
                   for r, (toks, reason) in enumerate(zip(gen.tokens, gen.finish_reasons))]
        breakdown = self.rewards(samples)
        scores_B = torch.tensor(breakdown.total, dtype=torch.float32)
        if cfg.shuffle_rewards:  # the control: same reward distribution, no relation to the replies
            g = torch.Generator().manual_seed(_seed("shuffle", cfg.seed, self.rank, self.rollout_index))
            scores_B = scores_B[torch.randperm(len(scores_B), generator=g)]
        packed = pack_rollout(ids, gen.tokens, gen.logprobs, gen.routing, pad_id=self.tokenizer.pad_id)
        mask_BT = packed.completion_mask_BT
        ref_logp_BT = self._score(self.reference, packed).logp_BT.float().cpu()
        kl_BT = R.kl_estimate(packed.old_logp_BT, ref_logp_BT, cfg.kl_estimator) * mask_BT
        buf = {"input_ids": packed.input_ids_BT, "targets": packed.targets_BT, "completion_mask": mask_BT,
               "token_mask": packed.token_mask_BT, "old_logp": packed.old_logp_BT, "ref_logp": ref_logp_BT}
        if packed.routing_LBTK is not None:
            buf["routing"] = packed.routing_LBTK
        metrics = {"reward/total": float(scores_B.mean()), **{f"reward/{k}": v for k, v in breakdown.means.items()},
                   "rollout/kl_to_reference": float(kl_BT.sum() / mask_BT.sum().clamp_min(1)),
                   "rollout/reply_tokens": float(mask_BT.sum(1).float().mean()),
                   "rollout/stopped": sum(r == "stop" for r in gen.finish_reasons) / len(gen.finish_reasons)}
        if self.method == "grpo":
            rewards_NG = scores_B.view(-1, G)
            adv_B = R.group_advantages(rewards_NG, normalise_std=cfg.scale_rewards).reshape(-1)
            buf["advantages"] = adv_B[:, None] * mask_BT
            metrics["grpo/identical_reward_groups"] = R.identical_group_fraction(rewards_NG)
        else:
            values_BT = self._score(self.model, packed).output.aux["values"].float().cpu() * mask_BT
            shaped_BT = R.shape_rewards(scores_B, kl_BT, mask_BT, self.kl_ctl.value)
            adv_BT, returns_BT = R.gae(shaped_BT, values_BT, mask_BT, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages:
                adv_BT = R.whiten(adv_BT, mask_BT)
            buf.update(advantages=adv_BT, returns=returns_BT, old_values=values_BT)
            metrics["ppo/kl_coef"] = self.kl_ctl.value
            seq_kl = float((kl_BT.sum(1)).mean())
            self.kl_ctl.update(seq_kl, len(scores_B))
        if packed.routing_LBTK is not None:
            vio_L = routing_maxvio(packed.routing_LBTK, packed.token_mask_BT, policy_lm(self.model).cfg.num_routed_experts)
            metrics.update({f"rollout/maxvio_layer{l}": float(v) for l, v in enumerate(vio_L)})
            metrics["rollout/maxvio_mean"] = float(vio_L.mean())
        self.buffer, self.metrics = buf, metrics
        self.order = self._micro_order(len(ids))
        self.position = 0
        self.rollout_index += 1

    def _sample(self, record: D.PromptRecord, prompt: list[int], tokens: list[int], reason: str) -> Sample:
        text = self.tokenizer.decode([t for t in tokens if t not in self.stops])
        return Sample(list(record.prompt), text, prompt, list(tokens), reason == "stop", record.answer, record.tests)

    def _score(self, model, packed):
        was_training = model.training
        model.eval()
        try:
            return policy_pass(model, packed.input_ids_BT.to(self.device), packed.targets_BT.to(self.device),
                               temperature=self.cfg.temperature, with_losses=False)
        finally:
            model.train(was_training)

    def _micro_order(self, num_rows: int) -> list[list[int]]:
        out = []
        mb = self.cfg.micro_batch_size
        for epoch in range(self.cfg.ppo_epochs):
            g = torch.Generator().manual_seed(_seed("order", self.cfg.seed, self.rank, self.rollout_index, epoch))
            perm = torch.randperm(num_rows, generator=g).tolist() if self.cfg.ppo_epochs > 1 or mb < num_rows else \
                list(range(num_rows))
            out += [perm[i:i + mb] for i in range(0, num_rows, mb)]
        return out

    def _micro_batch(self, rows: list[int]) -> dict:
        idx = torch.tensor(rows)
        used = int(self.buffer["token_mask"][idx].sum(1).max())  # trim the common right padding
        batch = {}
        for k, v in self.buffer.items():
            batch[k] = v[:, idx, :used].contiguous() if k == "routing" else v[idx, :used].contiguous()
        for k, v in self.metrics.items():
            batch[f"metric:{k}"] = torch.tensor(float(v))
        return batch


# ------------------------------------------------------------------ the objective
class RLObjective:
    """GRPO / PPO loss of a micro-batch of a ``RolloutSource`` (see the module docstring)."""

    def __init__(self, cfg, method: str) -> None:
        self.cfg, self.method = cfg, method

    def count(self, batch: dict) -> torch.Tensor:
        mask = batch["completion_mask"]
        if self.cfg.loss_normalisation == "token_mean":
            return mask.sum()
        return (mask.sum(1) > 0).sum()

    def __call__(self, model, batch: dict) -> ObjectiveOutput:
        cfg = self.cfg
        mask_BT = batch["completion_mask"]
        routing = batch.get("routing")
        out = policy_pass(model, batch["input_ids"], batch["targets"], temperature=cfg.temperature,
                          replay_LBTK=routing if cfg.routing_replay else None)
        pg = R.ppo_policy_loss(out.logp_BT, batch["old_logp"], batch["advantages"], clip_eps=cfg.clip_eps,
                               clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip)
        loss_BT = pg.loss_BT
        metrics = {"pg_loss": R.masked_mean(pg.loss_BT.detach(), mask_BT),
                   "clip_fraction": R.masked_mean(pg.clipped_BT.float(), mask_BT),
                   "ratio_mean": R.masked_mean(pg.ratio_BT.detach(), mask_BT),
                   "kl_old": R.masked_mean(R.kl_estimate(batch["old_logp"], out.logp_BT.detach(), "k3"), mask_BT)}
        kl_ref_BT = R.kl_estimate(out.logp_BT, batch["ref_logp"], cfg.kl_estimator)
        metrics["kl_to_reference"] = R.masked_mean(kl_ref_BT.detach(), mask_BT)
        if self.method == "grpo" and cfg.kl_coef > 0:
            loss_BT = loss_BT + cfg.kl_coef * kl_ref_BT
        if self.method == "ppo":
            values_BT = out.output.aux["values"]
            v_loss_BT = R.clipped_value_loss(values_BT, batch["old_values"], batch["returns"], clip=cfg.value_clip)
            loss_BT = loss_BT + cfg.value_coef * v_loss_BT
            metrics["value_loss"] = R.masked_mean(v_loss_BT.detach(), mask_BT)
        total, count = R.aggregate(loss_BT, mask_BT, cfg.loss_normalisation, max_tokens=cfg.max_new_tokens)
        loss = total / count.clamp_min(1)
        aux = {}
        real_BT = batch["token_mask"]
        if routing is not None and out.routing_LBTK is not None:
            agree_L = routing_agreement(routing, out.routing_LBTK, real_BT)
            metrics["routing/agreement_mean"] = agree_L.mean()
            metrics.update({f"routing/agreement_layer{l}": v for l, v in enumerate(agree_L)})
            counts_LE = routing_counts(out.routing_LBTK, real_BT, policy_lm(_bare(model)).cfg.num_routed_experts)
            full = out.output.aux.get("tokens_per_expert")
            # real tokens only; with MTP routers (extra rows) keep the model's own counts
            aux["tokens_per_expert"] = counts_LE if full is None or full.shape == counts_LE.shape else full
        else:
            aux["tokens_per_expert"] = out.output.aux.get("tokens_per_expert")
        if "router_entropy" in out.output.aux:
            aux["router_entropy"] = out.output.aux["router_entropy"]
        if out.output.terms.get("balance_loss") is not None:
            aux["balance_loss"] = out.output.terms["balance_loss"]
        for k, v in batch.items():
            if k.startswith("metric:"):
                metrics[k[len("metric:"):]] = v
        return ObjectiveOutput(loss, aux, metrics)


def _bare(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


# ------------------------------------------------------------------ held-out figures
@torch.no_grad()
def evaluate_policy(model: nn.Module, reference: nn.Module, tokenizer, prompts: list[D.PromptRecord],
                    rewards: CompositeReward, *, max_new_tokens: int, batch_size: int = 32, samples: int = 0,
                    temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Greedy replies to held-out prompts: exact match, mean reward (+ each term), KL to the reference, MaxVio;
    with ``samples`` > 0 also the mean reward and exact match of that many sampled replies per prompt (the
    distribution RL trains; a fixed seed, so before and after draw with the same noise)."""
    figures = _greedy_figures(model, reference, tokenizer, prompts, rewards, max_new_tokens=max_new_tokens,
                              batch_size=batch_size)
    if samples:
        figures.update(_sampled_figures(policy_lm(model), tokenizer, prompts, rewards, max_new_tokens=max_new_tokens,
                                        samples=samples, temperature=temperature, seed=seed, batch_size=batch_size))
    return figures


@torch.no_grad()
def _sampled_figures(lm, tokenizer, prompts, rewards, *, max_new_tokens, samples, temperature, seed,
                     batch_size) -> dict[str, float]:
    from moeflow.models.chat import prompt_ids, stop_ids
    from moeflow.models.generation import generate

    was_training = lm.training
    lm.eval()
    stops = stop_ids(tokenizer)
    out: list[Sample] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = [prompt_ids(tokenizer, list(p.prompt)) for p in chunk for _ in range(samples)]
        gen = generate(lm, ids, max_new_tokens, temperature=temperature, stop_token_ids=stops, seed=seed + i,
                       pad_id=tokenizer.pad_id)
        for r, (toks, reason) in enumerate(zip(gen.tokens, gen.finish_reasons)):
            p = chunk[r // samples]
            text = tokenizer.decode([t for t in toks if t not in stops])
            out.append(Sample(list(p.prompt), text, ids[r], list(toks), reason == "stop", p.answer, p.tests))
    lm.train(was_training)
    return {"sampled_reward": sum(rewards(out).total) / max(1, len(out)),
            "sampled_exact_match": sum(ExactMatch()(out)) / max(1, len(out))}


def _greedy_figures(model, reference, tokenizer, prompts, rewards, *, max_new_tokens, batch_size) -> dict[str, float]:
    from moeflow.models.chat import prompt_ids, stop_ids
    from moeflow.models.generation import generate

    lm = policy_lm(model)
    was_training = lm.training
    lm.eval()
    stops = stop_ids(tokenizer)
    device = lm.lm_head.weight.device
    samples, kl_sum, kl_count = [], 0.0, 0
    counts_LE = None
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = [prompt_ids(tokenizer, list(p.prompt)) for p in chunk]
        gen = generate(lm, ids, max_new_tokens, stop_token_ids=stops, pad_id=tokenizer.pad_id,
                       record_routing=lm.cfg.num_moe_layers > 0)
        for p, pid, toks, reason in zip(chunk, ids, gen.tokens, gen.finish_reasons):
            text = tokenizer.decode([t for t in toks if t not in stops])
            samples.append(Sample(list(p.prompt), text, pid, list(toks), reason == "stop", p.answer, p.tests))
        packed = pack_rollout(ids, gen.tokens, None, gen.routing, pad_id=tokenizer.pad_id)
        inputs, targets = packed.input_ids_BT.to(device), packed.targets_BT.to(device)
        logp_BTV = F.log_softmax(lm(inputs).logits.float(), dim=-1)
        ref_BTV = F.log_softmax(reference(inputs).logits.float(), dim=-1)
        kl_BT = (logp_BTV.exp() * (logp_BTV - ref_BTV)).sum(-1).cpu()
        kl_sum += float((kl_BT * packed.completion_mask_BT).sum())
        kl_count += int(packed.completion_mask_BT.sum())
        if packed.routing_LBTK is not None:
            c = routing_counts(packed.routing_LBTK, packed.token_mask_BT, lm.cfg.num_routed_experts)
            counts_LE = c if counts_LE is None else counts_LE + c
    lm.train(was_training)
    breakdown = rewards(samples)
    figures = {"exact_match": sum(ExactMatch()(samples)) / max(1, len(samples)),
               "reward": sum(breakdown.total) / max(1, len(samples)),
               **{f"reward_{k}": v for k, v in breakdown.means.items()},
               "kl_to_reference": kl_sum / max(1, kl_count), "prompts": float(len(samples))}
    if counts_LE is not None:
        from moeflow.models import balancing

        vio_L = balancing.maxvio(counts_LE)
        figures["maxvio_mean"] = float(vio_L.mean())
        figures["maxvio_max"] = float(vio_L.max())
        figures.update({f"maxvio_layer{l}": float(v) for l, v in enumerate(vio_L)})
    return figures


# ------------------------------------------------------------------ the builder (every rank, and the driver)
def build_rl(cfg, job: PostTrainJob, base, tokenizer, ctx) -> StageParts:
    """The RL stage's parts; ``cfg`` is the validated ``AlignConfig`` (``align.build_rl_stage`` is the builder)."""
    method = cfg.method
    if method not in RL_METHODS:
        raise ValueError(f"build_rl serves methods {RL_METHODS}, got {method!r}")
    reference = copy.deepcopy(base).eval().requires_grad_(False)  # before any update: the input version
    model = PolicyWithValue(base) if method == "ppo" else base
    parts = StageParts(model, cfg, export_model=policy_lm)
    if ctx is None:  # the driver: export only
        return parts
    from moeflow.platform.train.distributed import open_store

    store = open_store(job.store_uri)
    device = ctx.device
    reference.to(device)
    uri = job.data_uris["prompt"]
    train = load_prompts(uri, "train", cfg.max_prompts)
    heldout = load_prompts(uri, "heldout", cfg.eval_prompts)
    if not train or not heldout:
        raise D.PostTrainDataError(f"{uri}: {len(train)} training and {len(heldout)} held-out prompts: need both")
    rewards = build_rewards(cfg.rewards, max_new_tokens=cfg.max_new_tokens, reference_lm=reference,
                            pad_id=tokenizer.pad_id, reward_model=cfg.reward_model, store=store, device=device)
    if method == "ppo" and cfg.value_init == "reward_model":
        _init_value_from_reward_model(model, cfg, store)
    model.to(device)
    parts.loader = RolloutSource(model, reference, tokenizer, train, rewards, cfg, method=method, rank=ctx.rank,
                                 world_size=ctx.world_size, device=device)
    parts.objective = RLObjective(cfg, method)
    parts.evaluate = lambda m: evaluate_policy(m, reference, tokenizer, heldout, rewards,
                                               max_new_tokens=cfg.max_new_tokens, samples=cfg.eval_samples,
                                               temperature=cfg.temperature, seed=cfg.seed)
    return parts


def _init_value_from_reward_model(model: PolicyWithValue, cfg, store) -> None:
    from moeflow.platform import model_refs

    from .reward import load_reward_model

    if not cfg.reward_model:
        raise ValueError("value_init=reward_model needs align.reward_model (a reward model reference)")
    rm, _ = load_reward_model(model_refs.resolve(cfg.reward_model, store=store).require_hf(), store=store)
    if rm.cfg.hidden_size != model.cfg.hidden_size:
        raise ValueError(f"reward model hidden size {rm.cfg.hidden_size} != policy's {model.cfg.hidden_size}")
    with torch.no_grad():
        model.value_head.weight.copy_(rm.score.weight)
        model.value_head.bias.copy_(rm.score.bias)
