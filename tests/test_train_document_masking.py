"""Document-masked attention, the pretraining default: a packed row computes what its documents
compute alone (CPU reference: each document run separately), on the dense SDPA mask and on the
FlexAttention path the GPU uses (run eagerly here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeflow.models import MoETransformer
from moeflow.models.attention import MLA
from moeflow.models.train.loop import Trainer
from moeflow.platform.train.config import PretrainConfig
from train_fakes import one_thread, tiny_model_overrides

BOS = 1


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _trainer(document_masking: bool = True, **model_kw) -> Trainer:
    # init_std 0.3: logits that depend on the context (at 0.02 every loss is ≈ ln V and masks hardly show)
    cfg = PretrainConfig(model_overrides={**tiny_model_overrides(), "init_std": 0.3, **model_kw}, seq_len=24, micro_batch_size=2,
                         max_steps=1, warmup_steps=0, document_masking=document_masking)
    torch.manual_seed(0)
    return Trainer(cfg, MoETransformer(cfg.build_model_config()), iter(()), bos_id=BOS)


def _packed_rows() -> torch.Tensor:
    """(2, 25): row 0 starts mid-document, then two BOS documents; row 1 three BOS documents."""
    rows = torch.randint(2, 64, (2, 25), generator=torch.Generator().manual_seed(5))
    rows[0, [7, 15]] = BOS
    rows[1, [0, 5, 18]] = BOS
    return rows


def _segments(row: torch.Tensor) -> list[tuple[int, int]]:
    starts = sorted({0, *[i for i, t in enumerate(row.tolist()) if t == BOS]})
    return list(zip(starts, starts[1:] + [len(row)]))


def test_default_is_on_and_a_packed_row_equals_its_documents_run_alone():
    assert PretrainConfig().document_masking is True
    # always dumped: a doc-masked config must not hash like a plain-causal config stored before the
    # field (the stage cache would reuse that run), and off must read back as off
    assert PretrainConfig().to_dict()["document_masking"] is True
    off = PretrainConfig(document_masking=False)
    assert PretrainConfig.from_dict(off.to_dict()) == off and off.config_hash() != PretrainConfig().config_hash()
    trainer = _trainer()
    model = trainer.model.eval()
    rows = _packed_rows()
    inputs, targets, extra = trainer._split(rows)
    assert "document_ids_BT" in extra
    with torch.no_grad():
        packed = model(inputs, **extra).logits
        for b in range(rows.shape[0]):
            for start, end in _segments(inputs[b]):
                alone = model(inputs[b: b + 1, start:end]).logits[0]
                torch.testing.assert_close(packed[b, start:end], alone, rtol=1e-5, atol=1e-5)
        plain = model(inputs).logits  # without masking, later documents see earlier ones
    assert not torch.allclose(plain, packed, atol=1e-4)


def test_validation_loss_is_the_mean_over_documents_run_alone():
    trainer = _trainer()
    rows = _packed_rows()
    trainer.val_batches = lambda: [rows]
    val_loss = trainer.evaluate()["val_loss"]
    model = trainer.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        inputs, targets = rows[:, :-1], rows[:, 1:]
        for b in range(rows.shape[0]):
            for start, end in _segments(inputs[b]):
                logits = model(inputs[b: b + 1, start:end]).logits[0]
                total += float(F.cross_entropy(logits, targets[b, start:end], reduction="sum"))
                count += end - start
    assert val_loss == pytest.approx(total / count, rel=1e-6)
    off = _trainer(document_masking=False)
    off.val_batches = lambda: [rows]
    assert off.evaluate()["val_loss"] != pytest.approx(val_loss, rel=1e-3)  # the test can tell


def _compare_kernels(trainer: Trainer, monkeypatch, backward: bool) -> None:
    inputs, targets, extra = trainer._split(_packed_rows().to(trainer.device))
    results = {}
    for kernel in ("sdpa", "flex"):
        monkeypatch.setattr(MLA, "document_kernel", kernel)
        trainer.model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            out = trainer.model(inputs, targets=targets, **extra)
        if backward:
            out.loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[kernel] = (out.logits.detach(), out.loss.detach(), grads)
    torch.testing.assert_close(results["flex"][0], results["sdpa"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results["flex"][1], results["sdpa"][1], rtol=1e-5, atol=1e-5)
    for name, grad in results["sdpa"][2].items():
        torch.testing.assert_close(results["flex"][2][name], grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_flex_attention_path_equals_the_dense_mask_path(monkeypatch):
    """The GPU's fast path (FlexAttention BlockMask), run eagerly on the CPU (forward only: torch has
    no CPU flex backward), vs the dense SDPA mask, with MTP (its blocks get the same mask)."""
    _compare_kernels(_trainer(mtp_depth=1), monkeypatch, backward=False)
    monkeypatch.setattr(MLA, "document_kernel", "bogus")
    with pytest.raises(ValueError, match="document_kernel"):
        inputs, _, extra = _trainer()._split(_packed_rows())
        _trainer().model(inputs, **extra)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_attention_forward_and_backward_on_cuda(monkeypatch):
    trainer = _trainer(mtp_depth=1)
    trainer.model.cuda()
    trainer.device = torch.device("cuda")
    _compare_kernels(trainer, monkeypatch, backward=True)


def test_flex_pads_head_dims_under_16_exactly():
    """flex's GPU kernel refuses head dims < 16: they are zero-padded, and the result is still exact
    (against SDPA with the same block-diagonal causal mask as a dense boolean tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from moeflow.models.attention import _flex_attention

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 20, 12, generator=g), torch.randn(2, 3, 20, 12, generator=g)
    v = torch.randn(2, 3, 20, 8, generator=g)
    doc_T = torch.tensor([0] * 7 + [1] * 9 + [2] * 4)

    def same_doc_causal(b, h, qi, ki):
        return (doc_T[qi] == doc_T[ki]) & (ki <= qi)

    block_mask = create_block_mask(same_doc_causal, None, None, 20, 20, device="cpu")
    dense_11TT = ((doc_T[:, None] == doc_T[None, :]) & torch.ones(20, 20, dtype=torch.bool).tril())[None, None]
    out = _flex_attention(q, k, v, block_mask, scale=0.3)
    assert out.shape == v.shape
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_11TT, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
