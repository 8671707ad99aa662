"""Answers from generated text: stop strings, regex / last-number extraction, normalised exact match.

Generative tasks compare an extracted answer with the reference: ``extract_answer`` applies the
task's regex (its first group if it has one, else the whole match; ``pick`` = first | last match)
or, for numeric tasks, takes the last number in the text (what arithmetic chains end with).
``normalize`` lowercases (optionally), strips surrounding whitespace and punctuation and
collapses internal whitespace; numbers lose thousands separators and a trailing ``.0`` so
"1,000" == "1000" == "1000.0".
"""

from __future__ import annotations

import re
from typing import Sequence

NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_NUMBER_FULL = re.compile(r"^-?\d[\d,]*(?:\.\d+)?$")


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def extract_answer(text: str, regex: str | None = None, pick: str = "first") -> str | None:
    """The answer in ``text`` (None when nothing matches). regex=None: the last number."""
    if pick not in ("first", "last"):
        raise ValueError(f"pick must be 'first' or 'last', got {pick!r}")
    if regex is None:
        nums = NUMBER_RE.findall(text)
        return nums[-1] if nums else None
    matches = list(re.finditer(regex, text))
    if not matches:
        return None
    m = matches[0] if pick == "first" else matches[-1]
    return m.group(1) if m.re.groups else m.group(0)


def normalize(answer: str, lowercase: bool = True) -> str:
    s = " ".join(answer.split()).strip(" .,;:!?\"'`")
    if _NUMBER_FULL.match(s):
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        if s in ("-0", ""):
            s = "0"
        return s
    return s.lower() if lowercase else s


def exact_match(prediction: str | None, reference: str, lowercase: bool = True) -> bool:
    if prediction is None:
        return False
    return normalize(prediction, lowercase) == normalize(reference, lowercase)
