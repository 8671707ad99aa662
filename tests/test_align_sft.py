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
    assert out.terms["balance_loss"].requires_grad and float(out.terms["balance_loss"]) > 0
