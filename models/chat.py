"""The one chat template: messages -> token ids + the loss mask, and the same format as Jinja.

A conversation renders as::

    <|bos|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{assistant}<|end|>...

Every marker is a special token inserted by id; message text is encoded with
``allow_special=False``, so a user who types ``"<|end|>"`` gets ordinary bytes, never a marker.
The assistant's text *and its closing* ``<|end|>`` are targets (the model must learn to stop,
trl#1623); markers, system and user tokens are not. A generation prompt ends with
``<|assistant|>``; generation stops at ``<|end|>`` (or ``<|eos|>``).

``CHAT_TEMPLATE_JINJA`` is the same format for the Hugging Face export's ``chat_template``: a
tokenizer built from the export renders the identical string (tested against ``render_text``).
Training, evaluation, serving and the export all use this module.

Shape note: lists of token ids, no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .tokenizer import ASSISTANT, BOS, END, SYSTEM, USER

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# Jinja for transformers' apply_chat_template; same output as render_text (see tests).
CHAT_TEMPLATE_JINJA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ message['content'] }}{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (unknown role, non-string content, ...)."""


@dataclass
class RenderedChat:
    ids: list[int]        # the whole conversation
    loss_mask: list[int]  # 1 where ids[i] is a training target (assistant text + its <|end|>)


def validate_messages(messages: Any) -> list[dict]:
    """The messages as a list of ``{"role", "content"}`` dicts, or a ChatFormatError naming the problem."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role={role!r}: must be one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def render_text(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text with literal markers (what the Jinja template produces)."""
    parts = [BOS]
    for m in validate_messages(list(messages)):
        parts += [ROLES[m["role"]], m["content"], END]
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def render_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> RenderedChat:
    """Token ids and loss mask of a conversation (see the module docstring for what is a target)."""
    messages = validate_messages(list(messages))
    sid = tokenizer.special_ids
    texts = tokenizer.encode_batch([m["content"] for m in messages], add_bos=False, add_eos=False)
    ids, mask = [sid[BOS]], [0]
    for m, content_ids in zip(messages, texts):
        target = 1 if m["role"] == "assistant" else 0
        ids.append(sid[ROLES[m["role"]]])
        mask.append(0)
        ids += content_ids
        mask += [target] * len(content_ids)
        ids.append(sid[END])
        mask.append(target)
    if add_generation_prompt:
        ids.append(sid[ASSISTANT])
        mask.append(0)
    return RenderedChat(ids, mask)


def prompt_ids(tokenizer, prompt: str | Sequence[dict], system: str | None = None) -> list[int]:
    """Ids of a generation prompt: a user string (optionally with a system message) or messages."""
    if isinstance(prompt, str):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
    return render_ids(tokenizer, messages, add_generation_prompt=True).ids


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn."""
    return [tokenizer.special_ids[END], tokenizer.eos_id]
