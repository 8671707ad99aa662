"""A store with a tiny base model (HF export + tokenizer) in a catalog and generated preference pairs:
what the reward and align stage tests start from."""

from __future__ import annotations

import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models import hf as H
from moeflow.models.tokenizer import train_bpe
from moeflow.platform.catalog import Catalog
from moeflow.platform.posttrain.generated import GeneratedDataConfig, write_generated_sets
from moeflow.platform.store.local import LocalStore
from train_fakes import tiny_model_overrides

DATA = GeneratedDataConfig(max_functions=0, num_arithmetic=700, max_operand=20, heldout_fraction=0.15)


def make_world(root, data: GeneratedDataConfig = DATA) -> dict:
    store = LocalStore(root / "store")
    catalog = Catalog(f"sqlite:///{root / 'catalog.db'}")
    sets = write_generated_sets(store, data, catalog=catalog)
    texts = store.read_artifact(sets.preference_uri).get_bytes("train.jsonl").decode().splitlines()
    tok = train_bpe(texts * 3, vocab_size=384)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(**tiny_model_overrides(tok.vocab_size)))
    local = root / "base-hf"
    H.export_hf(model, local, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    tok.save(local / "tokenizer.json")
    with store.write_artifact("runs/base/hf") as w:
        for p in sorted(local.iterdir()):
            w.put_file(p.name, p)
    base_uri = store.uri("runs/base/hf")
    base_id = catalog.register_model("moe-tiny", base_uri, "base")
    return {"store": store, "catalog": catalog, "sets": sets, "base_uri": base_uri, "base_id": base_id,
            "root": root, "tokenizer": tok}
