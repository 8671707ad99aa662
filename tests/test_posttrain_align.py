"""The align (DPO) stage: reference log-probs computed once, held-out figures, learning beside a control."""

from __future__ import annotations

import pytest
import torch

from moeflow.models import MoETransformer
from moeflow.models.align import pairs as P
from moeflow.models.config import ModelConfig
from moeflow.platform.posttrain import align as A
from moeflow.platform.store import LocalStore

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class CharTokenizer:
    """One id per character (digits and a few letters), the seven special tokens at 0..6."""

    special_ids = {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2, "<|system|>": 3, "<|user|>": 4,
                   "<|assistant|>": 5, "<|end|>": 6}
    pad_id, eos_id, vocab_size = 2, 1, 40

    def encode_batch(self, texts, add_bos=False, add_eos=False):
        return [[7 + (ord(c) % 33) for c in t] for t in texts]


def vocab_pairs(n, seed, shuffle=False):
    """Random prompts; the chosen reply is a random word over "abcde", the rejected one over "fghij".

    Held-out pairs are new words, so only the rule generalises. ``shuffle`` swaps exactly half the pairs
    (the control: no rule left to learn).
    """
    g = torch.Generator().manual_seed(seed)
    flips = torch.randperm(n, generator=g) < n // 2

    def word(chars):
        return "".join(chars[int(x)] for x in torch.randint(0, 5, (3,), generator=g))

    out = []
    for i in range(n):
        prompt = word("klmno") + word("pqrst")
        chosen, rejected = word("abcde"), word("fghij")
        if shuffle and flips[i]:
            chosen, rejected = rejected, chosen
        out.append(P.Pair(({"role": "user", "content": prompt},), chosen, rejected))
    return out


def pair_set(pairs):
    tok = CharTokenizer()
    return P.PairSet([P.render_pair(tok, p) for p in pairs], tok.pad_id)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=40))


def test_reference_logprobs_match_the_pair_batches_and_round_trip(tmp_path):
    model, pairs = tiny_model(), pair_set(vocab_pairs(5, seed=0))
    ref = A.reference_logprobs(model, pairs, average=False, batch_size=2)
    assert ref.shape == (5, 2)
    from moeflow.models.align.dpo import pair_logprobs

    with torch.no_grad():  # all five pairs in one batch (other padding) give the same numbers
        logps, _ = pair_logprobs(model.eval(), pairs.batch(range(5)))
    assert torch.allclose(ref, torch.stack([logps[:5], logps[5:]], 1), atol=1e-4)
    store = LocalStore(tmp_path / "store")
    reply = A.reference_reply_logprobs(model, pairs, batch_size=2)
    assert [t.shape[1] for t in reply] == [40, 40, 40]
    A.save_reference(store, "run/reference", ref, ref[:2], reply, {"model_uri": "m://x"})
    back = A.load_reference(store, "run/reference")
    assert torch.equal(back["train"], ref) and torch.equal(back["heldout_reply_logp"][1], reply[1])
    assert A.load_reference(store, "run/none") is None
    with pytest.raises(ValueError, match="reference log-probs"):
        P.PairSet(pairs.rendered, 2, reference=ref[:3])


def test_before_training_the_policy_is_its_reference():
    model, heldout = tiny_model(), pair_set(vocab_pairs(6, seed=1))
    loss = A.DPOLossConfig()
    heldout.reference = A.reference_logprobs(model, heldout, average=False, batch_size=4)
    reply = A.reference_reply_logprobs(model, heldout, batch_size=4)
    m = A.evaluate_preferences(model, heldout, reply, loss, batch_size=4)
    assert m["reward_accuracy"] == 0.0 and m["reward_margin"] == 0.0   # every pair ties
    assert m["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert m["pairs"] == 6


def _train_dpo(pairs_train, heldout, loss, steps=30, seed=0):
    """Plain AdamW steps of dpo_step_loss (the stage's objective) on a tiny model."""
    model = tiny_model(seed)
    pairs_train.reference = A.reference_logprobs(model, pairs_train, average=loss.average_log_prob, batch_size=16)
    heldout.reference = A.reference_logprobs(model, heldout, average=loss.average_log_prob, batch_size=16)
    reply = A.reference_reply_logprobs(model, heldout, batch_size=16)
    before = A.evaluate_preferences(model, heldout, reply, loss, batch_size=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(pairs_train), generator=g)[:16]
        total, out, metrics = A.dpo_step_loss(model.train(), pairs_train.batch(idx), loss)
        opt.zero_grad()
        total.backward()
        opt.step()
    return before, A.evaluate_preferences(model, heldout, reply, loss, batch_size=16)


@pytest.mark.parametrize("loss", [A.DPOLossConfig(beta=0.5), A.DPOLossConfig(loss="ipo", beta=0.5, average_log_prob=True)],
                         ids=["dpo", "ipo"])
def test_dpo_learns_held_out_preferences_and_shuffled_pairs_do_not(loss):
    train, heldout = vocab_pairs(64, seed=2), pair_set(vocab_pairs(48, seed=3))
    before, after = _train_dpo(pair_set(train), heldout, loss)
    assert before["reward_accuracy"] == 0.0 and after["reward_accuracy"] >= 0.9
    assert after["logp_accuracy"] > before["logp_accuracy"] + 0.2
    assert after["reward_margin"] > before["reward_margin"] + 0.2
    assert 0 < after["kl_to_reference"] < 5
    if loss.loss == "ipo":  # IPO regresses the log-ratio margin onto 1/(2β): implicit margin β/(2β) = 0.5
        assert after["reward_margin"] == pytest.approx(0.5, abs=0.15)
    _, control = _train_dpo(pair_set(vocab_pairs(64, seed=2, shuffle=True)), pair_set(vocab_pairs(48, seed=3)), loss)
    assert control["reward_accuracy"] < after["reward_accuracy"] - 0.15
    assert control["reward_margin"] < after["reward_margin"]


# ------------------------------------------------------------------ the stage on the engine core
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from preference_world import make_world

    w = make_world(tmp_path_factory.mktemp("align"))
    yield w
    w["catalog"].close()


def test_align_config_is_checked_at_the_edge():
    with pytest.raises(ValueError, match="beta"):
        A.AlignConfig(beta=0)
    with pytest.raises(ValueError, match="method"):
        A.AlignConfig(method="reinforce")  # ppo and grpo are methods now (issue 11)
    with pytest.raises(ValueError, match="did you mean 'label_smoothing'"):
        A.AlignConfig(label_smothing=0.1)


def test_align_stage_stores_the_reference_once_and_registers_a_child(world):
    from moeflow.platform.tracking import NoopTracker

    store, catalog = world["store"], world["catalog"]
    cfg = A.AlignConfig(max_steps=4, lr=1e-3, micro_batch_size=8, seq_len=48, warmup_steps=1, log_every=2,
                        checkpoint_every=2, heldout_pairs=24, kl_pairs=16, beta=0.5)
    run = dict(model_uri=world["base_uri"], data_uri=world["sets"].preference_uri, output_prefix="runs/align-a",
               catalog=catalog, parent_model_id=world["base_id"], model_name="moe-tiny-align")
    result = A.run_align(cfg, store, tracker=NoopTracker(), **run)
    assert result.steps == 4 and result.hf_uri and result.reference_uri
    assert catalog.get_model(result.model_id)["parent_model_id"] == world["base_id"]
    before, after = result.before, result.after
    assert before["reward_accuracy"] == 0.0 and before["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert 0 < after["kl_to_reference"] < 10 and after["reward_margin"] != 0.0
    ref = A.load_reference(store, "runs/align-a/reference")
    assert ref["train"].shape[1] == 2 and ref["heldout"].shape == (24, 2)
    # a re-run finds the finished run: no training, the same reference artefact, the same figures
    digest = store.read_artifact(result.reference_uri).content_hash
    again = A.run_align(cfg, store, tracker=NoopTracker(), **run)
    assert again.checkpoint_uri == result.checkpoint_uri and again.after == result.after
    assert store.read_artifact(result.reference_uri).content_hash == digest


def test_dpo_objective_uses_the_batch_reference_in_row_order():
    """The engine objective on a batch equals the DPO formula computed from separately scored rows and the
    batch's own (arbitrary) reference numbers — a reference ignored or misaligned changes the loss."""
    import math

    from moeflow.models.align.dpo import pair_logprobs

    model = tiny_model().eval()
    pairs = pair_set(vocab_pairs(3, seed=4))
    pairs.reference = torch.tensor([[-3.0, -9.0], [-20.0, -1.0], [-5.0, -5.5]])
    batch = pairs.batch([2, 0, 1])
    cfg = A.AlignConfig(beta=0.3)
    with torch.no_grad():
        out = A.DPOObjective(cfg)(model, batch)
        expected = 0.0
        for j, i in enumerate([2, 0, 1]):
            one = pairs.batch([i])
            logps, _ = pair_logprobs(model, one)
            ref_c, ref_r = pairs.reference[i].tolist()
            h = (float(logps[0]) - ref_c) - (float(logps[1]) - ref_r)
            expected += math.log1p(math.exp(-cfg.beta * h)) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    assert float(A.DPOObjective(cfg).count(batch)) == 3
    assert set(out.aux) >= {"tokens_per_expert", "balance_loss"}


@pytest.fixture(scope="module")
def learn_world(tmp_path_factory):
    from preference_world import DATA, make_world

    w = make_world(tmp_path_factory.mktemp("align-learn"), DATA.model_copy(update={"num_arithmetic": 2100}))
    yield w
    w["catalog"].close()


@pytest.mark.slow
def test_dpo_on_generated_pairs_raises_held_out_accuracy_and_margin_beside_a_shuffled_control(learn_world, tmp_path):
    from moeflow.platform.tracking import NoopTracker
    from preference_world import learnable_pairs

    cfg = A.AlignConfig(max_steps=150, lr=2e-3, micro_batch_size=16, seq_len=48, warmup_steps=10, log_every=50,
                        checkpoint_every=0, heldout_pairs=256, kl_pairs=32, beta=0.5)
    w = learn_world

    def train(shuffle: bool):
        data = learnable_pairs(w["store"], w["sets"], tmp_path / f"pairs-{shuffle}", shuffle=shuffle)
        return A.run_align(cfg, w["store"], model_uri=w["base_uri"], data_uri=data,
                           output_prefix=f"runs/align-learn-{shuffle}", tracker=NoopTracker())

    real, control = train(False), train(True)
    print("dpo held-out", real.before, real.after, "control", control.after)
    assert real.after["reward_accuracy"] >= 0.7 and real.after["reward_margin"] > 0.5
    assert real.after["logp_accuracy"] > real.before["logp_accuracy"] + 0.15
    assert 0 < real.after["kl_to_reference"] < 20
    assert control.after["reward_accuracy"] < real.after["reward_accuracy"] - 0.15
    assert control.after["reward_margin"] < 0.5 * real.after["reward_margin"]
