"""Evaluating a checkpoint leaves nothing in the temp directory and never copies the optimiser.

A stored checkpoint holds the weights, meta.json and the training state (optimiser, trainer) that
only resuming needs; loading for evaluation or inference fetches the first two, and files fetched to a
temporary directory are gone afterwards, also when loading or the evaluation fails.
"""

from __future__ import annotations

import json
import tempfile

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.tokenizer import train_bpe
from moeflow.models.train import state as train_state
from moeflow.models.train.state import META_FILE, MODEL_FILE, OPTIM_FILE, TRAINER_FILE
from moeflow.platform import model_refs
from moeflow.platform.store import LocalStore


@pytest.fixture(params=[1, 2], ids=["full", "sharded"])
def checkpoint(tmp_path, request):
    """A real checkpoint artefact (weights, AdamW state after one step, trainer state, meta) and a tokenizer,
    in the full format (model.pt, optimizer.pt) and in the sharded one (DCP folders model/, optim/)."""
    tok = train_bpe(["def f(x):\n    return x + 1\n", "the quick brown fox jumps"] * 20, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, max_seq_len=64)
    model = MoETransformer(cfg)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():  # one step creates AdamW's two moments per parameter
        p.grad = torch.zeros_like(p)
    opt.step()
    local = tmp_path / "ckpt"
    local.mkdir()
    meta = {"step": 1, "model_config": cfg.to_dict(), "pretrain_config": {"seq_len": 32}}
    if request.param == 1:
        torch.save(model.state_dict(), local / MODEL_FILE)
        torch.save(opt.state_dict(), local / OPTIM_FILE)
        torch.save({"loop": {"step": 1}}, local / TRAINER_FILE)
        (local / META_FILE).write_text(json.dumps(meta))
        weights, resume = [MODEL_FILE], OPTIM_FILE
    else:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        train_state.save({"model": model.state_dict(), "optimizer": get_optimizer_state_dict(model, opt),
                          "trainer": {"loop": {"step": 1}}, "meta": meta}, local)
        weights, resume = [f"{train_state.MODEL_DIR}/.metadata", f"{train_state.MODEL_DIR}/__0_0.distcp"], \
            f"{train_state.OPTIM_DIR}/__0_0.distcp"
    store = LocalStore(tmp_path / "store")
    with store.write_artifact("saved/step-000001") as w:
        for p in sorted(local.rglob("*")):
            if p.is_file():
                w.put_file(p.relative_to(local).as_posix(), p)
    tok.save(tmp_path / "tokenizer.json")
    assert (local / resume).stat().st_size > (local / weights[-1]).stat().st_size  # AdamW: two moments
    return {"store": store, "uri": w.uri, "tokenizer": str(tmp_path / "tokenizer.json"), "model": model,
            "weights": weights}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The process's temp directory, empty at the start: what is left in it is residue."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def test_loading_a_stored_checkpoint_leaves_no_temp_copy(checkpoint, scratch):
    loaded = model_refs.load(checkpoint["uri"], tokenizer=checkpoint["tokenizer"], store=checkpoint["store"])
    assert list(scratch.iterdir()) == []
    assert loaded.local_dir is None and loaded.meta["step"] == 1
    for (name, a), b in zip(loaded.model.state_dict().items(), checkpoint["model"].state_dict().values()):
        assert torch.equal(a, b), name


def test_a_failed_load_leaves_no_temp_copy(checkpoint, scratch, tmp_path):
    bad = tmp_path / "too-big-tokenizer.json"
    train_bpe(["lots of different words " + str(i) for i in range(400)] * 3, vocab_size=600).save(bad)
    with pytest.raises(model_refs.ModelRefError, match="vocabulary"):
        model_refs.load(checkpoint["uri"], tokenizer=str(bad), store=checkpoint["store"])
    assert list(scratch.iterdir()) == []


def test_only_the_weights_are_fetched_into_a_cache_dir(checkpoint, tmp_path):
    cache = tmp_path / "cache"
    loaded = model_refs.load(checkpoint["uri"], tokenizer=checkpoint["tokenizer"], store=checkpoint["store"],
                             cache_dir=cache)
    fetched = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    assert fetched == sorted([*checkpoint["weights"], META_FILE])  # no optimiser, no trainer state
    assert loaded.local_dir == cache


def test_an_evaluation_leaves_no_temp_residue_even_when_it_fails(checkpoint, scratch):
    from moeflow.platform.eval.config import EvaluateConfig
    from moeflow.platform.eval.engine import run_evaluate

    config = EvaluateConfig(tasks=["arith_mc"], limit=2, specialisation_texts=1, num_batches=1, batch_size=2)
    result = run_evaluate(config, checkpoint["store"], model_uris=[checkpoint["uri"]],
                          tokenizer_uri=checkpoint["tokenizer"])
    assert result.models[0].metrics
    assert list(scratch.iterdir()) == []
    with pytest.raises(Exception):  # the validation split of a token artefact that does not exist
        run_evaluate(config, checkpoint["store"], model_uris=[checkpoint["uri"]],
                     tokenizer_uri=checkpoint["tokenizer"], tokens_uri=checkpoint["store"].uri("tokens/missing"))
    assert list(scratch.iterdir()) == []


def test_evaluating_a_stored_checkpoint_leaves_no_temp_copy(checkpoint, scratch):
    """``platform.train.evaluate.evaluate_checkpoint`` (pretraining's val loss of a stored checkpoint) fetched the
    whole checkpoint, optimiser included, to a ``moeflow-ckpt-*`` temp dir and left it there; the fetch now lives
    only while loading (here the token artefact is missing, so the evaluation fails after loading)."""
    from moeflow.platform.train.evaluate import evaluate_checkpoint

    with pytest.raises(Exception):
        evaluate_checkpoint(checkpoint["uri"], checkpoint["store"].uri("no/such/tokens"))
    assert list(scratch.iterdir()) == []
