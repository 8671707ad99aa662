"""Text normalisation: Unicode NFC, line endings, control characters, encoding errors.

Readers decode bytes with ``errors="replace"`` and record how many bytes were invalid
(``metadata["encoding_errors"]``); this step counts them and excludes a document whose
share of replacement characters is above ``max_encoding_error_ratio`` (mostly binary or
mis-declared encodings). Control characters other than tab and newline are removed, as
are the byte-order mark and form feeds, because downstream steps (line-based quality
rules, the tokenizer) treat them as noise. Empty documents (whitespace only after
normalisation) are excluded here, so no later step has to think about them.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from pydantic import Field

from moeflow.platform.config import StageConfig

from .schema import BatchResult, Document, Excluded

STEP = "normalize"

# C0/C1 controls except \t and \n (\r is handled as a line ending first), plus DEL, BOM, and
# the Unicode line/paragraph separators that would otherwise survive as invisible breaks.
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u2028\u2029]")


class NormalizeConfig(StageConfig):
    form: Literal["NFC", "NFD", "NFKC", "NFKD"] = Field("NFC", description="Unicode normal form")
    max_encoding_error_ratio: float = Field(0.01, ge=0.0, le=1.0, description="max replacement chars / chars")
    strip_trailing_whitespace: bool = Field(False, description="strip whitespace at the end of every line")


def count_decode_errors(raw: bytes, decoded: str) -> int:
    """Replacement characters introduced by decoding ``raw`` with errors='replace'."""
    return decoded.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


def decode_bytes(raw: bytes) -> tuple[str, int]:
    """UTF-8 decode that never fails; returns (text, number of invalid sequences)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, max(0, count_decode_errors(raw, text))


def normalize_text(text: str, form: str = "NFC", strip_trailing_whitespace: bool = False) -> tuple[str, int]:
    """Returns (normalised text, number of control characters removed)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, num_controls = _CONTROL_RE.subn("", text)
    text = unicodedata.normalize(form, text)
    if strip_trailing_whitespace:
        text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text, num_controls


def normalize_batch(docs: list[Document], cfg: NormalizeConfig) -> BatchResult:
    out = BatchResult(kept=[])
    counters = {"encoding_errors": 0, "docs_with_encoding_errors": 0, "control_chars_removed": 0, "docs_changed": 0}
    for doc in docs:
        num_errors = int(doc.metadata.get("encoding_errors", 0))
        counters["encoding_errors"] += num_errors
        counters["docs_with_encoding_errors"] += num_errors > 0
        text, num_controls = normalize_text(doc.text, cfg.form, cfg.strip_trailing_whitespace)
        counters["control_chars_removed"] += num_controls
        if not text.strip():
            out.excluded.append(Excluded(doc, STEP, "empty", "no text after normalisation"))
            continue
        ratio = num_errors / max(1, len(doc.text))
        if ratio > cfg.max_encoding_error_ratio:
            detail = f"{num_errors} invalid UTF-8 sequences ({ratio:.1%} of chars)"
            out.excluded.append(Excluded(doc, STEP, "encoding_errors", detail))
            continue
        if text != doc.text:
            counters["docs_changed"] += 1
            doc = Document(doc.id, text, doc.source, doc.metadata)
        out.kept.append(doc)
    out.counters = counters
    return out
