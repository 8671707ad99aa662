"""Rewards for online RL: small named objects, composed with weights.

Each reward maps a batch of ``Sample``s to one float per sample; ``CompositeReward`` sums them with
weights and reports every term's mean (logged as ``reward/<name>``). The terms:

* ``exact_match`` — 1 when the reply, whitespace-stripped, equals the prompt's exact answer (the
  generated arithmetic/algorithmic prompts); what the headline accuracy measures too;
* ``code`` — the reply's Python (its first fenced block, else the whole reply) followed by the prompt's
  ``tests`` runs in the evaluation sandbox (``platform/eval/sandbox.py``: own uid, rlimits, no network,
  a time limit); 1 when it exits cleanly — the "code interpreter" reward;
* ``reward_model`` — the learned Bradley–Terry reward (``platform/posttrain/reward.py``), loaded once from a
  model reference (``moe-reward@reward``, a catalog id or a store URI) and applied to prompt + reply;
* ``fluency`` — exp(mean log p) of the reply under a reference LM (the frozen RL reference by default):
  the geometric-mean token probability, in (0, 1], high for replies the reference finds natural;
* ``format`` — 1 when the reply ended with a stop token (not cut at the length limit) and is non-empty;
* ``length`` — −(reply tokens / max_new_tokens), a brevity pressure in [−1, 0].
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

NAMES = ("exact_match", "code", "reward_model", "fluency", "format", "length")


@dataclass
class Sample:
    prompt: list[dict]            # chat messages ending with the user turn
    completion: str               # decoded reply, stop tokens removed
    prompt_ids: list[int]
    completion_ids: list[int]     # as generated (a final stop token included)
    finished: bool                # ended with a stop token
    answer: str | None = None
    tests: Any = None


class Reward(Protocol):
    name: str

    def __call__(self, samples: Sequence[Sample]) -> list[float]: ...


# ------------------------------------------------------------------ the terms
def normalise_answer(text: str) -> str:
    return " ".join(text.split())


class ExactMatch:
    name = "exact_match"

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        return [float(s.answer is not None and normalise_answer(s.completion) == normalise_answer(s.answer))
                for s in samples]


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_code(reply: str) -> str:
    match = _FENCE.search(reply)
    return match.group(1) if match else reply


class CodeExecution:
    """``tests`` of a prompt: Python source run after the reply's code (asserts; a non-zero exit fails)."""

    name = "code"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 256, max_workers: int | None = None) -> None:
        from moeflow.platform.eval.sandbox import SandboxLimits

        self.limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
        self.max_workers = max_workers

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        from moeflow.platform.eval.sandbox import SandboxJob, run_many

        runnable = [i for i, s in enumerate(samples) if isinstance(s.tests, str) and s.tests.strip()]
        jobs = [SandboxJob(f"{extract_code(samples[i].completion)}\n\n{samples[i].tests}\n") for i in runnable]
        results = run_many(jobs, limits=self.limits, max_workers=self.max_workers) if jobs else []
        scores = [0.0] * len(samples)
        for i, r in zip(runnable, results):
            scores[i] = float(r.status == "ok")
        return scores


class RewardModelScore:
    """The learned reward of prompt + reply, rendered with the chat template of the reward model's tokenizer."""

    name = "reward_model"

    def __init__(self, model, tokenizer, *, batch_size: int = 16, device="cpu") -> None:
        self.model, self.tokenizer, self.batch_size, self.device = model.eval(), tokenizer, batch_size, device

    @classmethod
    def from_ref(cls, ref: str, *, store=None, catalog=None, device="cpu") -> "RewardModelScore":
        from moeflow.platform import model_refs

        from .reward import load_reward_model

        resolved = model_refs.resolve(ref, store=store, catalog=catalog)
        model, tokenizer = load_reward_model(resolved.require_hf(), store=store, device=device)
        return cls(model, tokenizer, device=device)

    @torch.no_grad()
    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        from moeflow.models.chat import render_ids

        rows = [render_ids(self.tokenizer, list(s.prompt) + [{"role": "assistant", "content": s.completion}]).ids
                for s in samples]
        scores: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            ids_BT = torch.full((len(chunk), max(len(r) for r in chunk)), self.tokenizer.pad_id, dtype=torch.long)
            for b, r in enumerate(chunk):
                ids_BT[b, :len(r)] = torch.tensor(r)
            lengths_B = torch.tensor([len(r) for r in chunk])
            out = self.model(ids_BT.to(self.device), lengths_B.to(self.device))
            scores += out.rewards_B.float().cpu().tolist()
        return scores


class Fluency:
    """exp(mean log-prob) of the reply tokens under ``lm`` (teacher-forced on prompt + reply)."""

    name = "fluency"

    def __init__(self, lm, *, pad_id: int, batch_size: int = 16) -> None:
        self.lm, self.pad_id, self.batch_size = lm, pad_id, batch_size

    @torch.no_grad()
    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        from moeflow.models.align.rollout import pack_rollout, policy_pass

        device = next(self.lm.parameters()).device
        out: list[float] = []
        for i in range(0, len(samples), self.batch_size):
            chunk = samples[i:i + self.batch_size]
            packed = pack_rollout([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk], None, None,
                                  pad_id=self.pad_id)
            logp_BT = policy_pass(self.lm, packed.input_ids_BT.to(device), packed.targets_BT.to(device),
                                  with_losses=False).logp_BT.cpu()
            m = packed.completion_mask_BT.float()
            mean_B = (logp_BT * m).sum(1) / m.sum(1).clamp_min(1)
            out += [float(torch.exp(v)) if n > 0 else 0.0 for v, n in zip(mean_B, m.sum(1))]
        return out


class FormatReward:
    name = "format"

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        return [float(s.finished and bool(s.completion.strip())) for s in samples]


class LengthPenalty:
    name = "length"

    def __init__(self, max_new_tokens: int) -> None:
        self.max_new_tokens = max(1, max_new_tokens)

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        return [-len(s.completion_ids) / self.max_new_tokens for s in samples]


# ------------------------------------------------------------------ composition
@dataclass
class RewardBreakdown:
    total: list[float]
    means: dict[str, float] = field(default_factory=dict)   # name -> mean of the UNWEIGHTED term


class CompositeReward:
    """Σ_i w_i · reward_i(sample); ``means`` reports each term unweighted (what it measures)."""

    def __init__(self, terms: Sequence[tuple[Reward, float]]) -> None:
        if not terms:
            raise ValueError("a composite reward needs at least one term")
        names = [r.name for r, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be distinct, got {names}")
        self.terms = list(terms)

    def __call__(self, samples: Sequence[Sample]) -> RewardBreakdown:
        total = [0.0] * len(samples)
        means: dict[str, float] = {}
        for reward, weight in self.terms:
            values = reward(samples)
            if len(values) != len(samples):
                raise ValueError(f"reward {reward.name!r} returned {len(values)} values for {len(samples)} samples")
            means[reward.name] = sum(values) / max(1, len(values))
            total = [t + weight * v for t, v in zip(total, values)]
        return RewardBreakdown(total, means)


def build_rewards(weights: dict[str, float], *, max_new_tokens: int, reference_lm=None, pad_id: int = 0,
                  reward_model: str | None = None, store=None, catalog=None, device="cpu",
                  code_timeout_s: float = 5.0) -> CompositeReward:
    """The composite of ``weights`` (name -> weight; names from ``NAMES``; zero weights are dropped)."""
    terms: list[tuple[Reward, float]] = []
    for name, weight in weights.items():
        if weight == 0:
            continue
        if name == "exact_match":
            terms.append((ExactMatch(), weight))
        elif name == "code":
            terms.append((CodeExecution(timeout_s=code_timeout_s), weight))
        elif name == "reward_model":
            if not reward_model:
                raise ValueError("the reward_model reward needs align.reward_model (e.g. 'moe-reward@reward')")
            terms.append((RewardModelScore.from_ref(reward_model, store=store, catalog=catalog, device=device), weight))
        elif name == "fluency":
            if reference_lm is None:
                raise ValueError("the fluency reward needs a reference LM")
            terms.append((Fluency(reference_lm, pad_id=pad_id), weight))
        elif name == "format":
            terms.append((FormatReward(), weight))
        elif name == "length":
            terms.append((LengthPenalty(max_new_tokens), weight))
        else:
            raise ValueError(f"unknown reward {name!r}: choose from {', '.join(NAMES)}")
    return CompositeReward(terms)
