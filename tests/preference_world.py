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


LEARNABLE_TASKS = ("Sort the list", "Reverse the list", "How many letters")


def pair_type(prompt: str) -> str:
    """The generator's task of a pair's prompt: add/sub/mul/succ/sort/reverse/length."""
    for name, start in (("sort", "Sort the list"), ("reverse", "Reverse the list"), ("length", "How many letters"),
                        ("succ", "What number comes after")):
        if prompt.startswith(start):
            return name
    return {"+": "add", "-": "sub", "*": "mul"}[prompt.split()[3]]


def learnable_pairs(store, sets, path, shuffle: bool = False, seed: int = 0, tasks=LEARNABLE_TASKS) -> str:
    """The generated pairs whose corruption a tiny model can learn to spot in a few hundred CPU steps —
    list answers with two entries swapped and wrong letter counts — as one JSONL folder (train + heldout);
    ``tasks=None`` keeps every pair (the full set); ``shuffle`` swaps chosen and rejected in exactly half
    the TRAIN pairs (the control)."""
    import json
    import random

    from moeflow.platform.posttrain.data import to_jsonl

    path.mkdir(parents=True, exist_ok=True)
    art = store.read_artifact(sets.preference_uri)
    for split in ("train", "heldout"):
        rows = [json.loads(line) for line in art.get_bytes(f"{split}.jsonl").decode().splitlines()]
        rows = [r for r in rows if tasks is None or r["prompt"].startswith(tasks)]
        if shuffle and split == "train":
            flip = set(random.Random(seed).sample(range(len(rows)), len(rows) // 2))
            rows = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i in flip else r
                    for i, r in enumerate(rows)]
        (path / f"{split}.jsonl").write_bytes(to_jsonl(rows))
    return str(path)
