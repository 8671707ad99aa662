"""SFT data and maths: document masking in packed rows, assistant-only targets, packing."""

from __future__ import annotations

import pytest
import torch

from moeflow.models import MoETransformer
from moeflow.models.config import ModelConfig
from train_fakes import one_thread, tiny_model_overrides


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _tiny(**kw) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(ModelConfig.preset("tiny").replace(**{**tiny_model_overrides(), **kw})).eval()


# ------------------------------------------------------------------ document masking
@pytest.mark.parametrize("mtp_depth", [0, 1])
def test_packed_documents_equal_each_document_alone(mtp_depth):
    model = _tiny(mtp_depth=mtp_depth, seq_aux_alpha=0.0)
    lengths = [5, 9, 2]
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(2, 64, (n,), generator=gen) for n in lengths]
    row = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = model(row, document_ids_BT=doc_ids).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # without the document mask the later documents see the earlier ones
        plain = model(row).logits[0]
    assert not torch.allclose(plain[lengths[0]:], alone[lengths[0]:], atol=1e-3)


def test_repeated_document_id_later_in_the_row_is_a_new_document():
    from moeflow.models.attention import document_attention

    positions, mask, _ = document_attention(torch.tensor([[0, 0, 1, 0, 0]]))
    assert positions.tolist() == [[0, 1, 0, 0, 1]]
    assert not bool(mask[0, 0, 3, 1])  # the second "0" run does not see the first
    assert bool(mask[0, 0, 4, 3])


def test_balancing_losses_without_targets_when_asked():
    model = _tiny(seq_aux_alpha=1e-2).train()
    ids = torch.randint(2, 64, (2, 8))
    assert model(ids).terms == {}
    out = model(ids, with_losses=True)
    assert out.terms["balance_loss"].requires_grad and float(out.terms["balance_loss"].detach()) > 0


# ------------------------------------------------------------------ conversations -> packed rows
from moeflow.models.align.sft import (PackedRowLoader, assistant_token_loss, conversation_document,  # noqa: E402
                                      pack_conversations, pack_documents)
from moeflow.models.tokenizer import END, train_bpe  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    texts = ["What is 2 + 3? The answer is 5. " * 30, "def add(a, b):\n    return a + b\n" * 20]
    return train_bpe(texts, vocab_size=320)


MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 2 + 2?"},
         {"role": "assistant", "content": "4"}]


def test_targets_are_every_assistant_turn_and_its_end_only(tok):
    doc = conversation_document(tok, MULTI)
    end = tok.special_ids[END]
    kept = [t for t in doc.targets if t != -100]
    assert tok.decode([t for t in kept if t != end]) == "54"
    assert kept.count(end) == 2  # both assistant turns learn to stop
    assert len(doc.inputs) == len(doc.targets)
    user_ids = set(tok.encode("What is 2 + 3?", add_bos=False)) - set(tok.encode("54", add_bos=False))
    assert not user_ids & set(kept)


def test_packing_is_lossless_and_each_document_is_computed_alone(tok):
    convs = [[{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]
             for a, b in [(2, 3), (10, 20), (7, 1), (33, 44), (5, 5)]]
    rows = pack_conversations(tok, convs, seq_len=48)
    docs = [conversation_document(tok, c) for c in convs]
    assert len(rows) < len(convs) and rows.stats["documents"] == 5
    assert rows.stats["targets"] == sum(d.num_targets for d in docs)
    model = _tiny(vocab_size=tok.vocab_size, seq_aux_alpha=0.0)
    packed = assistant_token_loss(model, rows)
    alone = sum(assistant_token_loss(model, pack_documents([d], 48, tok.pad_id)) * d.num_targets for d in docs)
    assert packed == pytest.approx(alone / sum(d.num_targets for d in docs), rel=1e-5)
    # too long: cut to the row, counted; without targets left: dropped, counted
    long = pack_documents([docs[0]], seq_len=len(docs[0].inputs) - 1, pad_id=tok.pad_id)
    assert long.num_truncated == 1
    assert pack_documents([docs[0]], seq_len=3, pad_id=tok.pad_id).num_dropped == 1


def test_user_tokens_carry_no_gradient(tok):
    """Perturbing a trailing user turn leaves the gradient bit-identical; perturbing the answer does not."""
    model = _tiny(vocab_size=tok.vocab_size, seq_aux_alpha=0.0).train()

    def grads(messages):
        rows = pack_conversations(tok, [messages], seq_len=64)
        model.zero_grad()
        b = rows.batch([0])
        model(b["input_ids"], targets=b["targets"], document_ids_BT=b["document_ids"]).loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

    base = grads(MULTI[:3] + [{"role": "user", "content": "Thanks!"}])
    same = grads(MULTI[:3] + [{"role": "user", "content": "def add(a, b): 2 + 3 = 5?"}])
    assert torch.equal(base, same)
    other_answer = grads(MULTI[:2] + [{"role": "assistant", "content": "6"}, {"role": "user", "content": "Thanks!"}])
    assert not torch.allclose(base, other_answer)


def test_loader_shards_ranks_and_resumes(tok):
    convs = [[{"role": "user", "content": f"{a} + 1?"}, {"role": "assistant", "content": str(a + 1)}] for a in range(40)]
    rows = pack_conversations(tok, convs, seq_len=16)
    r0 = PackedRowLoader(rows, batch_size=3, seed=1, rank=0, world_size=2)
    r1 = PackedRowLoader(rows, batch_size=3, seed=1, rank=1, world_size=2)
    a, b = next(r0)["input_ids"], next(r1)["input_ids"]
    assert not any(torch.equal(x, y) for x in a for y in b)
    state = r0.state_dict()
    expected = [next(r0)["input_ids"] for _ in range(5)]
    fresh = PackedRowLoader(rows, batch_size=3, seed=1, rank=0, world_size=2)
    fresh.load_state_dict(state)
    assert all(torch.equal(x, next(fresh)["input_ids"]) for x in expected)
