"""MTP and document boundaries: only the MTP targets respect them; the LM loss keeps every BOS target.

Packed pretraining rows hold several BOS-started documents. Predicting the next document's BOS is
part of next-token prediction (validation scores it), so the training LM loss must score it too,
with or without MTP; only an MTP depth, whose extra input token or target would cross into the
next document, drops those positions.
"""

from __future__ import annotations

import pytest
import torch

from moeflow.models import MoETransformer
from moeflow.models.mtp import IGNORE_INDEX
from moeflow.models.train.loop import Trainer
from moeflow.platform.train.config import PretrainConfig
from train_fakes import one_thread, tiny_model_overrides

BOS = 1


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _cfg(mtp_depth: int) -> PretrainConfig:
    return PretrainConfig(model_overrides={**tiny_model_overrides(), "mtp_depth": mtp_depth, "seq_aux_alpha": 0.0},
                          seq_len=16, micro_batch_size=2, grad_accum_steps=1, max_steps=1, warmup_steps=0,
                          val_every=0)


def _packed_rows() -> torch.Tensor:
    """(2, 17) rows of BOS-started documents, BOS inside each row (so BOS is a target)."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(2, 64, (2, 17), generator=gen)
    rows[0, [0, 6, 11]] = BOS
    rows[1, [0, 9]] = BOS
    return rows


def _trainer(mtp_depth: int, state: dict | None = None) -> Trainer:
    cfg = _cfg(mtp_depth)
    torch.manual_seed(0)
    model = MoETransformer(cfg.build_model_config())
    if state is not None:  # the non-MTP twin: the same main-model weights
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not missing and all(k.startswith("mtp.") for k in unexpected)
    return Trainer(cfg, model, iter(()), bos_id=BOS)


def test_lm_loss_keeps_bos_targets_with_mtp_and_equals_validation():
    rows = _packed_rows()
    mtp = _trainer(mtp_depth=2)
    plain = _trainer(mtp_depth=0, state=mtp.model.state_dict())
    results = {}
    for name, trainer in (("mtp", mtp), ("plain", plain)):
        parts, _, _ = trainer.accumulate_gradients([trainer._split(rows)])
        trainer.val_batches = lambda: [rows]
        results[name] = (float(parts["lm_loss"]), trainer.evaluate()["val_loss"], trainer.last_target_counts)
    (mtp_train, mtp_val, mtp_counts), (plain_train, plain_val, plain_counts) = results["mtp"], results["plain"]
    # every one of the 32 targets (5 of them BOS) is in the LM loss, with and without MTP
    assert int(mtp_counts[0]) == int(plain_counts[0]) == rows[:, 1:].numel() == 32
    # training LM loss == validation loss on the same rows, and equal across MTP / non-MTP twins
    assert mtp_train == pytest.approx(mtp_val, rel=1e-5)
    assert mtp_train == pytest.approx(plain_train, rel=1e-5)
    assert mtp_val == pytest.approx(plain_val, rel=1e-5)


def test_mtp_targets_still_stop_at_document_boundaries():
    """Depth d keeps the target at i only if targets[i..i+d] hold no BOS (and exist): counted by hand."""
    rows = _packed_rows()
    trainer = _trainer(mtp_depth=2)
    inputs, targets, extra = trainer._split(rows)
    counts = trainer._target_counts(targets, extra)
    expected = []
    for depth in (1, 2):
        n = 0
        for r in range(targets.shape[0]):
            for i in range(targets.shape[1] - depth):
                window = targets[r, i: i + depth + 1].tolist()
                n += all(t != BOS and t != IGNORE_INDEX for t in window)
        expected.append(n)
    assert counts[1:].tolist() == expected
    # and the model's MTP loss is the one on boundary-masked targets
    out = trainer.model(inputs, targets=targets, **extra)
    attention = {k: v for k, v in extra.items() if k != "mtp_boundary_BT"}  # the same (document) attention
    ref = trainer.model(inputs, targets=targets.masked_fill(targets == BOS, IGNORE_INDEX), **attention)
    torch.testing.assert_close(out.aux["mtp_loss"], ref.aux["mtp_loss"])
    assert not torch.allclose(out.aux["lm_loss"], ref.aux["lm_loss"])  # the LM loss scores BOS, ref does not


def test_mtp_routers_count_only_positions_with_a_target():
    """Main routers count every position (B·T·K slots); an MTP depth's router only the positions it has a
    target for: not the padded tail (last d positions), not chains across a BOS."""
    rows = _packed_rows()
    trainer = _trainer(mtp_depth=2)
    inputs, targets, extra = trainer._split(rows)
    out = trainer.model(inputs, targets=targets, **extra)
    counts_LE = out.aux["tokens_per_expert"]
    num_main = trainer.model.cfg.num_moe_layers
    k = trainer.model.cfg.num_experts_per_tok
    expected = trainer._target_counts(targets, extra)
    assert counts_LE[:num_main].sum(-1).tolist() == [inputs.numel() * k] * num_main
    assert counts_LE[num_main:].sum(-1).tolist() == [float(expected[1] * k), float(expected[2] * k)]
    # and the counts the bias update sees are exactly the routed slots of those positions
    with torch.no_grad():
        seen = []
        hook = trainer.model.mtp[1].block.mlp.register_forward_hook(lambda m, a, o: seen.append(o[1].topk_idx_BTK))
        trainer.model(inputs, targets=targets, **extra)
        hook.remove()
    from moeflow.models.mtp import mtp_targets
    chain = targets.masked_fill(extra["mtp_boundary_BT"], IGNORE_INDEX)
    real = mtp_targets(chain, 2) != IGNORE_INDEX
    by_hand = torch.bincount(seen[0][real].reshape(-1), minlength=trainer.model.cfg.num_routed_experts).float()
    torch.testing.assert_close(counts_LE[num_main + 1], by_hand)


@pytest.mark.parametrize("attention,checkpointing", [("documents", "none"), ("causal", "none"), ("documents", "full")])
def test_mtp_router_losses_and_entropy_ignore_positions_without_a_target(attention, checkpointing):
    """Perturbing an MTP block's input where its depth has no target changes none of its router terms.

    With document attention every such position (padded tail, chains across a BOS) only reaches itself
    and later positions of its own document, which have no target either; with plain causal attention
    only the tail (no target at or after it) is perturbed. The noise must change the routing there.
    With activation checkpointing the mask must also pass through ``checkpoint``.
    """
    from moeflow.models import ModelConfig
    from moeflow.models.mtp import mtp_targets
    from moeflow.models.transformer import set_activation_checkpointing

    overrides = {**tiny_model_overrides(), "mtp_depth": 2, "seq_aux_alpha": 1.0, "z_loss_weight": 1.0,
                 "lb_loss_weight": 1.0}
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(**overrides))
    with torch.no_grad():  # sharp routers: at init the scores are near uniform and hide a leak in the entropy
        for module in model.mtp:
            module.block.mlp.gate.weight.mul_(20.0)
    set_activation_checkpointing(model, checkpointing)
    rows = _packed_rows()
    inputs, targets = rows[:, :-1], rows[:, 1:]
    extra = {"mtp_boundary_BT": targets == BOS}
    if attention == "documents":
        extra["document_ids_BT"] = (inputs == BOS).long().cumsum(dim=1)
    chain = targets.masked_fill(extra["mtp_boundary_BT"], IGNORE_INDEX)

    def run(noise_scale: float):
        seen, hooks = [], []
        for j, module in enumerate(model.mtp):
            real = mtp_targets(chain, j + 1) != IGNORE_INDEX
            fake = ~real if attention == "documents" else (real.long().flip(1).cumsum(1).flip(1) == 0)
            assert fake.any() and real.any()
            noise = noise_scale * torch.randn(*real.shape, overrides["hidden_size"],
                                              generator=torch.Generator().manual_seed(j)) * fake[..., None]
            hooks.append(module.block.register_forward_pre_hook(lambda m, args, n=noise: (args[0] + n, *args[1:])))
            hooks.append(module.block.mlp.register_forward_hook(lambda m, args, out: seen.append(out[1])))
        out = model(inputs, targets=targets, **extra)  # with grad: the checkpointed path runs only then
        for h in hooks:
            h.remove()
        return out, seen

    (ref, ref_stats), (noisy, noisy_stats) = run(0.0), run(10.0)
    assert len(ref_stats) == len(noisy_stats) == len(model.mtp)
    for a, b in zip(ref_stats, noisy_stats):
        assert not torch.equal(a.topk_idx_BTK, b.topk_idx_BTK)  # the perturbation reroutes tokens
        torch.testing.assert_close(b.seq_aux_loss, a.seq_aux_loss)
        torch.testing.assert_close(b.router_entropy, a.router_entropy)
        torch.testing.assert_close(b.z_loss, a.z_loss)
        torch.testing.assert_close(b.lb_loss, a.lb_loss)
        torch.testing.assert_close(b.tokens_per_expert_E, a.tokens_per_expert_E)
        torch.testing.assert_close(b.maxvio, a.maxvio)
    for key in ("seq_aux_loss", "z_loss", "lb_loss", "mtp_loss", "router_entropy", "tokens_per_expert", "maxvio"):
        torch.testing.assert_close(noisy.aux[key], ref.aux[key], msg=key)
    torch.testing.assert_close(noisy.loss, ref.loss)
