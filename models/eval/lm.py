"""``ModelLM``: one object that scores and generates text for a moeflow model + tokenizer.

The three calls lm-eval-harness defines, over our model:

* ``loglikelihood(pairs)``: (context text, continuation text) -> (log p, is_greedy); the text is
  split as ``prompts.continuation_pair`` says;
* ``loglikelihood_rolling(texts)``: total log p of each text's tokens after BOS (rolling windows);
* ``generate(prompts_ids, ...)``: completions as text, cut at stop strings, through the batched
  latent-cache ``models.generation.generate`` (left padding + attention mask).

Our own tasks and the lm-eval adapter (``platform/eval/lm_harness.py``) both call it, so a score
is computed one way whichever harness asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from moeflow.models.chat import stop_ids
from moeflow.models.generation import generate

from .extract import truncate_at_stop
from .loglik import ContinuationScore, score_continuations, score_documents
from .prompts import continuation_pair


@dataclass
class ModelLM:
    model: torch.nn.Module
    tokenizer: object
    batch_size: int = 8
    max_len: int | None = None  # default: the model's max_seq_len

    def __post_init__(self) -> None:
        self.model.eval()
        self.max_len = self.max_len or self.model.cfg.max_seq_len

    # ------------------------------------------------------------------ scoring
    def score_ids(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[ContinuationScore]:
        return score_continuations(self.model, requests, batch_size=self.batch_size, max_len=self.max_len,
                                   pad_id=self.tokenizer.pad_id)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        requests = [continuation_pair(self.tokenizer, ctx, cont) for ctx, cont in pairs]
        return [(s.logprob, s.is_greedy) for s in self.score_ids(requests)]

    def loglikelihood_rolling(self, texts: Sequence[str], stride: int | None = None) -> list[float]:
        docs = [self.tokenizer.encode(t, add_bos=True) for t in texts]
        return score_documents(self.model, docs, max_len=self.max_len, stride=stride, batch_size=self.batch_size,
                               pad_id=self.tokenizer.pad_id)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                 stop_at_end_of_turn: bool = True) -> list[str]:
        """Completions as text (special tokens dropped), each cut at its first stop string.

        ``max_new_tokens`` is capped at half the context (a small model's 128 tokens must still hold
        a prompt); prompts longer than the rest keep their last tokens (the task's question is at the
        end). Rows are generated ``batch_size`` at a time.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        max_new_tokens = min(max_new_tokens, self.max_len // 2)
        room = self.max_len - max_new_tokens
        stops = stop_ids(self.tokenizer) if stop_at_end_of_turn else [self.tokenizer.eos_id]
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = [list(p)[-room:] for p in prompts[start:start + self.batch_size]]
            res = generate(self.model, batch, max_new_tokens, temperature=temperature, top_p=top_p,
                           stop_token_ids=stops, seed=None if seed is None else seed + start,
                           pad_id=self.tokenizer.pad_id)
            out += [truncate_at_stop(self.tokenizer.decode(t, skip_special=True), stop) for t in res.tokens]
        return out
