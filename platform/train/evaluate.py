"""Validation loss / bits per byte of a model on the token shards' ``val`` split, beside the unigram baseline.

The evaluate stage (``platform/eval/engine.py``) calls ``evaluate_model`` for every model it scores.

``evaluate_checkpoint`` loads a checkpoint (store URI or local directory), rebuilds the model
from its ``meta.json``, and measures on the token artefact's ``val`` split:

* ``val_loss``: mean next-token cross-entropy (nats/token, LM head only, no MTP/aux losses)
  over the fixed BOS-aligned validation rows (``loader.eval_batches``, same rows as in training);
* ``val_bpb``: bits per UTF-8 byte, ``val_loss / ln 2 / bytes_per_token`` (val split meta);
* ``unigram_loss`` / ``unigram_bpb``: the cross-entropy of the SAME target tokens under the
  train split's unigram distribution (add-one smoothed over the vocabulary so unseen ids stay
  finite). A model that has learnt anything beyond token frequencies beats it clearly.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.train.loop import bits_per_byte
# The stage config lives beside the evaluate engine (platform/eval/); flows/pipeline.py imports it from
# here, so the name stays importable from this module until the pipeline imports it from there.
from moeflow.platform.eval.config import EvaluateConfig  # noqa: F401

from .checkpoint import download_checkpoint
from .loader import eval_batches


def unigram_log_probs(ds, vocab_size: int, max_tokens: int = 50_000_000, chunk: int = 1 << 22) -> np.ndarray:
    """log p(token) from train-split counts (first ``max_tokens`` tokens), add-one smoothed, (V,)."""
    counts = np.ones(vocab_size, dtype=np.float64)
    limit = min(int(ds.num_tokens), int(max_tokens))
    for start in range(0, limit, chunk):
        ids = ds.tokens(start, min(chunk, limit - start))
        if ids.size and int(ids.max()) >= vocab_size:
            raise ValueError(f"token id {int(ids.max())} >= vocab_size {vocab_size} in the train split")
        counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    return np.log(counts / counts.sum())


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> MoETransformer:
    from moeflow.models.train import state as train_state  # torch.distributed.checkpoint: slow to import

    meta = train_state.read_meta(checkpoint_dir)
    if not meta.get("model_config"):
        raise ValueError(f"checkpoint {checkpoint_dir} has no model_config in meta.json")
    model = MoETransformer(ModelConfig.from_dict(meta["model_config"]))
    model.load_state_dict(train_state.load_model_weights(checkpoint_dir))
    return model.to(device)


@torch.no_grad()
def evaluate_model(model: MoETransformer, train_ds, val_ds, *, seq_len: int, batch_size: int = 8,
                   num_batches: int = 16, bytes_per_token: float | None = None,
                   device: str | torch.device = "cpu") -> dict[str, float]:
    model.eval()
    batches = eval_batches(val_ds, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches)
    if not batches:
        raise ValueError(f"validation split has no full batch of {batch_size} rows x {seq_len + 1} tokens")
    log_p = unigram_log_probs(train_ds, model.cfg.vocab_size)
    use_bf16 = torch.device(device).type == "cuda"
    total_nll = total_unigram = 0.0
    total_targets = 0
    for batch_BT1 in batches:
        batch_BT1 = batch_BT1.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            out = model(batch_BT1[:, :-1], targets=batch_BT1[:, 1:])
        targets = batch_BT1[:, 1:].reshape(-1).cpu().numpy()
        total_nll += float(out.aux["lm_loss"]) * targets.size
        total_unigram += float(-log_p[targets].sum())
        total_targets += targets.size
    bpt = bytes_per_token or val_ds.meta.get("bytes_per_token")
    metrics = {"val_loss": total_nll / total_targets, "unigram_loss": total_unigram / total_targets,
               "val_targets": float(total_targets)}
    if bpt:
        metrics["val_bpb"] = bits_per_byte(metrics["val_loss"], bpt)
        metrics["unigram_bpb"] = bits_per_byte(metrics["unigram_loss"], bpt)
        metrics["bytes_per_token"] = float(bpt)
    metrics["val_perplexity"] = math.exp(min(metrics["val_loss"], 50.0))
    return metrics


def evaluate_checkpoint(checkpoint: str | Path, tokens_uri: str, *, seq_len: int | None = None,
                        batch_size: int = 8, num_batches: int = 16, bytes_per_token: float | None = None,
                        device: str | torch.device = "cpu", cache_dir: str | Path | None = None) -> dict[str, float]:
    """Validation loss / bpb of a checkpoint and the unigram baseline on the same targets.

    ``checkpoint``: a checkpoint artefact URI or a local checkpoint directory. ``seq_len``
    defaults to the training sequence length recorded in the checkpoint.
    """
    from moeflow.models.train import state as train_state
    from moeflow.platform.data.shards import TokenDataset

    path = Path(checkpoint)
    if path.is_dir():
        meta, model = train_state.read_meta(path), load_model(path, device)
    else:  # the download lives only while loading: no checkpoint copy is left in the temp dir, also on errors
        with tempfile.TemporaryDirectory(prefix="moeflow-ckpt-") as tmp:
            local = download_checkpoint(str(checkpoint), tmp)
            meta, model = train_state.read_meta(local), load_model(local, device)
    seq_len = seq_len or int(meta["pretrain_config"]["seq_len"])
    train_ds = TokenDataset.open(tokens_uri, "train", cache_dir=cache_dir)
    val_ds = TokenDataset.open(tokens_uri, "val", cache_dir=cache_dir)
    metrics = evaluate_model(model, train_ds, val_ds, seq_len=seq_len, batch_size=batch_size,
                             num_batches=num_batches, bytes_per_token=bytes_per_token, device=device)
    metrics["step"] = float(meta["step"])
    return metrics
