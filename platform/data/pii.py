"""PII redaction: emails, IP addresses, phone numbers, card numbers, API keys and secrets.

Each kind is a regex that finds candidates plus, where a regex alone over-matches, a
validator: IP addresses must parse with ``ipaddress`` (private, loopback and unspecified
addresses are left alone by default — ``127.0.0.1`` in code is not personal data),
card-like digit runs must pass the Luhn check, and generic ``key = value`` assignments
must look random (Shannon entropy of the value at least ``min_secret_entropy`` bits per
character), so ``password = "changeme"`` stays and ``api_key = "9fQ2...x7Lk"`` goes.

Kinds are applied in a fixed order, most specific first (a private-key block contains
base64 that the generic secret rule would also see). Matches are replaced by a
placeholder such as ``<EMAIL>``; the step counts replacements per kind.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from typing import Callable, Literal

from pydantic import Field, field_validator

from moeflow.platform.config import StageConfig

from .choices import check_choices
from .schema import BatchResult, Document

STEP = "pii"

PLACEHOLDERS = {
    "private_key": "<PRIVATE_KEY>",
    "aws_access_key": "<AWS_ACCESS_KEY>",
    "aws_secret_key": "<SECRET>",
    "github_token": "<GITHUB_TOKEN>",
    "api_key": "<API_KEY>",
    "secret": "<SECRET>",
    "email": "<EMAIL>",
    "credit_card": "<CREDIT_CARD>",
    "ipv4": "<IP_ADDRESS>",
    "ipv6": "<IP_ADDRESS>",
    "phone": "<PHONE>",
}
ALL_KINDS = list(PLACEHOLDERS)
PIIKind = Literal["private_key", "aws_access_key", "aws_secret_key", "github_token", "api_key", "secret", "email",
                  "credit_card", "ipv4", "ipv6", "phone"]  # == ALL_KINDS (tests check it)


class PIIConfig(StageConfig):
    kinds: list[PIIKind] = Field(default_factory=lambda: list(ALL_KINDS), description="kinds of PII to redact")
    skip_private_ips: bool = Field(True, description="leave private, loopback and link-local IP addresses alone")
    min_secret_entropy: float = Field(3.0, ge=0.0, le=8.0, description="min Shannon entropy (bits/char) of a key = value secret")
    min_secret_length: int = Field(16, ge=1, le=4096, description="min length of a key = value secret")

    @field_validator("kinds", mode="before")
    @classmethod
    def _known_kinds(cls, value):
        return check_choices(value, ALL_KINDS, "PII kind")


# Candidate patterns start with a character class or literal (no leading look-behind), so
# the regex engine can skip ahead fast; word boundaries are checked in Python on the few
# candidates (``_bounded``). A look-behind first makes these ~10x slower on code.
_PATTERNS: dict[str, re.Pattern] = {
    "private_key": re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
        re.DOTALL,
    ),
    "aws_access_key": re.compile(r"(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}"),
    "aws_secret_key": re.compile(r"(?i)(aws_?secret_?(?:access_?)?key\s*[:=]\s*[\"']?)([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"),
    "github_token": re.compile(r"gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"),
    "api_key": re.compile(r"sk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{20,}"),
    "secret": re.compile(
        r"(?i)((?:api[_-]?key|secret|token|passw(?:or)?d|access[_-]?key|auth)[\w.-]*[\"']?\s*[:=]\s*[\"']?)"
        r"([A-Za-z0-9_\-+/=.]{8,})"
    ),
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b"),
    "credit_card": re.compile(r"\d[\d -]{11,}\d"),
    "ipv4": re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"),
    "ipv6": re.compile(r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}"),
    "phone": re.compile(r"[+(\d][\d ().+-]{8,}\d"),
}
# Within a phone candidate (a run of digits and separators), the real phone shapes.
_PHONE_RE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{3})[ .-]\d{3}[ .-]\d{4}(?!\w)"
    r"|(?<![\w+])\+\d{1,3}(?:[ .-]\d{2,4}){2,4}(?!\w)"
)
# characters that may not touch a match on the (left, right) for it to count as a token
_BOUNDARY = {
    "aws_access_key": ("A-Z0-9", "A-Z0-9"),
    "github_token": ("\\w", "\\w"),
    "api_key": ("\\w-", "\\w-"),
    "email": ("\\w.+-", ""),
    "credit_card": ("\\w.,-", "\\w-"),
    "ipv4": ("\\w.", "\\w"),
    "ipv6": ("\\w:.", "\\w:"),
}
_BOUNDARY_RE = {k: (re.compile(f"[{l}]") if l else None, re.compile(f"[{r}]") if r else None) for k, (l, r) in _BOUNDARY.items()}


_VERSION_WORDS = {"version", "ver", "v", "python", "release", "build", "rev"}


def _bounded(kind: str, m: re.Match) -> bool:
    if kind not in _BOUNDARY_RE:
        return True
    left, right = _BOUNDARY_RE[kind]
    text, i, j = m.string, m.start(), m.end()
    if left is not None and i > 0 and left.match(text[i - 1]):
        return False
    if right is not None and j < len(text) and right.match(text[j]):
        return False
    if kind in ("ipv4", "credit_card") and text[j : j + 1] in (".", ",") and text[j + 1 : j + 2].isdigit():
        return False  # 1.2.3.4.5 (a version) or 0.99999999999999995 (a decimal fraction)
    return True


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def shannon_entropy(value: str) -> float:
    """Bits per character of the empirical character distribution."""
    if not value:
        return 0.0
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def _ip_ok(text: str, skip_private: bool) -> bool:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return False
    if skip_private and (addr.is_private or addr.is_loopback or addr.is_unspecified or addr.is_link_local):
        return False
    return True


def _replace(kind: str, cfg: PIIConfig) -> Callable[[re.Match], str]:
    placeholder = PLACEHOLDERS[kind]

    def repl(m: re.Match) -> str:
        text = m.group(0)
        if not _bounded(kind, m):
            return text
        if kind == "phone":
            return _PHONE_RE.sub(placeholder, text)
        if kind == "credit_card":
            digits = re.sub(r"[ -]", "", text)
            # issuer prefixes 2-6 (Mastercard, Amex/Diners, Visa, Mastercard, Discover/UnionPay)
            ok = 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)
            return placeholder if ok else text
        if kind == "ipv4":
            before = m.string[max(0, m.start() - 12) : m.start()].lower().split()
            if before and before[-1].rstrip(":=") in _VERSION_WORDS:  # "python 3.11.7.1", "version 1.2.3.4"
                return text
            return placeholder if _ip_ok(text, cfg.skip_private_ips) else text
        if kind == "ipv6":
            groups = [g for g in text.split(":") if g]
            if len(groups) < 3:  # "a::b", "1::2" (slices, C++ scopes) are not worth the risk
                return text
            return placeholder if _ip_ok(text, cfg.skip_private_ips) else text
        if kind == "aws_secret_key":
            return m.group(1) + placeholder
        if kind == "secret":
            value = m.group(2)
            if "<" in value or len(value) < cfg.min_secret_length:
                return text
            if shannon_entropy(value) < cfg.min_secret_entropy or not re.search(r"\d", value):
                return text
            return m.group(1) + placeholder
        return placeholder

    return repl


def redact(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    """Returns (redacted text, {kind: number of replacements})."""
    counts: dict[str, int] = {}
    for kind in ALL_KINDS:
        if kind not in cfg.kinds:
            continue
        pattern = _PATTERNS[kind]
        if kind in ("ipv4", "ipv6", "credit_card", "phone") and not any(c.isdigit() for c in text):
            continue
        repl = _replace(kind, cfg)
        num = 0

        def counting(m: re.Match) -> str:
            nonlocal num
            out = repl(m)
            if out != m.group(0):
                num += max(1, out.count(PLACEHOLDERS[kind])) if kind == "phone" else 1
            return out

        text = pattern.sub(counting, text)
        if num:
            counts[kind] = num
    return text, counts


def pii_batch(docs: list[Document], cfg: PIIConfig) -> BatchResult:
    unknown = set(cfg.kinds) - set(ALL_KINDS)
    if unknown:
        raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {ALL_KINDS}")
    out = BatchResult(kept=[])
    totals: Counter = Counter()
    for doc in docs:
        text, counts = redact(doc.text, cfg)
        if counts:
            totals.update({f"redacted.{k}": v for k, v in counts.items()})
            totals["docs_redacted"] += 1
            doc = Document(doc.id, text, doc.source, {**doc.metadata, "pii": counts})
        out.kept.append(doc)
    out.counters = dict(totals)
    return out
