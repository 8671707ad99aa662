"""Build the token shards the GPU training experiments use, here on the CPU.

Curates the whole Python standard library (``CurateConfig.preset("stdlib")``) and tokenizes it
(BPE vocab 8,192, 2 % validation) into a local store under ``.gpudata/store``; the artefact key
goes to ``.gpudata/tokens_uri.txt``. ``benchmarks/gpu_train.sh`` reads both; carry
``.gpudata/store/datasets/stdlib/tokens`` and ``.gpudata/tokens_uri.txt`` to the GPU machine
(``.gpudata/`` is git-ignored through ``.git/info/exclude``).

    python benchmarks/make_gpu_data.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / ".gpudata"


def main() -> None:
    os.environ.setdefault("MOEFLOW_HOME", str(ROOT / "home"))
    from moeflow.platform.data.curate import CurateConfig, run_curation
    from moeflow.platform.data.tokenize import TokenizeConfig, run_tokenize
    from moeflow.platform.store import LocalStore

    store = LocalStore(ROOT / "store")
    cfg = CurateConfig.preset("stdlib")
    curated = run_curation(cfg, store, output_prefix=f"datasets/stdlib/curated/{cfg.config_hash()[:12]}",
                           num_workers=1)
    print("curated", curated.uri, curated.num_docs_out, flush=True)
    tokens = run_tokenize(TokenizeConfig(vocab_size=8192, val_fraction=0.02, shard_tokens=1 << 22), store,
                          curated_uri=curated.uri, output_prefix="datasets/stdlib/tokens", num_workers=1)
    print("tokens", tokens.uri, json.dumps(tokens.stats), flush=True)
    (ROOT / "tokens_uri.txt").write_text(store.key_for_uri(tokens.uri))


if __name__ == "__main__":
    main()
