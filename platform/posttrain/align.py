"""The align stage. ``method: dpo`` (this module): preference pairs + a model version -> a policy tuned by DPO /
IPO / cDPO. ``method: grpo`` / ``ppo``: online RL on prompts with exact answers (``rl.py``, same config class).

The reference is the input model version. Its log-probs of every training and held-out completion are
computed ONCE, before the first update, and written to the store (``<output_prefix>/reference``, an
atomic artefact, reused on resume); the reference model is then dropped, so only the policy (and its
optimiser) is in memory during the update. For the held-out KL(π ‖ π_ref) the reference's full
log-softmax at the held-out chosen reply positions is kept as well (``kl_pairs`` pairs; small).

Headline figures, on held-out pairs, before and after training (before = the reference itself):

* ``reward_accuracy``: share of pairs whose implicit reward β·(logπ − logπ_ref) is higher for the chosen
  reply (0 before training: every pair ties, and ties lose);
* ``reward_margin``: mean implicit-reward margin (0 before);
* ``logp_accuracy``: share of pairs where the policy itself gives the chosen reply a higher per-token
  log-prob (the reference's own preference before training; no β, no reference);
* ``kl_to_reference``: exact per-token KL(π ‖ π_ref) over the vocabulary on the held-out chosen replies.

Shape suffixes: P pairs, R rows (2 per pair), N reply positions, V vocabulary.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from moeflow.models.align import pairs as P
from moeflow.models.align.dpo import pair_logprobs, policy_reference_kl, preference_loss, sequence_logprobs
from moeflow.platform.config import StageConfig

from moeflow.models.align.sft import PackedRowLoader

from . import data as D
from .engine import ObjectiveOutput, PostTrainConfig, PostTrainJob, StageParts, StageResult, run_posttrain
from .pairs import PairData, PairDataConfig, load_pairs
from .rl import RL_METHODS, RLConfig, build_rl

log = logging.getLogger(__name__)

BUILDER = "moeflow.platform.posttrain.align:build_align"
RL_BUILDER = "moeflow.platform.posttrain.align:build_rl_stage"
REFERENCE_DIR = "reference"
REFERENCE_FILE = "reference.pt"


class DPOLossConfig(StageConfig):
    """The preference loss (see ``moeflow.models.align.dpo``)."""

    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid = DPO (with label_smoothing: cDPO); "
                                                                  "ipo = identity preference optimisation")
    beta: float = Field(0.1, gt=0.0, le=10.0, description="β: strength of the pull towards the reference "
                                                           "(DPO's KL coefficient; IPO's target margin is 1/(2β))")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="cDPO: assumed probability that a pair's "
                                                                    "label is flipped (sigmoid loss only)")
    average_log_prob: bool = Field(False, description="use per-token mean completion log-probs instead of sums "
                                                      "(IPO's convention; makes long and short replies comparable)")


class AlignConfig(PostTrainConfig, PairDataConfig, DPOLossConfig, RLConfig):
    """Alignment: the loop (``PostTrainConfig``); for dpo the pairs it reads and the DPO-family loss; for grpo/ppo
    the online-RL settings (``RLConfig``).

    dpo: ``micro_batch_size`` counts pairs (each is two rows); ``seq_len`` is the longest side kept.
    grpo/ppo: ``micro_batch_size`` counts sampled replies; one optimiser step is ``micro_batch_size ×
    grad_accum_steps`` replies, and a rollout batch (``prompts_per_rollout × samples_per_prompt`` per rank)
    must be a whole number of steps; ``seq_len`` bounds prompt + reply.
    """

    method: Literal["dpo", "grpo", "ppo"] = Field("dpo", description="alignment method: dpo (offline, preference "
                                                                      "pairs), grpo or ppo (online RL, prompts)")
    lr: float = Field(1e-4, gt=0, le=1.0, description="peak learning rate")
    kl_pairs: int = Field(64, ge=1, le=100_000, description="held-out pairs whose chosen replies measure "
                                                            "KL(π ‖ π_ref) (the reference's log-softmax is kept)")

    @property
    def data_key(self) -> str:
        """Which generated set this method reads (a key of ``posttrain_data_task``'s result)."""
        return "prompt_uri" if self.method in RL_METHODS else "preference_uri"

    @model_validator(mode="after")
    def _check_rl_batches(self):
        rows, step = self.rows_per_rollout(), self.micro_batch_size * self.grad_accum_steps
        if self.method in RL_METHODS and rows % step:
            raise ValueError(f"prompts_per_rollout × samples_per_prompt = {rows} replies per rollout must be a "
                             f"multiple of micro_batch_size × grad_accum_steps = {step} (replies per step)")
        return self

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Token capacity of a step: dpo, both sides of every pair at ``seq_len`` (batches pad to their longest
        row); grpo/ppo, every reply at ``seq_len``."""
        return (1 if self.method in RL_METHODS else 2) * super().tokens_per_step(world_size)


# ------------------------------------------------------------------ reference log-probs, computed once
@torch.no_grad()
def reference_logprobs(model, pairs: P.PairSet, *, average: bool, batch_size: int = 8, device="cpu") -> torch.Tensor:
    """(P, 2) fp32: the reference's completion log-probs of each pair's chosen and rejected reply."""
    was_training = model.training
    model.eval()
    out = []
    for batch in pairs.batches(batch_size):
        logps_R, _ = pair_logprobs(model, {k: v.to(device) for k, v in batch.items()}, average=average)
        B = P.num_pairs(batch)
        out.append(torch.stack([logps_R[:B], logps_R[B:]], dim=1).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


@torch.no_grad()
def reference_reply_logprobs(model, pairs: P.PairSet, *, batch_size: int = 8, device="cpu") -> list[torch.Tensor]:
    """The reference's log-softmax at the chosen replies' target positions, one (N_b, V) tensor per batch
    of ``pairs.batches(batch_size)`` — what ``kl_to_reference`` compares the policy with."""
    was_training = model.training
    model.eval()
    out = []
    for batch in pairs.batches(batch_size):
        logits_RTV, mask_RT = _chosen_reply_logits(model, batch, device)
        out.append(F.log_softmax(logits_RTV[mask_RT].float(), dim=-1).cpu())
    model.train(was_training)
    return out


def _chosen_reply_logits(model, batch, device):
    B = P.num_pairs(batch)
    ids = batch["input_ids"][:B].to(device)
    targets = P.targets({k: v[:B] for k, v in batch.items() if k in ("input_ids", "loss_mask")}).to(device)
    return model(ids[:, :-1]).logits, targets != P.IGNORE_INDEX


def save_reference(store, prefix: str, train_ref: torch.Tensor, heldout_ref: torch.Tensor,
                   heldout_reply_logp: list[torch.Tensor], metadata: dict) -> str:
    buf = io.BytesIO()
    torch.save({"train": train_ref, "heldout": heldout_ref, "heldout_reply_logp": heldout_reply_logp}, buf)
    with store.write_artifact(prefix, metadata={"kind": "dpo-reference", **metadata}, overwrite=True) as w:
        w.put_bytes(REFERENCE_FILE, buf.getvalue())
    return store.uri(prefix)


def load_reference(store, prefix: str) -> dict | None:
    if not store.artifact_exists(prefix):
        return None
    return torch.load(io.BytesIO(store.read_artifact(prefix).get_bytes(REFERENCE_FILE)), weights_only=True)


# ------------------------------------------------------------------ objective and evaluation
def dpo_step_loss(policy, batch: dict[str, torch.Tensor], loss: DPOLossConfig, *, with_losses: bool = True):
    """(preference loss (attached; balancing losses NOT added), model output, metrics) of a micro-batch."""
    logps_R, out = pair_logprobs(policy, batch, average=loss.average_log_prob, with_losses=with_losses)
    B = P.num_pairs(batch)
    ref_R = batch["ref_logps"].to(logps_R.device)
    pref = preference_loss(logps_R[:B], logps_R[B:], ref_R[:B], ref_R[B:], beta=loss.beta, method=loss.loss,
                           label_smoothing=loss.label_smoothing)
    return pref.loss, out, pref.metric_tensors()


class DPOObjective:
    """The engine-core objective: a mean over pairs; the balancing losses travel in ``aux``."""

    def __init__(self, cfg: AlignConfig) -> None:
        self.cfg = cfg

    def count(self, batch: dict) -> torch.Tensor:
        return torch.tensor(P.num_pairs(batch))

    def __call__(self, model, batch: dict) -> ObjectiveOutput:
        loss, out, metrics = dpo_step_loss(model, batch, self.cfg)
        aux = {k: out.aux[k] for k in ("tokens_per_expert", "router_entropy") if k in out.aux}
        if out.terms.get("balance_loss") is not None:
            aux["balance_loss"] = out.terms["balance_loss"]
        return ObjectiveOutput(loss, aux, metrics)


@torch.no_grad()
def evaluate_preferences(policy, heldout: P.PairSet, reply_ref_logp: list[torch.Tensor], loss: DPOLossConfig, *,
                         batch_size: int = 8, device="cpu", with_kl: bool = True) -> dict[str, float]:
    """The held-out headline figures of the module docstring. ``heldout`` carries its reference log-probs;
    ``reply_ref_logp`` are ``reference_reply_logprobs`` of the same pairs and batch size (with_kl)."""
    was_training = policy.training
    policy.eval()
    chosen, rejected, own_c, own_r, kls, kl_weights = [], [], [], [], [], []
    for b, batch in enumerate(heldout.batches(batch_size)):
        batch = {k: v.to(device) for k, v in batch.items()}
        B = P.num_pairs(batch)
        out = policy(batch["input_ids"][:, :-1])
        targets_RT = P.targets(batch)
        total_R, count_R = sequence_logprobs(out.logits, targets_RT)
        mean_R = total_R / count_R.clamp_min(1)
        logps_R = mean_R if loss.average_log_prob else total_R
        ref_R = batch["ref_logps"]
        chosen.append(loss.beta * (logps_R[:B] - ref_R[:B]))
        rejected.append(loss.beta * (logps_R[B:] - ref_R[B:]))
        own_c.append(mean_R[:B])
        own_r.append(mean_R[B:])
        if with_kl:
            reply_logits = out.logits[:B][targets_RT[:B] != P.IGNORE_INDEX]
            ref_logp = reply_ref_logp[b].to(device)
            kls.append(float(policy_reference_kl(reply_logits, ref_logp)) * ref_logp.shape[0])
            kl_weights.append(ref_logp.shape[0])
    policy.train(was_training)
    chosen_P, rejected_P = torch.cat(chosen).cpu(), torch.cat(rejected).cpu()
    figures = {"reward_accuracy": float((chosen_P > rejected_P).float().mean()),
            "reward_margin": float((chosen_P - rejected_P).mean()),
            "rewards_chosen": float(chosen_P.mean()), "rewards_rejected": float(rejected_P.mean()),
            "logp_accuracy": float((torch.cat(own_c) > torch.cat(own_r)).float().mean()),
            "pairs": float(len(chosen_P))}
    if with_kl:
        figures["kl_to_reference"] = float(sum(kls) / max(1, sum(kl_weights)))
    return figures


# ------------------------------------------------------------------ the builder (every rank, and the driver)
def ensure_reference(store, prefix: str, model, data: PairData, cfg: AlignConfig, *, rank: int, device) -> dict:
    """The stored reference log-probs, computed now (with ``model`` = the reference) when absent.

    Every rank computes the same numbers (same weights, same pairs) instead of waiting on rank 0;
    rank 0 alone writes the artefact. A stored reference whose shape does not match the data is stale
    (the pairs changed) and is recomputed.
    """
    ref = load_reference(store, prefix)
    fits = ref is not None and ref["train"].shape == (len(data.train), 2) and ref["heldout"].shape == (len(data.heldout), 2)
    if fits:
        return ref
    model.to(device)
    kl_set = P.PairSet(data.heldout.rendered[:cfg.kl_pairs], data.heldout.pad_id)
    # the same numerics as the update (bf16 autocast on CUDA), so the step-0 log-ratio is 0 up to noise
    bf16 = torch.device(device).type == "cuda" and cfg.dtype != "fp32"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        ref = _reference_tables(model, data, kl_set, cfg, device)
    if rank == 0:
        save_reference(store, prefix, ref["train"], ref["heldout"], ref["heldout_reply_logp"],
                       {"average_log_prob": cfg.average_log_prob, "pairs": len(data.train)})
    return ref


def _reference_tables(model, data: PairData, kl_set: P.PairSet, cfg: AlignConfig, device) -> dict:
    return {"train": reference_logprobs(model, data.train, average=cfg.average_log_prob, batch_size=cfg.eval_batch_size,
                                       device=device),
           "heldout": reference_logprobs(model, data.heldout, average=cfg.average_log_prob,
                                         batch_size=cfg.eval_batch_size, device=device),
           "heldout_reply_logp": reference_reply_logprobs(model, kl_set, batch_size=cfg.eval_batch_size, device=device)}


def build_align(job: PostTrainJob, base, tokenizer, ctx) -> StageParts:
    cfg = AlignConfig.model_validate(job.config)
    parts = StageParts(base, cfg)
    if ctx is None:  # the driver: export only
        return parts
    from moeflow.platform.train.distributed import open_store

    data = load_pairs(job.data_uris["preference"], tokenizer, cfg, cfg.seq_len)
    if ctx.rank == 0:
        log.info("align data: %s", data.stats)
    ref = ensure_reference(open_store(job.store_uri), f"{job.output_prefix.strip('/')}/{REFERENCE_DIR}", base, data,
                           cfg, rank=ctx.rank, device=ctx.device)
    data.train.reference, data.heldout.reference = ref["train"], ref["heldout"]
    kl_set = P.PairSet(data.heldout.rendered[:cfg.kl_pairs], data.heldout.pad_id, ref["heldout"][:cfg.kl_pairs])
    parts.loader = PackedRowLoader(data.train, batch_size=cfg.micro_batch_size, seed=cfg.seed, rank=ctx.rank,
                                   world_size=ctx.world_size)
    parts.objective = DPOObjective(cfg)

    def evaluate(m) -> dict[str, float]:
        device = next(m.parameters()).device
        figures = evaluate_preferences(m, data.heldout, [], cfg, batch_size=cfg.eval_batch_size, device=device,
                                       with_kl=False)
        kl = evaluate_preferences(m, kl_set, ref["heldout_reply_logp"], cfg, batch_size=cfg.eval_batch_size,
                                  device=device)
        return {**figures, "kl_to_reference": kl["kl_to_reference"]}

    parts.evaluate = evaluate
    return parts


# ------------------------------------------------------------------ the library entry
def build_rl_stage(job: PostTrainJob, base, tokenizer, ctx) -> StageParts:
    """The engine's builder for ``method: grpo | ppo``: the align config, validated, to ``rl.build_rl``."""
    return build_rl(AlignConfig.model_validate(job.config), job, base, tokenizer, ctx)


@dataclass
class AlignResult(StageResult):
    reference_uri: str | None = None  # the stored reference log-probs


def run_align(config: AlignConfig | dict, store, *, model_uri: str, data_uri: str, output_prefix: str,
              tracker=None, catalog=None, parent_model_id: str | None = None, model_name: str = "moe-align",
              run_name: str = "align", num_workers: int = 1, use_gpu: bool = False,
              extra_job: dict | None = None) -> AlignResult:
    """Align ``model_uri`` (an HF export; also the reference) on the preference pairs (dpo) or the prompts with
    answers/tests (grpo, ppo) at ``data_uri``."""
    cfg = config if isinstance(config, AlignConfig) else AlignConfig.model_validate(config)
    rl = cfg.method in RL_METHODS
    job = PostTrainJob(stage="align", builder=RL_BUILDER if rl else BUILDER, config=cfg.to_dict(), model_uri=model_uri,
                       output_prefix=output_prefix, data_uris={"prompt" if rl else "preference": data_uri},
                       parent_model_id=parent_model_id, model_name=model_name, run_name=run_name, **(extra_job or {}))
    result = run_posttrain(job, store, tracker=tracker, catalog=catalog, num_workers=num_workers, use_gpu=use_gpu)
    ref_prefix = f"{output_prefix.strip('/')}/{REFERENCE_DIR}"
    return AlignResult.from_posttrain(
        result, reference_uri=store.uri(ref_prefix) if store.artifact_exists(ref_prefix) else None)
