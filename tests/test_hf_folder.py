"""The HF export is a complete model folder: transformers' AutoTokenizer and AutoModel load it, the chat
template gives our ids, and README.md is a model card with the config, lineage, metrics and expert load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.chat import render_ids, stop_ids
from moeflow.models.hf import HFConversionError, export_hf
from moeflow.models.hf_tokenizer import TOKENIZER_FILES
from moeflow.models.model_card import ModelCardInfo, expert_load_summary, maxvio_L
from moeflow.models.tokenizer import train_bpe

transformers = pytest.importorskip("transformers")

CONVO = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5, since def add(a, b) returns a + b."},
    {"role": "user", "content": "And 4 * 4?"},
]


@pytest.fixture(scope="module")
def tok():
    texts = ["def add(a, b):\n    return a + b\n" * 20, "What is 2 + 3? The answer is 5. " * 30]
    return train_bpe(texts, vocab_size=400)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tok):
    cfg = ModelConfig.preset("tiny").replace(vocab_size=512)
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    counts = np.array([[[10, 10, 10, 10, 10, 10, 10, 10]] * cfg.num_moe_layers,
                       [[40, 8, 8, 8, 8, 8, 0, 0]] * cfg.num_moe_layers], dtype=np.float32)
    counts = counts[:, :, : cfg.num_routed_experts]
    card = ModelCardInfo(name="moe-tiny", metrics={"val_loss": 3.25, "val_bpb": 1.5},
                         lineage={"curated": "file:///s/datasets/py/curated/ab12", "tokens": "file:///s/datasets/py/tokens/cd34"},
                         training={"steps": 300, "config_hash": "0123456789ab"},
                         expert_counts_NLE=counts, expert_steps_N=np.array([100, 200]))
    out = tmp_path_factory.mktemp("hf") / "model"
    export_hf(model, out, tokenizer=tok, card=card)
    return out, cfg, counts


def test_auto_tokenizer_reports_special_tokens_and_renders_our_chat_ids(export_dir, tok):
    out, cfg, _ = export_dir
    assert all((out / name).is_file() for name in TOKENIZER_FILES)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf_tok.model_max_length == cfg.max_seq_len
    for generation_prompt in (False, True):
        hf_ids = hf_tok.apply_chat_template(CONVO, tokenize=True, add_generation_prompt=generation_prompt)
        hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
        assert hf_ids == render_ids(tok, CONVO, add_generation_prompt=generation_prompt).ids
    text = "def add(a, b):\n    return a + b  # ünïcode ✓"
    assert hf_tok(text)["input_ids"] == tok.encode(text, add_bos=False)
    assert hf_tok.decode(tok.encode(text, add_bos=False)) == text


def test_config_and_generation_config_carry_the_tokenizer_ids(export_dir, tok):
    out, cfg, _ = export_dir
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    gen = transformers.GenerationConfig.from_pretrained(str(out))
    assert sorted(gen.eos_token_id) == sorted(stop_ids(tok))  # stops at <|end|> as well as <|eos|>
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.pad_token_id == tok.pad_id


def test_model_card_lists_config_lineage_metrics_and_expert_load(export_dir):
    out, cfg, counts = export_dir
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: \"transformers\"\npipeline_tag: \"text-generation\"")
    assert "# moe-tiny" in card
    assert f"| n_routed_experts | {cfg.num_routed_experts} |" in card
    assert "| tokens | `file:///s/datasets/py/tokens/cd34` |" in card
    assert "| val_loss | 3.25 |" in card and "| steps | 300 |" in card
    assert "the last window ends at step 200" in card
    # last window of layer 0: counts [40, 8, 8, 8, ...]: MaxVio = (40 - mean) / mean
    last = counts[-1, 0]
    expected = (last.max() - last.mean()) / last.mean()
    assert f"| 0 | {expected:.3f} |" in card


def test_expert_load_summary_against_a_hand_table():
    counts = np.array([[[1, 1, 1, 1], [4, 0, 0, 0]], [[3, 1, 0, 0], [1, 1, 1, 1]]], dtype=float)  # (N=2, L=2, E=4)
    rows = expert_load_summary(counts, steps_N=[5, 10])
    assert [r["layer"] for r in rows] == [0, 1] and rows[0]["last_step"] == 10
    # layer 0 last window [3,1,0,0]: mean 1, max 3 -> 2.0; whole run [4,2,1,1]: mean 2, max 4 -> 1.0
    assert rows[0]["maxvio_last"] == pytest.approx(2.0) and rows[0]["maxvio_run"] == pytest.approx(1.0)
    assert rows[0]["busiest_share"] == pytest.approx(0.75) and rows[0]["idlest_share"] == 0.0
    # layer 1 last window balanced -> 0; whole run [5,1,1,1]: mean 2, max 5 -> 1.5
    assert rows[1]["maxvio_last"] == pytest.approx(0.0) and rows[1]["maxvio_run"] == pytest.approx(1.5)
    assert maxvio_L(np.zeros((1, 4))).tolist() == [0.0]
    assert expert_load_summary(np.zeros((0, 2, 4))) == []


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, tok):
    cfg = ModelConfig.preset("tiny").replace(vocab_size=64)
    with pytest.raises(HFConversionError, match="tokenizer has"):
        export_hf(MoETransformer(cfg), tmp_path / "m", tokenizer=tok)


def test_a_foreign_tokenizer_file_is_copied_as_is_with_a_warning(tmp_path, caplog):
    foreign = tmp_path / "tokenizer.json"
    foreign.write_text('{"note": "not ours"}')
    with caplog.at_level("WARNING"):
        out = export_hf(MoETransformer(ModelConfig.preset("tiny")), tmp_path / "m", tokenizer=foreign)
    assert (out / "tokenizer.json").read_text() == '{"note": "not ours"}'
    assert not (out / "tokenizer_config.json").exists() and "not a moeflow tokenizer" in caplog.text
