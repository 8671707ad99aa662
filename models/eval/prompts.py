"""Prompts for evaluation tasks: multiple choice and generation, few-shot, plain text or the chat template.

Plain format (lm-eval's convention)::

    {shot question}\n{answer prefix} {shot answer}\n\n ... {question}\n{answer prefix}

and the scored continuation is ``" " + choice``. Chat format: each shot is a user turn and an
assistant turn of the one chat template (``models/chat.py``), the question a user turn, then the
generation prompt ``<|assistant|>``; the continuation is the choice as assistant text.

Context and continuation are tokenized separately (the context with BOS, the continuation
without), with the context's trailing whitespace moved to the continuation, so that every choice
of an item shares exactly the same context ids and a choice is never merged with the last
context token — the scores of the choices are then comparable. This is lm-eval's split, done
without re-tokenizing the joined string.

``acc`` picks the choice with the highest summed log-likelihood; ``acc_norm`` divides it by the
continuation's length in characters first (lm-eval's per-character normalisation), which removes
the bias towards short answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from moeflow.models.chat import prompt_ids, render_ids


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"multiple choice item needs >= 2 choices, got {len(self.choices)}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index {self.answer} outside the {len(self.choices)} choices")


@dataclass(frozen=True)
class PromptFormat:
    chat: bool = False
    answer_prefix: str = "Answer:"
    system: str | None = None
    shot_separator: str = "\n\n"
    fewshot: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (question, answer) pairs


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped):] + continuation


def plain_context(question: str, fmt: PromptFormat) -> str:
    shots = [f"{q}\n{fmt.answer_prefix} {a}" for q, a in fmt.fewshot]
    return fmt.shot_separator.join([*shots, f"{question}\n{fmt.answer_prefix}"])


def chat_messages(question: str, fmt: PromptFormat) -> list[dict]:
    msgs = [{"role": "system", "content": fmt.system}] if fmt.system else []
    for q, a in fmt.fewshot:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": question}]


def context_ids(tokenizer, question: str, fmt: PromptFormat) -> list[int]:
    """Ids of the prompt a generation continues (plain: with BOS; chat: ends with <|assistant|>)."""
    if fmt.chat:
        return prompt_ids(tokenizer, chat_messages(question, fmt))
    ctx, _ = split_trailing_space(plain_context(question, fmt), "")
    return tokenizer.encode(ctx, add_bos=True)


def continuation_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS, continuation ids) of a plain text pair, split as the module says."""
    ctx, cont = split_trailing_space(context, continuation)
    return tokenizer.encode(ctx, add_bos=True), tokenizer.encode(cont, add_bos=False)


def choice_strings(item: MCItem, fmt: PromptFormat) -> list[str]:
    """The continuation text scored for each choice (plain: with its leading space)."""
    return [c if fmt.chat else f" {c}" for c in item.choices]


def mc_requests(tokenizer, item: MCItem, fmt: PromptFormat) -> list[tuple[list[int], list[int]]]:
    """One (context ids, continuation ids) request per choice; every choice shares the context ids."""
    if fmt.chat:
        ctx = render_ids(tokenizer, chat_messages(item.question, fmt), add_generation_prompt=True).ids
        return [(ctx, tokenizer.encode(c, add_bos=False)) for c in choice_strings(item, fmt)]
    context = plain_context(item.question, fmt)
    return [continuation_pair(tokenizer, context, c) for c in choice_strings(item, fmt)]


def mc_predictions(logprobs: Sequence[float], continuations: Sequence[str]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction): argmax of the sum, argmax of the sum per character.

    Ties go to the lowest index (numpy/lm-eval argmax), so a model that scores every choice the
    same is right only when the answer is the first choice.
    """
    if len(logprobs) != len(continuations) or not logprobs:
        raise ValueError("mc_predictions: one log-probability per choice is needed")
    acc = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))
    norm = [lp / max(1, len(c)) for lp, c in zip(logprobs, continuations)]
    acc_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return acc, acc_norm
