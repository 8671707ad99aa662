"""Pretraining's finalisation writes a complete Hugging Face folder once, logs final values as summaries and
expert load as a heatmap: run_pretrain in-process on token shards made with a real BPE tokenizer."""

from __future__ import annotations

import json

import pytest
from train_fakes import one_thread, tiny_model_overrides, write_token_artifact

from moeflow.models.chat import render_ids
from moeflow.models.tokenizer import train_bpe
from moeflow.platform.store import LocalStore
from moeflow.platform.tracking import NoopTracker
from moeflow.platform.train.config import PretrainConfig
from moeflow.platform.train.launcher import run_pretrain

transformers = pytest.importorskip("transformers")

TEXTS = ["def add(a, b):\n    return a + b\n", "What is 2 + 3? The answer is 5.", "for i in range(10):\n    print(i)\n"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tok = train_bpe([t * 30 for t in TEXTS], vocab_size=320)
    docs = [tok.encode(t * 3, add_bos=True, add_eos=True) for t in TEXTS] * 20
    store = LocalStore(tmp_path_factory.mktemp("store"))
    curated = "file:///somewhere/datasets/py/curated/0123abcd"
    tokens_uri = write_token_artifact(store, "datasets/py/tokens/abc", docs, docs[:6], vocab_size=tok.vocab_size,
                                      bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                      tokenizer_json=tok.to_str(), extra_meta={"curated_uri": curated})
    config = PretrainConfig(model_overrides=tiny_model_overrides(vocab=tok.vocab_size), seq_len=32,
                            micro_batch_size=4, max_steps=6, lr=1e-2, warmup_steps=1, log_every=2, val_every=6,
                            val_batches=1, checkpoint_every=6, keep_checkpoints=1)
    tracker = NoopTracker()
    with one_thread(), tracker.start_run("pretrain"):
        result = run_pretrain(config, store, tokens_uri=tokens_uri, output_prefix="runs/export", tracker=tracker,
                              model_name="moe-export")
    return store, result, tracker, tok, tokens_uri, curated


def test_hf_artefact_is_a_complete_model_folder(trained, tmp_path):
    store, result, _, tok, tokens_uri, curated = trained
    art = store.read_artifact(result.hf_uri)
    names = set(art.names())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) == 1  # the weights once
    local = art.download(tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(local))
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    convo = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    ids = hf_tok.apply_chat_template(convo, tokenize=True)
    assert (ids["input_ids"] if hasattr(ids, "keys") else ids) == render_ids(tok, convo).ids
    model = transformers.AutoModelForCausalLM.from_pretrained(str(local))
    assert model.config.vocab_size == tok.vocab_size
    # exported from a sharded (DCP) checkpoint: the same weights as the checkpoint's
    import torch

    from moeflow.models.train.state import checkpoint_format, load_model_weights

    ckpt = store.read_artifact(result.checkpoint_uri)
    assert "model/.metadata" in ckpt.names() and "model.pt" not in ckpt.names()
    weights = load_model_weights(ckpt.download(tmp_path / "ckpt"))
    assert checkpoint_format(tmp_path / "ckpt") == 2
    exported = model.state_dict()
    assert torch.equal(exported["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])
    card = art.get_bytes("README.md").decode()
    assert "# moe-export" in card and f"| tokens | `{tokens_uri}` |" in card and f"| curated | `{curated}` |" in card
    assert f"| checkpoint | `{result.checkpoint_uri}` |" in card and "| steps | 6 |" in card
    assert f"| val_loss | {result.metrics['val_loss']:.4g} |" in card
    assert "## Expert load" in card and "| 0 |" in card  # one MoE layer (first_k_dense=1 of 2)
    assert json.loads(art.get_bytes("generation_config.json"))["pad_token_id"] == tok.pad_id


def test_final_values_are_summaries_and_expert_load_is_a_heatmap(trained):
    _, result, tracker, *_ = trained
    assert tracker.summary == {f"final/{k}": v for k, v in result.metrics.items()}
    assert not tracker.metric_history("final/val_loss")
    assert tracker.figures == ["expert_load/heatmap.png"]
    per_expert = [k for values, _ in tracker.metrics for k in values if k.startswith("expert_load/") and "/expert" in k]
    assert per_expert == [] and tracker.metric_history("expert_load/layer0/max_share")
