"""The reward stage: preference pairs + a model version -> a Bradley–Terry reward model, exported for RL/eval.

The reward model is the input model version with a scalar head (``models.align.reward.RewardModel``)
on the last real token of ``prompt + reply`` (that token is the reply's closing ``<|end|>``). Both
sides of a batch of pairs go through one forward (chosen rows first). With ``likelihood_feature`` the head
also reads the model's own mean log-probability of the reply (see ``models/align/reward.py`` for why: on
the generated pairs a small SFT policy judges wrong numbers through its next-token predictions, which its
last hidden state does not carry). It trains on the engine core (``engine.py``: resume, router-bias
update, expert load, checkpoints) like every post-training stage.

Export: the HF export of the LM (an ordinary ``DeepseekV3ForCausalLM`` folder) plus ``reward_head.pt``
(the head's weight and bias, and the likelihood weight + ``<|assistant|>`` id when used); ``load_reward_model`` turns such a folder (or its store URI) back into a
``RewardModel`` — how the RL stage and evaluation load it by registry alias (``<name>@reward``).

Headline figures on held-out pairs, before (the freshly initialised head) and after training:
``accuracy`` (share of pairs with r_c > r_r; ties lose) and ``margin`` (mean r_c − r_r).

Shape suffixes: P pairs, R rows (2 per pair).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import Field

from moeflow.models.align import pairs as P
from moeflow.models.align.reward import HEAD_FILE, RewardModel, bradley_terry_loss
from moeflow.models.align.sft import PackedRowLoader
from moeflow.platform.config import StageConfig

from .pairs import PairDataConfig, load_pairs
from .engine import ObjectiveOutput, PostTrainConfig, PostTrainJob, StageParts, StageResult, run_posttrain

log = logging.getLogger(__name__)


BUILDER = "moeflow.platform.posttrain.reward:build_reward"


class BTLossConfig(StageConfig):
    """The Bradley–Terry loss (see ``moeflow.models.align.reward``)."""

    margin: float = Field(0.0, ge=0.0, le=10.0, description="m in −log σ(r_c − r_r − m): demand a reward gap")
    centering: float = Field(0.0, ge=0.0, le=1.0, description="c · mean((r_c + r_r)²): keeps rewards centred "
                                                              "near 0 (TRL's center_rewards_coefficient, e.g. 0.01)")


class RewardConfig(PostTrainConfig, PairDataConfig, BTLossConfig):
    """Reward-model training: the loop (``PostTrainConfig``), the pairs it reads and the Bradley–Terry loss.

    ``micro_batch_size`` counts pairs (each is two rows); ``seq_len`` is the longest side kept.
    """

    seq_len: int = Field(256, ge=8, le=1_048_576, description="longest pair side in tokens (longer pairs are dropped)")
    lr: float = Field(3e-4, gt=0, le=1.0, description="peak learning rate")
    likelihood_feature: bool = Field(False, description="the head also reads the LM's mean log-probability of the "
                                                        "reply (weight learned from 1): carries what the input "
                                                        "policy already knows token by token")

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Token capacity of a step: both sides of every pair at ``seq_len`` (batches pad to their longest row)."""
        return 2 * super().tokens_per_step(world_size)


def reward_step_loss(model, batch: dict[str, torch.Tensor], loss: BTLossConfig, *, with_losses: bool = True):
    """(Bradley–Terry loss (attached, balancing losses NOT added), reward output, metrics) of a micro-batch."""
    out = model(batch["input_ids"], batch["lengths"], with_losses=with_losses)
    B = P.num_pairs(batch)
    bt = bradley_terry_loss(out.rewards_B[:B], out.rewards_B[B:], margin=loss.margin, centering=loss.centering)
    return bt.loss, out, bt.metric_tensors()


class RewardObjective:
    """The engine-core objective: a mean over pairs; the balancing losses travel in ``aux``."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg

    def count(self, batch: dict) -> torch.Tensor:
        return torch.tensor(P.num_pairs(batch))

    def __call__(self, model, batch: dict) -> ObjectiveOutput:
        loss, out, metrics = reward_step_loss(model, batch, self.cfg)
        aux = {k: out.aux[k] for k in ("tokens_per_expert", "router_entropy") if k in out.aux}
        if out.balance_loss is not None:
            aux["balance_loss"] = out.balance_loss
        return ObjectiveOutput(loss, aux, metrics)


@torch.no_grad()
def evaluate_rewards(model, heldout: P.PairSet, *, batch_size: int = 8, device="cpu") -> dict[str, float]:
    """Held-out pairwise ``accuracy`` and mean ``margin`` (plus the mean rewards of each side)."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for batch in heldout.batches(batch_size):
        rewards_R = model(batch["input_ids"].to(device), batch["lengths"].to(device)).rewards_B
        B = P.num_pairs(batch)
        chosen.append(rewards_R[:B].cpu())
        rejected.append(rewards_R[B:].cpu())
    model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"accuracy": float((c > r).float().mean()), "margin": float((c - r).mean()),
            "reward_chosen": float(c.mean()), "reward_rejected": float(r.mean()), "pairs": float(len(c))}


# ------------------------------------------------------------------ export / load
def save_head(model: RewardModel, hf_dir: Path) -> None:
    torch.save(model.head_state(), Path(hf_dir) / HEAD_FILE)


def load_reward_model(source: str | Path, *, store=None, device="cpu") -> tuple[RewardModel, object]:
    """(RewardModel, Tokenizer) from a reward export: a local folder or a store URI of one.

    The RL stage and evaluation resolve ``<name>@reward`` with ``platform.model_refs.resolve`` and pass the URI.
    """
    import tempfile

    local = Path(source)
    if not local.is_dir():
        if store is None:
            from moeflow.platform.store import store_for_uri

            store, key = store_for_uri(str(source))
            source = key
        # the export lives only while loading (the model is in memory afterwards): no copy left in the temp dir
        with tempfile.TemporaryDirectory(prefix="moeflow-reward-") as tmp:
            return _load_reward_dir(store.read_artifact(str(source)).download(Path(tmp)), source, device)
    return _load_reward_dir(local, source, device)


def _load_reward_dir(local: Path, source, device) -> tuple[RewardModel, object]:
    from moeflow.models import hf
    from moeflow.models.tokenizer import Tokenizer

    if not (local / HEAD_FILE).is_file():
        raise FileNotFoundError(f"{source}: no {HEAD_FILE} — not a reward model export")
    state = torch.load(local / HEAD_FILE, map_location="cpu", weights_only=True)
    model = RewardModel(hf.import_hf(local, device=device), reply_start_id=state.get("reply_start_id"))
    model.load_head_state(state)
    return model.to(device), Tokenizer.from_file(local / "tokenizer.json")


def reply_start_id(tokenizer) -> int:
    """The chat template's ``<|assistant|>`` id: a reply is what follows its last occurrence."""
    from moeflow.models.tokenizer import ASSISTANT

    return int(tokenizer.special_ids[ASSISTANT])


# ------------------------------------------------------------------ the builder (every rank, and the driver)
def build_reward(job: PostTrainJob, base, tokenizer, ctx) -> StageParts:
    cfg = RewardConfig.model_validate(job.config)
    torch.manual_seed(cfg.seed)  # the head's init: the same on every rank and on resume
    model = RewardModel(base, reply_start_id=reply_start_id(tokenizer) if cfg.likelihood_feature else None)
    parts = StageParts(model, cfg, export_model=lambda m: m.lm, extra_export_files=save_head)
    if ctx is None:  # the driver: export only
        return parts
    data = load_pairs(job.data_uris["preference"], tokenizer, cfg, cfg.seq_len)
    if ctx.rank == 0:
        log.info("reward data: %s", data.stats)
    parts.loader = PackedRowLoader(data.train, batch_size=cfg.micro_batch_size, seed=cfg.seed, rank=ctx.rank,
                                   world_size=ctx.world_size)
    parts.objective = RewardObjective(cfg)

    def evaluate(m) -> dict[str, float]:
        figures = evaluate_rewards(m, data.heldout, batch_size=cfg.eval_batch_size, device=next(m.parameters()).device)
        return {**figures, "train_pairs": float(data.stats["train_pairs"])}

    parts.evaluate = evaluate
    return parts


# ------------------------------------------------------------------ the library entry
class RewardResult(StageResult):
    pass


def run_reward(config: RewardConfig | dict, store, *, model_uri: str, data_uri: str, output_prefix: str,
               tracker=None, catalog=None, parent_model_id: str | None = None, model_name: str = "moe-reward",
               run_name: str = "reward", num_workers: int = 1, use_gpu: bool = False,
               extra_job: dict | None = None) -> RewardResult:
    """Train a reward model from ``model_uri`` (an HF export) on the preference pairs at ``data_uri``."""
    cfg = config if isinstance(config, RewardConfig) else RewardConfig.model_validate(config)
    job = PostTrainJob(stage="reward", builder=BUILDER, config=cfg.to_dict(), model_uri=model_uri,
                       output_prefix=output_prefix, data_uris={"preference": data_uri},
                       parent_model_id=parent_model_id, model_name=model_name, run_name=run_name, **(extra_job or {}))
    result = run_posttrain(job, store, tracker=tracker, catalog=catalog, num_workers=num_workers, use_gpu=use_gpu)
    return RewardResult.from_posttrain(result)
