"""DPO maths: completion log-probs against a float64 loop, the losses against hand-computed tables."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.models.align.dpo import policy_reference_kl, preference_loss, sequence_logprobs

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_sequence_logprobs_counts_only_completion_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    targets = torch.tensor([[-100, -100, 3, 1, -100],    # prompt, prompt, 2 completion tokens, padding
                            [-100, 4, 4, 6, 0],
                            [-100, -100, -100, -100, -100]])
    total, count = sequence_logprobs(logits, targets)
    for b in range(3):  # the reference: a float64 loop over positions
        expected, n = 0.0, 0
        for t in range(5):
            if targets[b, t] != -100:
                row = logits[b, t].double()
                expected += float(row[targets[b, t]] - torch.logsumexp(row, 0))
                n += 1
        assert total[b].item() == pytest.approx(expected, abs=1e-5)
        assert count[b].item() == n
    assert total[2].item() == 0.0  # nothing counted -> 0, not NaN


def test_sequence_logprobs_ignores_what_masked_tokens_predict():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 5)
    targets = torch.tensor([[-100, 2, -100, 1]])
    perturbed = logits.clone()
    perturbed[0, 0] += 10 * torch.randn(5)   # a prompt position's logits
    perturbed[0, 2] += 10 * torch.randn(5)
    assert torch.allclose(sequence_logprobs(logits, targets)[0], sequence_logprobs(perturbed, targets)[0])


# one pair: policy logp_c = -5, logp_r = -7; reference -6 and -6 -> h = 1 - (-1) = 2
_PAIR = dict(policy_chosen_B=torch.tensor([-5.0]), policy_rejected_B=torch.tensor([-7.0]),
             ref_chosen_B=torch.tensor([-6.0]), ref_rejected_B=torch.tensor([-6.0]))


@pytest.mark.parametrize("method,smoothing,expected", [
    ("sigmoid", 0.0, 0.5981388693815918),   # -log σ(0.1·2) = log(1 + e^-0.2)
    ("sigmoid", 0.1, 0.6181388693815918),   # 0.9·log(1 + e^-0.2) + 0.1·log(1 + e^0.2)
    ("ipo", 0.0, 9.0),                      # (2 − 1/(2·0.1))² = (2 − 5)²
])
def test_loss_table(method, smoothing, expected):
    out = preference_loss(**_PAIR, beta=0.1, method=method, label_smoothing=smoothing)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards_B.item() == pytest.approx(0.1)      # β·(−5 − (−6))
    assert out.rejected_rewards_B.item() == pytest.approx(-0.1)   # β·(−7 − (−6))
    assert out.margins_B.item() == pytest.approx(0.2)
    assert out.accuracy.item() == 1.0


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-5.0], requires_grad=True), torch.tensor([-7.0], requires_grad=True)
    preference_loss(pc, pr, _PAIR["ref_chosen_B"], _PAIR["ref_rejected_B"], beta=0.1).loss.backward()
    # dL/dlogp_c = −β·σ(−β·h) = −0.1·σ(−0.2); dL/dlogp_r is its negative
    assert pc.grad.item() == pytest.approx(-0.045016600268752205, rel=1e-6)
    assert pr.grad.item() == pytest.approx(0.045016600268752205, rel=1e-6)


def test_policy_equal_to_reference():
    logp = torch.tensor([-3.0, -4.0])
    out = preference_loss(logp, logp - 1, logp, logp - 1, beta=0.5)
    assert out.loss.item() == pytest.approx(math.log(2))  # σ(0) = 1/2
    assert out.accuracy.item() == 0.0                     # ties lose
    assert torch.all(out.margins_B == 0)


def test_batch_mean_and_metrics():
    out = preference_loss(torch.tensor([-5.0, -9.0]), torch.tensor([-7.0, -8.0]),
                          torch.tensor([-6.0, -8.0]), torch.tensor([-6.0, -8.0]), beta=1.0)
    # pair 2: h = (−1) − 0 = −1 -> lost; loss = mean(log(1+e^-2), log(1+e^1))
    assert out.loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2)
    m = out.metrics()
    assert m["rewards/accuracy"] == 0.5
    assert m["rewards/margin"] == pytest.approx((2.0 - 1.0) / 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), "beta"), (dict(method="kto"), "method"), (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(method="ipo", label_smoothing=0.1), "sigmoid"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preference_loss(**_PAIR, **kwargs)


def test_policy_reference_kl_against_a_loop():
    torch.manual_seed(2)
    policy, ref = torch.randn(4, 6), torch.randn(4, 6)
    ref_logp = torch.log_softmax(ref, -1)
    expected = 0.0
    for n in range(4):
        p = torch.softmax(policy[n].double(), 0)
        q = torch.softmax(ref[n].double(), 0)
        expected += float(sum(p[v] * math.log(p[v] / q[v]) for v in range(6)))
    assert policy_reference_kl(policy, ref_logp).item() == pytest.approx(expected / 4, rel=1e-5)
    assert policy_reference_kl(ref, ref_logp).item() == pytest.approx(0.0, abs=1e-6)
    assert policy_reference_kl(policy[:0], ref_logp[:0]).item() == 0.0


class _CharTokenizer:
    """A fake tokenizer: one id per character (+10), the seven special tokens at 0..6."""

    special_ids = {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2, "<|system|>": 3, "<|user|>": 4,
                   "<|assistant|>": 5, "<|end|>": 6}
    pad_id, eos_id = 2, 1

    def encode_batch(self, texts, add_bos=False, add_eos=False):
        return [[10 + (ord(c) % 40) for c in t] for t in texts]


def test_pairs_collate_and_pair_logprobs_score_only_the_reply():
    from moeflow.models import MoETransformer
    from moeflow.models.align import pairs
    from moeflow.models.align.dpo import pair_logprobs
    from moeflow.models.config import ModelConfig

    tok = _CharTokenizer()
    prompt = ({"role": "user", "content": "2+2"},)
    rendered = [pairs.render_pair(tok, pairs.Pair(prompt, "4", "five")),
                pairs.render_pair(tok, pairs.Pair(prompt, "four", "5"))]
    batch = pairs.collate(rendered, tok.pad_id)
    # <bos><user>2+2<end><assistant>{reply}<end>: 8 + len(reply) tokens
    assert batch["lengths"].tolist() == [9, 12, 12, 9]
    assert batch["input_ids"].shape == (4, 12) and int(batch["input_ids"][0, 9:].eq(2).sum()) == 3
    assert batch["loss_mask"].sum(1).tolist() == [2, 5, 5, 2]   # reply + its <|end|>
    t = pairs.targets(batch)
    assert (t != -100).sum(1).tolist() == [2, 5, 5, 2] and t[0, 7].item() == 6   # <|end|> is a target

    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=50)).eval()
    with torch.no_grad():
        logps, _ = pair_logprobs(model, batch)
        # the reference: each row alone, unpadded, summing log p of its reply tokens
        for r in range(4):
            n = int(batch["lengths"][r])
            ids = batch["input_ids"][r:r + 1, :n]
            logp = torch.log_softmax(model(ids[:, :-1]).logits.double(), -1)[0]
            mask = batch["loss_mask"][r, 1:n]
            expected = sum(float(logp[i, ids[0, i + 1]]) for i in range(n - 1) if mask[i])
            assert logps[r].item() == pytest.approx(expected, abs=1e-4)
        avg, _ = pair_logprobs(model, batch, average=True)
        assert torch.allclose(avg, logps / torch.tensor([2.0, 5.0, 5.0, 2.0]))
