"""PII redaction: every kind is found and replaced, look-alikes are left alone, counts are right."""

from __future__ import annotations

import pytest

from moeflow.platform.data.pii import PIIConfig, luhn_valid, pii_batch, redact, shannon_entropy
from moeflow.platform.data.schema import Document

CASES = [
    ("email", "write to jane.doe+news@mail.example.org today", "write to <EMAIL> today"),
    ("ipv4", "the server at 93.184.216.34 answered", "the server at <IP_ADDRESS> answered"),
    ("ipv6", "dns 2606:4700:4700::1111 is up", "dns <IP_ADDRESS> is up"),
    ("phone", "call (415) 555-0132 tomorrow", "call <PHONE> tomorrow"),
    ("phone", "or +44 20 7946 0958 in London", "or <PHONE> in London"),
    ("credit_card", "card 4111 1111 1111 1111 expires", "card <CREDIT_CARD> expires"),
    ("credit_card", "amex 378282246310005.", "amex <CREDIT_CARD>."),
    ("aws_access_key", "key AKIAIOSFODNN7EXAMPLE here", "key <AWS_ACCESS_KEY> here"),
    ("aws_secret_key", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     "aws_secret_access_key = <SECRET>"),
    ("api_key", "OPENAI=sk-proj-Abc123Def456Ghi789Jkl012Mno", "OPENAI=<API_KEY>"),
    ("github_token", "token ghp_" + "a1B2c3D4e5" * 4 + " leaked", "token <GITHUB_TOKEN> leaked"),
    ("private_key", "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAKC\n-----END RSA PRIVATE KEY-----\nrest",
     "<PRIVATE_KEY>\nrest"),
    ("private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----", "<PRIVATE_KEY>"),
    ("secret", 'db_password = "Zq8vN3kLp0Xr7TbW2mYs"', 'db_password = "<SECRET>"'),
    ("secret", "API_KEY: 9fQ2kLx7Zp3VbN8mR4tY", "API_KEY: <SECRET>"),
]


@pytest.mark.parametrize("kind,text,expected", CASES)
def test_each_kind_is_redacted(kind, text, expected):
    out, counts = redact(text, PIIConfig())
    assert out == expected
    assert counts == {kind: 1}


NEGATIVES = [
    "loopback 127.0.0.1 and lan 192.168.1.20 are not personal",  # private addresses skipped by default
    "python 3.11.7.1 and version 1.2.3.4.5",  # versions, not addresses
    "slice x[1::2] and std::vector<int> and a::b",  # not IPv6
    "4111 1111 1111 1112 fails the Luhn check",
    "pi is 3.14159265358979323846 and 0.99999999999999995",  # decimal fractions
    'password = "changeme"',  # low entropy / no digit: a placeholder, not a secret
    "token = get_token_from_env()",
    "order number 12345 shipped",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_look_alikes_are_kept(text):
    out, counts = redact(text, PIIConfig())
    assert out == text and counts == {}


def test_private_ips_when_asked_and_kind_selection():
    out, counts = redact("lan 192.168.1.20", PIIConfig(skip_private_ips=False))
    assert out == "lan <IP_ADDRESS>" and counts == {"ipv4": 1}
    out, counts = redact("a@b.example.com 93.184.216.34", PIIConfig(kinds=["ipv4"]))
    assert out == "a@b.example.com <IP_ADDRESS>"


def test_helpers():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")
    assert shannon_entropy("aaaa") == 0.0
    assert shannon_entropy("abcd") == pytest.approx(2.0)


def test_batch_counts_per_kind_and_keeps_every_doc():
    docs = [
        Document("a", "mail x.y@example.com and z@example.net", "s", {}),
        Document("b", "nothing here", "s", {}),
        Document("c", "ip 8.8.8.8", "s", {"k": 1}),
    ]
    out = pii_batch(docs, PIIConfig())
    assert [d.id for d in out.kept] == ["a", "b", "c"] and not out.excluded
    assert out.counters == {"redacted.email": 2, "redacted.ipv4": 1, "docs_redacted": 2}
    assert out.kept[0].metadata["pii"] == {"email": 2}
    assert out.kept[2].metadata == {"k": 1, "pii": {"ipv4": 1}}
    with pytest.raises(ValueError, match="unknown PII kind 'ssn'"):  # at the config, not in a worker
        PIIConfig(kinds=["ssn"])
