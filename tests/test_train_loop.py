"""Loop pieces against tables (schedules, loss assembly, bias hook) and the loop on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.models import MoETransformer
from moeflow.models.train import state as train_state
from moeflow.models.train.loop import Trainer, assemble_loss, bits_per_byte, global_maxvio
from moeflow.platform.train.config import PretrainConfig
from moeflow.models.train.metrics import mfu
from moeflow.models.train.optim import build_adamw, split_decay_groups
from moeflow.models.train.schedules import lr_at, warmup_cosine, warmup_stable_decay
from moeflow.platform.train.loader import PackedLoader, eval_batches
from train_fakes import ArrayTokens, one_thread, pattern_docs, tiny_model_overrides


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# ------------------------------------------------------------------ schedules
@pytest.mark.parametrize("step,expected", [(0, 0.25), (3, 1.0), (4, 1.0), (9, 0.1 + 0.45 * (1 + math.cos(math.pi * 5 / 6))),
                                           (10, 0.1), (50, 0.1)])
def test_warmup_cosine_table(step, expected):
    assert warmup_cosine(step, max_lr=1.0, warmup_steps=4, total_steps=10, min_lr_ratio=0.1) == pytest.approx(expected)


@pytest.mark.parametrize("step,expected", [(0, 0.5), (1, 1.0), (5, 1.0), (7, 1.0), (8, 1.0), (9, 0.5), (10, 0.0)])
def test_warmup_stable_decay_table(step, expected):
    # 10 steps, warmup 2, decay the last 20 % (steps 8, 9) linearly to 0
    assert warmup_stable_decay(step, max_lr=1.0, warmup_steps=2, total_steps=10, decay_fraction=0.2) == pytest.approx(expected)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, schedule="linear", max_lr=1.0, warmup_steps=0, total_steps=10)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, max_lr=1.0, warmup_steps=11, total_steps=10)


def test_metrics_tables():
    assert bits_per_byte(math.log(2) * 3.0, 1.5) == pytest.approx(2.0)
    assert mfu(1000.0, 798e9) == pytest.approx(1.0)
    assert mfu(1000.0, 798e9, num_devices=4) == pytest.approx(0.25)
    vio = global_maxvio(torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]]))
    assert vio.tolist() == pytest.approx([0.0, 3.0])


# ------------------------------------------------------------------ optimiser groups
def test_weight_decay_groups_skip_norms_and_buffers():
    cfg = PretrainConfig(model_overrides=tiny_model_overrides())
    model = MoETransformer(cfg.build_model_config())
    decay, no_decay = split_decay_groups(model)
    assert all("norm" in n for n in no_decay) and no_decay
    assert "model.embed_tokens.weight" in decay and "lm_head.weight" in decay
    assert any(n.endswith("experts.gate_up_proj") for n in decay)
    assert not any("e_score_correction_bias" in n for n in decay + no_decay)  # a buffer, not a parameter
    _, no_decay_emb = split_decay_groups(model, decay_embeddings=False)
    assert "model.embed_tokens.weight" in no_decay_emb
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


# ------------------------------------------------------------------ loss assembly and the bias hook
def test_assemble_loss_matches_the_model_objective():
    mcfg = PretrainConfig(model_overrides={**tiny_model_overrides(), "mtp_depth": 1, "seq_aux_alpha": 0.01,
                                           "z_loss_weight": 1e-3, "lb_loss_weight": 0.01}).build_model_config()
    torch.manual_seed(0)
    model = MoETransformer(mcfg)
    ids = torch.randint(2, 64, (2, 17))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    parts = out.aux
    assert all(float(parts[k]) > 0 for k in ("lm_loss", "mtp_loss", "seq_aux_loss", "z_loss", "lb_loss"))
    expected = parts["lm_loss"] + 0.3 * parts["mtp_loss"] + parts["seq_aux_loss"] + parts["z_loss"] + parts["lb_loss"]
    assert float(assemble_loss(parts, mcfg.mtp_loss_weight)) == pytest.approx(float(expected), rel=1e-6)
    assert float(assemble_loss(parts, mcfg.mtp_loss_weight)) == pytest.approx(float(out.loss.detach()), rel=1e-6)


def _tiny_setup(tmp_seed=0, **cfg_kw):
    docs = pattern_docs(300, seed=tmp_seed)
    ds = ArrayTokens(docs, vocab_size=64)
    base = dict(model_overrides=tiny_model_overrides(), seq_len=32, micro_batch_size=4, max_steps=30,
                lr=1e-2, warmup_steps=3, log_every=1, val_every=0, seed=0)
    base.update(cfg_kw)
    cfg = PretrainConfig(**base)
    return cfg, ds


def _build(cfg, ds, val=False):
    torch.manual_seed(cfg.seed)
    model = MoETransformer(cfg.build_model_config())
    loader = PackedLoader(ds, seq_len=cfg.seq_len, batch_size=cfg.micro_batch_size, seed=cfg.seed)
    val_fn = (lambda: eval_batches(ds, seq_len=cfg.seq_len, batch_size=4, num_batches=2)) if val else None
    return Trainer(cfg, model, loader, val_batches=val_fn, bytes_per_token=ds.meta["bytes_per_token"],
                   bos_id=ds.meta["bos_id"]), loader


def test_bias_update_uses_counts_summed_over_micro_batches():
    cfg, ds = _tiny_setup(grad_accum_steps=3, max_steps=2, warmup_steps=1)
    trainer, loader = _build(cfg, ds)
    seen = []
    original = trainer.model.apply_router_bias_update
    trainer.model.apply_router_bias_update = lambda counts, gamma=None: (seen.append(counts.clone()), original(counts))
    # the same 3 micro-batches, forwarded by hand with the pre-step weights
    probe = PackedLoader(ds, seq_len=cfg.seq_len, batch_size=cfg.micro_batch_size, seed=cfg.seed, prefetch=0)
    batches = [b for _, b in zip(range(3), probe._batches({"epoch": 0, "row": 0}))]
    with torch.no_grad():
        expected = sum(trainer.model(torch.from_numpy(b)[:, :-1]).aux["tokens_per_expert"] for b, _ in batches)
    bias_before = trainer.model.routers()[0].e_score_correction_bias.clone()
    trainer.train_step()
    assert len(seen) == 1  # once per optimiser step, not per micro-batch
    assert torch.equal(seen[0], expected)
    assert float(seen[0].sum()) == 3 * cfg.micro_batch_size * cfg.seq_len * 2  # k=2 slots per token
    bias_after = trainer.model.routers()[0].e_score_correction_bias
    step = torch.sign(expected[0].mean() - expected[0]) * 1e-3
    assert torch.allclose(bias_after - bias_before, step - step.mean(), atol=1e-7)
    loader.close()


# ------------------------------------------------------------------ the loop
def test_loss_falls_and_validation_reports_bpb():
    cfg, ds = _tiny_setup(max_steps=30, val_every=30)
    trainer, loader = _build(cfg, ds, val=True)
    history = trainer.fit()
    loader.close()
    losses = [h["loss"] for h in history]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    last = history[-1]
    assert last["val_bpb"] == pytest.approx(last["val_loss"] / math.log(2) / 3.0)
    for key in ("lm_loss", "seq_aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "maxvio_batch/layer0",
                "maxvio_global/layer0", "router_entropy/layer0", "router_bias/mean_abs"):
        assert key in last, key
    assert last["router_bias/mean_abs"] > 0


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    cfg, ds = _tiny_setup(max_steps=12, grad_accum_steps=2, log_every=2, checkpoint_every=5)
    ref, ref_loader = _build(cfg, ds)
    ref.fit()
    ref_loader.close()

    first, loader = _build(cfg, ds)
    first.fit(until_step=5)  # mid log-interval on purpose
    train_state.save(train_state.capture(first, loader), tmp_path / "ckpt")
    loader.close()
    torch.manual_seed(1234)  # a resumed process starts from different RNG/weights
    resumed, loader2 = _build(cfg.__class__(**{**cfg.to_dict(), "seed": cfg.seed}), ds)
    with torch.no_grad():
        for p in resumed.model.parameters():
            p.add_(1.0)
    train_state.restore(resumed, tmp_path / "ckpt", loader2)
    assert resumed.step == 5
    resumed.fit()
    loader2.close()
    strip = lambda hs: [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in hs]
    assert strip(resumed.history) == strip(ref.history)
    for (name, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_dense_twin_and_balancing_variants_train():
    """The experiment knobs: dense twin (no routers) and no-balancing / seq-aux-only MoE runs."""
    for kw in ({"dense_twin": True},
               {"model_overrides": {**tiny_model_overrides(), "mtp_depth": 1}},
               {"model_overrides": {**tiny_model_overrides(), "balancing": "none", "seq_aux_alpha": 0.0}},
               {"model_overrides": {**tiny_model_overrides(), "balancing": "none", "seq_aux_alpha": 1e-2}}):
        cfg, ds = _tiny_setup(max_steps=4, warmup_steps=1, log_every=2, **kw)
        trainer, loader = _build(cfg, ds)
        history = trainer.fit()
        loader.close()
        assert len(history) == 2 and math.isfinite(history[-1]["loss"])
        if cfg.build_model_config().mtp_depth:  # MTP routers get their own rows; MTP loss is logged
            assert "maxvio_batch/layer1" in history[-1] and history[-1]["mtp_loss"] > 0
            assert trainer.boundary_id == 1
        elif cfg.dense_twin:
            assert trainer.model.cfg.num_moe_layers == 0 and "maxvio_batch/mean" not in history[-1]
        else:
            assert history[-1]["router_bias/max_abs"] == 0.0  # balancing off: the bias never moves
            assert (history[-1]["seq_aux_loss"] > 0) == (cfg.build_model_config().seq_aux_alpha > 0)
