"""What document-masked attention costs beside plain causal (issue 9): bench_ref train-step tokens/s.

Pretraining packs several BOS-started documents into each row; with ``document_masking`` (the
default) a token attends only within its document. Three ways to run a step on the same weights and
batches, interleaved in one process (A B C A B C ...):

- ``causal``      plain causal over the whole row (no document ids: SDPA's fused causal kernel)
- ``doc_sdpa``    document mask as a dense (B, 1, T, T) bool tensor through SDPA
- ``doc_flex``    document mask as a FlexAttention BlockMask (compiled flex kernel; the CUDA default)

Documents: lengths drawn from a geometric distribution with mean ``--mean-doc-len`` (default 512), so
a 2048-token row holds ~4 documents. bf16 parameters, forward + backward (no optimiser step, so every
variant sees the same weights; the attention kernel is the only difference); with
``--compile`` the blocks are compiled (``compile_blocks``), as in the training loop's default.

    python3 benchmarks/bench_doc_attention.py --compile        # GPU: bench_ref, B 8 × 2048
    python3 benchmarks/bench_doc_attention.py --smoke          # CPU: tiny, 3 steps (flex skipped: no CPU backward)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.attention import MLA
from moeflow.models.transformer import compile_blocks

BOS = 1


def packed_rows(batch: int, seq_len: int, vocab: int, mean_doc_len: int, seed: int) -> torch.Tensor:
    """(batch, seq_len + 1) token rows with BOS at geometric document starts."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(2, vocab, (batch, seq_len + 1), generator=gen)
    starts = torch.rand(batch, seq_len + 1, generator=gen) < 1.0 / mean_doc_len
    starts[:, 0] = True
    rows[starts] = BOS
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--preset", default="bench_ref")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--mean-doc-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.seq_len, args.steps, args.warmup, args.mean_doc_len = "tiny", 2, 64, 3, 1, 16
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cfg = ModelConfig.preset(args.preset)
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    if args.compile:
        compile_blocks(model)
    batches = [packed_rows(args.batch, args.seq_len, cfg.vocab_size, args.mean_doc_len, seed).to(device)
               for seed in range(4)]
    variants = ["causal", "doc_sdpa"] + (["doc_flex"] if device.type == "cuda" else [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, float] = {}

    def step(variant: str, rows: torch.Tensor) -> float:
        inputs, targets = rows[:, :-1], rows[:, 1:]
        extra = {}
        if variant != "causal":
            MLA.document_kernel = "flex" if variant == "doc_flex" else "sdpa"
            extra["document_ids_BT"] = (inputs == BOS).long().cumsum(dim=1)
        out = model(inputs, targets=targets, **extra)
        out.loss.backward()
        model.zero_grad(set_to_none=True)  # no optimiser step: every variant sees the same weights
        return float(out.aux["lm_loss"])

    for i in range(args.warmup + args.steps):
        for variant in variants:
            rows = batches[i % len(batches)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step(variant, rows)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[variant].append(time.perf_counter() - t0)
            if i == 0:
                losses[variant] = loss
    MLA.document_kernel = "auto"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    docs_per_row = float(sum(int((b[:, :-1] == BOS).sum()) for b in batches) / (len(batches) * args.batch))
    rows_out = []
    for variant, ts in times.items():
        median = statistics.median(ts)
        rows_out.append({"variant": variant, "step_s": median, "tokens_per_s": args.batch * args.seq_len / median,
                         "first_loss": losses[variant], "preset": args.preset, "batch": args.batch,
                         "seq_len": args.seq_len, "docs_per_row": docs_per_row, "compile": args.compile,
                         "device": name, "steps": args.steps})
    for row in rows_out:
        print(json.dumps(row))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    base = rows_out[0]["tokens_per_s"]
    print(f"\n{'variant':10} {'tok/s (fwd+bwd)':>16} {'step ms':>9} {'vs causal':>10}   ({docs_per_row:.1f} docs/row, {name})")
    for row in rows_out:
        print(f"{row['variant']:10} {row['tokens_per_s']:16,.0f} {row['step_s'] * 1e3:9.1f} "
              f"{row['tokens_per_s'] / base:10.3f}")


if __name__ == "__main__":
    main()
