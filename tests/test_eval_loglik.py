"""Log-likelihood scoring: per-item scores invariant to batch size and padding side, rolling windows,
bits per byte against information-theoretic references, multiple-choice prompts (plain and chat)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import pre_tokenizers

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.eval.lm import ModelLM
from moeflow.models.eval.loglik import bits_per_byte, rolling_windows, score_continuations, score_documents
from moeflow.models.eval.prompts import MCItem, PromptFormat, choice_strings, mc_requests
from moeflow.models.tokenizer import ASSISTANT, train_bpe

TEXTS = ["def add(a, b):\n    return a + b\n", "The cat sat on the mat. The dog sat too.", "12 + 30 = 42"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def model(tok, one_cpu_thread):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, init_std=0.08, max_seq_len=64)
    m = MoETransformer(cfg).eval()
    with torch.no_grad():
        for r in m.routers():
            r.e_score_correction_bias.normal_(0.0, 0.05)
    return m


@pytest.fixture(scope="module")
def requests(model):
    g = torch.Generator().manual_seed(1)
    V = model.cfg.vocab_size
    lengths = [(1, 1), (3, 2), (9, 4), (5, 1), (12, 7), (2, 3), (7, 7), (4, 2), (20, 5), (1, 6), (6, 1)]
    return [(torch.randint(7, V, (c,), generator=g).tolist(), torch.randint(7, V, (n,), generator=g).tolist())
            for c, n in lengths]


@torch.no_grad()
def _alone(model, ctx, cont) -> float:
    """Reference: one unpadded row, no mask, summed log-softmax in float64."""
    seq = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(seq[:, :-1]).logits[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


@pytest.mark.parametrize("side", ["right", "left"])
def test_scores_equal_at_batch_sizes_1_3_8_and_match_the_unpadded_reference(model, requests, side):
    ref = [_alone(model, c, n) for c, n in requests]
    per_bs = {bs: score_continuations(model, requests, batch_size=bs, padding_side=side, pad_id=2) for bs in (1, 3, 8)}
    for bs, scores in per_bs.items():
        got = [s.logprob for s in scores]
        assert got == pytest.approx(ref, abs=2e-4), f"batch size {bs}, {side} padding"
        assert [s.num_tokens for s in scores] == [len(n) for _, n in requests]
    # the same pad id or another: pads never reach a score
    other_pad = score_continuations(model, requests, batch_size=8, padding_side=side, pad_id=5)
    assert [s.logprob for s in other_pad] == pytest.approx([s.logprob for s in per_bs[8]], abs=2e-4)


def test_greedy_flag_is_true_for_the_argmax_continuation(model):
    ctx = [0, 11, 12, 13]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
    s_greedy, s_other = score_continuations(model, [(ctx, [nxt]), (ctx, [(nxt + 1) % model.cfg.vocab_size])])
    assert s_greedy.is_greedy and not s_other.is_greedy


def test_rolling_windows_cover_every_token_once_within_max_len():
    ids = list(range(100, 150))  # ids[0] plays BOS
    for max_len, stride in [(8, 3), (8, 8), (16, None), (64, None)]:
        windows = rolling_windows(ids, max_len, stride)
        predicted = [t for _, cont in windows for t in cont]
        assert predicted == ids[1:]
        for ctx, cont in windows:
            assert len(ctx) + len(cont) - 1 <= max_len and ctx == ids[ids.index(cont[0]) - len(ctx):ids.index(cont[0])]


def test_document_score_equals_one_full_pass_when_it_fits(model):
    doc = [0] + list(range(20, 50))
    (total,) = score_documents(model, [doc], max_len=64)
    assert total == pytest.approx(_alone(model, doc[:1], doc[1:]), abs=2e-4)
    # short windows: still one term per token, the sum moves (less context), but stays finite and close
    (windowed,) = score_documents(model, [doc], max_len=8, stride=4)
    assert math.isfinite(windowed) and windowed != pytest.approx(total, abs=1e-6)


class _ByteUnigramLM(torch.nn.Module):
    """A fake LM whose next-token distribution ignores the context: log_p over byte tokens only."""

    def __init__(self, vocab_size: int, log_p: dict[int, float]):
        super().__init__()
        self.cfg = SimpleNamespace(vocab_size=vocab_size, max_seq_len=16)
        self.lm_head = torch.nn.Linear(1, 1)
        self.row = torch.full((vocab_size,), float("-inf"))
        for t, lp in log_p.items():
            self.row[t] = lp

    def forward(self, ids_BT, attention_mask_BS=None):
        return SimpleNamespace(logits=self.row.expand(*ids_BT.shape, -1).clone())


def _byte_ids(tok) -> dict[str, int]:
    return {ch: tok.token_to_id(ch) for ch in pre_tokenizers.ByteLevel.alphabet()}


def test_bits_per_byte_of_a_uniform_byte_model_is_8_for_any_text():
    tok = train_bpe(["zz zz zz zz"], vocab_size=264)  # its one merge involves 'z', absent below
    byte_ids = _byte_ids(tok)
    lm = ModelLM(_ByteUnigramLM(tok.vocab_size, {i: 0.0 for i in byte_ids.values()}), tok, batch_size=3)
    texts = ["héllo wörld, ünïcode ééé", "plain ascii text 123", "日本語のテキスト"]  # 1-, 2- and 3-byte characters
    totals = lm.loglikelihood_rolling(texts)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert bits_per_byte(sum(totals), num_bytes) == pytest.approx(8.0, abs=1e-6)


def test_bits_per_byte_of_a_known_binary_source_is_its_cross_entropy():
    tok = train_bpe(["zz zz zz zz"], vocab_size=264)
    ids = _byte_ids(tok)
    a_id, b_id = ids["a"], ids["b"]
    lm = ModelLM(_ByteUnigramLM(tok.vocab_size, {a_id: math.log(0.9), b_id: math.log(0.1)}), tok)
    text = "aaaaaaaaab" * 7 + "ab"  # 64 a, 8 b: 72 bytes
    (total,) = lm.loglikelihood_rolling([text])
    expected_bits = -(64 * math.log2(0.9) + 8 * math.log2(0.1)) / 72
    assert bits_per_byte(total, len(text.encode())) == pytest.approx(expected_bits, abs=1e-6)


def test_mc_requests_plain_share_context_and_keep_the_space_in_the_choice(tok):
    item = MCItem("What is 12 + 30?", ("42", "24", "7"), 0)
    fmt = PromptFormat(fewshot=(("What is 1 + 1?", "2"),))
    reqs = mc_requests(tok, item, fmt)
    assert len({tuple(c) for c, _ in reqs}) == 1  # one context for every choice
    ctx = tok.decode(reqs[0][0])
    assert ctx == "What is 1 + 1?\nAnswer: 2\n\nWhat is 12 + 30?\nAnswer:"
    assert [tok.decode(c) for _, c in reqs] == [" 42", " 24", " 7"] == choice_strings(item, fmt)


def test_mc_requests_chat_end_with_the_assistant_marker(tok):
    item = MCItem("Pick one", ("yes", "no"), 1)
    reqs = mc_requests(tok, item, PromptFormat(chat=True, fewshot=(("q", "a"),)))
    ctx = reqs[0][0]
    assert ctx[-1] == tok.special_ids[ASSISTANT] and ctx[0] == tok.bos_id
    assert tok.decode(ctx, skip_special=False).count("<|assistant|>") == 2
    assert [tok.decode(c) for _, c in reqs] == ["yes", "no"]


def test_model_lm_loglikelihood_matches_ids_path_and_generation_is_batch_invariant(model, tok):
    lm1, lm3 = ModelLM(model, tok, batch_size=1), ModelLM(model, tok, batch_size=3)
    pairs = [("The cat", " sat"), ("12 +", " 30 = 42"), ("def", " add(a, b):")]
    assert [x[0] for x in lm1.loglikelihood(pairs)] == pytest.approx([x[0] for x in lm3.loglikelihood(pairs)], abs=2e-4)
    prompts = [tok.encode(p) for p in ["The", "def add", "12 + 30 =", "The dog sat"]]
    assert lm1.generate(prompts, max_new_tokens=6) == lm3.generate(prompts, max_new_tokens=6)
