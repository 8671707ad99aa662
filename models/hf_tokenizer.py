"""The tokenizer half of a Hugging Face model folder: ``tokenizer.json`` plus the files that make it usable.

``tokenizer.json`` alone loads in transformers, but as a tokenizer with no bos, eos or pad token
and no chat template, so ``generate`` never stops and ``apply_chat_template`` fails. This module
writes the rest, in the format both transformers 4.x and 5.x (and vLLM) read:

    tokenizer_config.json    tokenizer_class PreTrainedTokenizerFast, bos/eos/pad, the chat markers
                             as additional special tokens, model_max_length, chat_template
    special_tokens_map.json  the same special tokens (read by older loaders and by vLLM)

The chat template is ``models.chat.CHAT_TEMPLATE_JINJA``: ``apply_chat_template`` on the folder gives
the ids of ``models.chat.render_ids`` (tested with transformers' ``AutoTokenizer``). No BOS is added
by a post-processor: the template writes ``bos_token`` itself, and plain ``encode`` calls in our
code add BOS explicitly, so ``add_bos_token`` stays off.

Pure file writing (json + the ``tokenizers`` file); no transformers import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .chat import CHAT_TEMPLATE_JINJA
from .tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHAT_MARKERS = tuple(t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD))


def special_tokens_map() -> dict:
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": list(CHAT_MARKERS)}


def tokenizer_config(model_max_length: int) -> dict:
    """``tokenizer_config.json`` for a ``PreTrainedTokenizerFast`` over our ``tokenizer.json``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map(),
        "unk_token": None,  # byte-level BPE: every byte has a token, nothing is unknown
        "model_max_length": int(model_max_length),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decoding must give back the text exactly (byte level)
        "padding_side": "left",  # generation batches pad on the left
        "chat_template": CHAT_TEMPLATE_JINJA,
    }


def write_tokenizer_files(directory: str | os.PathLike, tokenizer: Tokenizer | str | os.PathLike, *,
                          model_max_length: int) -> list[Path]:
    """Write the tokenizer files into ``directory``; ``tokenizer`` is a Tokenizer or a tokenizer.json path.

    Refuses a tokenizer without our special tokens (``Tokenizer`` checks): the chat template and
    the special-token map would name tokens the vocabulary lacks.
    """
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_file(tokenizer)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = [tokenizer.save(out / "tokenizer.json")]
    for name, obj in (("tokenizer_config.json", tokenizer_config(model_max_length)),
                      ("special_tokens_map.json", special_tokens_map())):
        path = out / name
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written
