"""Post-training throughput: our SFT, DPO and reward steps beside TRL's SFTTrainer / DPOTrainer / RewardTrainer,
in the same process.

One model, one data set, one sequence length for both sides:

* the model: ``bench_ref`` (BENCHMARKS.md) at random init (seed 0), exported to Hugging Face ``DeepseekV3``
  format by ``models.hf.export_hf``; TRL trains that export loaded by transformers, we train our own
  ``MoETransformer``. Both keep fp32 master weights and run the step under bf16 autocast (TRL: model
  loaded in fp32, ``bf16=True``), fused AdamW, lr 1e-5, clip 1.0, no weight decay, eager (no compile).
* the data: random token ids from a word-level tokenizer in which every word is one token, so text
  tokenises to exactly the planned lengths. SFT: ``--batch`` rows of ``--seq`` tokens, loss on every
  token (pre-tokenised for TRL). DPO: ``--batch`` pairs, prompt ``--prompt`` tokens and each reply
  ``--reply`` tokens (TRL appends EOS to each reply; its token count is read from its own dataset). Reward: the
  same pairs, both sides scored by the model with a scalar head (pre-tokenised for TRL, so both sides hold the
  same ids as ours; no EOS appended).
* ours: the engine core's ``PostTrainer`` (``platform/posttrain/engine.py``) — the LM objective on dict
  batches for SFT, ``align.DPOObjective`` for DPO with the reference log-probs computed once before the
  timed steps (our design: no reference model in memory during the update). TRL's DPOTrainer runs as
  configured by default (``precompute_ref_log_probs=False``: a reference copy scores every step) and,
  with ``--trl-precompute``, also with ``precompute_ref_log_probs=True`` (the like-for-like setting).
  Reward: ``reward.RewardObjective`` (Bradley–Terry) on ``RewardModel`` (our LM + a linear head on the last real
  token); TRL's ``RewardTrainer`` trains ``AutoModelForSequenceClassification`` (``num_labels=1``) loaded from the
  same export, with ``gradient_checkpointing=False`` (TRL's reward default is True; we do not recompute).
* tokens/s: tokens per optimiser step ÷ median step time over the timed steps (CUDA-synchronised,
  after ``--warmup`` steps). DPO and reward count both sides of every pair (prompt + reply each).

Writes one JSON line per measurement to ``--out`` and prints them. Usage on the GPU::

    python benchmarks/bench_posttrain.py --out results/posttrain_h200.jsonl
    python benchmarks/bench_posttrain.py --smoke   # CPU: the tiny preset, short rows, 2 timed steps, every bench (TRL rows need trl)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO.parent) not in sys.path:  # run as a script from a checkout: import the checkout as `moeflow`
    sys.path.insert(0, str(REPO.parent))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def word_tokenizer(vocab: int, directory: Path):
    """A transformers fast tokenizer in which the word ``w{i}`` is token id i (i ≥ 4; ids 0–3 are specials),
    so TRL tokenises our text into exactly the ids our own batches hold."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    words = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(len(specials), vocab)])}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def _text(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def build_model(args, device: str):
    from moeflow.models import ModelConfig, MoETransformer

    cfg = ModelConfig.preset(args.preset).replace(vocab_size=args.vocab, max_seq_len=max(args.seq, args.prompt + args.reply + 8))
    torch.manual_seed(0)
    return MoETransformer(cfg).to(device)


def timed(step, n_warm: int, n_timed: int, device: str) -> list[float]:
    times = []
    for i in range(n_warm + n_timed):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i >= n_warm:
            times.append(time.perf_counter() - t0)
    return times


def row(name: str, tokens_per_step: int, times: list[float], **extra) -> dict:
    med = statistics.median(times)
    return {"bench": name, "tokens_per_step": tokens_per_step, "median_step_s": med, "tokens_per_s": tokens_per_step / med,
            "steps_timed": len(times), **extra}


# ------------------------------------------------------------------ ours
def ours_sft(args, model, rows_NS1: torch.Tensor, device: str, compile: bool = False) -> dict:
    from moeflow.platform.posttrain.engine import PostTrainConfig, PostTrainer

    cfg = PostTrainConfig(max_steps=10_000, lr=1e-5, micro_batch_size=args.batch, seq_len=args.seq, warmup_steps=0,
                          log_every=10_000, weight_decay=0.0, grad_clip=1.0, checkpoint_every=0, compile=compile)
    batches = [{"input_ids": rows_NS1[i:i + args.batch, :-1], "targets": rows_NS1[i:i + args.batch, 1:]}
               for i in range(0, len(rows_NS1), args.batch)]
    trainer = PostTrainer(cfg, model, _cycle(batches), device=device)
    times = timed(trainer.train_step, args.warmup, args.steps, device)
    return row("ours_sft_compiled" if compile else "ours_sft", args.batch * args.seq, times)


def ours_dpo(args, model, pairs: list[tuple[list[int], list[int], list[int]]], device: str,
             compile: bool = False) -> dict:
    from moeflow.models.align import pairs as P
    from moeflow.platform.posttrain.align import AlignConfig, DPOObjective, reference_logprobs
    from moeflow.platform.posttrain.engine import PostTrainer

    rendered = [P.RenderedPair(p + c, [0] * len(p) + [1] * len(c), p + r, [0] * len(p) + [1] * len(r)) for p, c, r in pairs]
    pair_set = P.PairSet(rendered, pad_id=0)
    cfg = AlignConfig(max_steps=10_000, lr=1e-5, micro_batch_size=args.batch, seq_len=args.prompt + args.reply,
                      warmup_steps=0, log_every=10_000, weight_decay=0.0, grad_clip=1.0, checkpoint_every=0, beta=0.1,
                      compile=compile)
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        pair_set.reference = reference_logprobs(model, pair_set, average=False, batch_size=args.batch, device=device)
    _sync(device)
    ref_s = time.perf_counter() - t0
    batches = pair_set.batches(args.batch)
    trainer = PostTrainer(cfg, model, _cycle(batches), objective=DPOObjective(cfg), device=device)
    times = timed(trainer.train_step, args.warmup, args.steps, device)
    return row("ours_dpo_compiled" if compile else "ours_dpo", 2 * args.batch * (args.prompt + args.reply), times,
               reference_precompute_s=ref_s, pairs=len(pairs))


def ours_reward(args, model, pairs: list[tuple[list[int], list[int], list[int]]], device: str,
                compile: bool = False) -> dict:
    from moeflow.models.align import pairs as P
    from moeflow.models.align.reward import RewardModel
    from moeflow.platform.posttrain.engine import PostTrainer
    from moeflow.platform.posttrain.reward import RewardConfig, RewardObjective

    rendered = [P.RenderedPair(p + c, [0] * len(p) + [1] * len(c), p + r, [0] * len(p) + [1] * len(r)) for p, c, r in pairs]
    cfg = RewardConfig(max_steps=10_000, lr=1e-5, micro_batch_size=args.batch, seq_len=args.prompt + args.reply,
                       warmup_steps=0, log_every=10_000, weight_decay=0.0, grad_clip=1.0, checkpoint_every=0)
    if compile:  # per decoder block, as the SFT/DPO rows (the Trainer would compile the whole reward module)
        from moeflow.models.transformer import compile_blocks

        compile_blocks(model)
    torch.manual_seed(0)
    reward_model = RewardModel(model).to(device)
    trainer = PostTrainer(cfg, reward_model, _cycle(P.PairSet(rendered, pad_id=0).batches(args.batch)),
                          objective=RewardObjective(cfg), device=device)
    times = timed(trainer.train_step, args.warmup, args.steps, device)
    return row("ours_reward_compiled" if compile else "ours_reward", 2 * args.batch * (args.prompt + args.reply), times,
               pairs=len(pairs))


def _cycle(items):
    while True:
        yield from items


# ------------------------------------------------------------------ TRL
class _StepTimer:
    """A transformers TrainerCallback (built lazily) recording CUDA-synchronised optimiser-step times."""

    def __new__(cls, device: str):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.times, self.t0 = [], None

            def on_step_begin(self, args, state, control, **kw):
                _sync(device)
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync(device)
                self.times.append(time.perf_counter() - self.t0)

        return Timer()


def _hf_model(hf_dir: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(device)


def _common(args, out_dir: Path, device: str) -> dict:
    return dict(output_dir=str(out_dir), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                max_steps=args.warmup + args.steps, learning_rate=1e-5, weight_decay=0.0, max_grad_norm=1.0,
                lr_scheduler_type="constant", warmup_steps=0, bf16=device == "cuda", use_cpu=device != "cuda",
                optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", logging_steps=10_000,
                save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0, remove_unused_columns=True,
                disable_tqdm=True)


def trl_sft(args, hf_dir: Path, tokenizer, rows_NS1: torch.Tensor, device: str, out_dir: Path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"input_ids": [r[:-1].tolist() for r in rows_NS1]})
    timer = _StepTimer(device)
    config = SFTConfig(**_common(args, out_dir / "sft", device), max_length=args.seq, packing=False)
    trainer = SFTTrainer(model=_hf_model(hf_dir, device), args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[timer])
    trainer.train()
    times = timer.times[args.warmup:]
    del trainer
    return row("trl_sft", args.batch * args.seq, times)


def trl_dpo(args, hf_dir: Path, tokenizer, pairs, device: str, out_dir: Path, precompute: bool) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_dict({"prompt": [_text(p) for p, _, _ in pairs], "chosen": [_text(c) for _, c, _ in pairs],
                              "rejected": [_text(r) for _, _, r in pairs]})
    timer = _StepTimer(device)
    config = DPOConfig(**_common(args, out_dir / f"dpo{int(precompute)}", device), beta=0.1,
                       max_length=args.prompt + args.reply + 4, precompute_ref_log_probs=precompute)
    trainer = DPOTrainer(model=_hf_model(hf_dir, device), args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[timer])
    ex = trainer.train_dataset[0]
    lengths = {k: len(v) for k, v in ex.items() if k.endswith("_ids")}
    prompt = next((n for k, n in lengths.items() if k.startswith("prompt")), 0)
    per_pair = sum(lengths.values()) + prompt  # the prompt is scored with each side
    t0 = time.perf_counter()
    trainer.train()
    total_s = time.perf_counter() - t0
    times = timer.times[args.warmup:]
    del trainer
    return row("trl_dpo_precomputed_ref" if precompute else "trl_dpo", args.batch * per_pair, times,
               train_call_s=total_s, trl_example_lengths=lengths)


def trl_reward(args, hf_dir: Path, tokenizer, pairs, device: str, out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    data = Dataset.from_dict({"chosen_ids": [p + c for p, c, _ in pairs], "rejected_ids": [p + r for p, _, r in pairs]})
    model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), num_labels=1, dtype=torch.float32).to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    timer = _StepTimer(device)
    config = RewardConfig(**_common(args, out_dir / "reward", device), max_length=args.prompt + args.reply,
                          gradient_checkpointing=False)
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    lengths = {k: len(v) for k, v in trainer.train_dataset[0].items() if k.endswith("_ids")}  # what TRL trains on
    trainer.train()
    times = timer.times[args.warmup:]
    del trainer
    return row("trl_reward", args.batch * sum(lengths.values()), times, trl_example_lengths=lengths)


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bench_ref")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048, help="SFT row length")
    parser.add_argument("--prompt", type=int, default=256, help="DPO prompt tokens")
    parser.add_argument("--reply", type=int, default=256, help="DPO tokens per reply")
    parser.add_argument("--steps", type=int, default=8, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", default="ours_sft,trl_sft,ours_dpo,trl_dpo,ours_reward,trl_reward",
                        help="comma-separated benches")
    parser.add_argument("--smoke", action="store_true", help="CPU check of every bench: tiny preset, vocab 512, "
                        "rows of 64, pairs of 16 + 16, 2 timed steps after 1 warm-up (overrides those options)")
    parser.add_argument("--trl-precompute", action="store_true", help="also TRL DPO with precompute_ref_log_probs")
    parser.add_argument("--compile", action="store_true", help="last: our steps again with compile_blocks")
    parser.add_argument("--out", default=None, help="JSONL file to append to")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.vocab, args.seq, args.prompt, args.reply, args.steps, args.warmup = "tiny", 512, 64, 16, 16, 2, 1
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    only = set(args.only.split(","))
    g = torch.Generator().manual_seed(1)
    n_rows = args.batch * (args.warmup + args.steps)
    rows = torch.randint(4, args.vocab, (n_rows, args.seq + 1), generator=g)
    pairs = [(torch.randint(4, args.vocab, (args.prompt,), generator=g).tolist(),
              torch.randint(4, args.vocab, (args.reply,), generator=g).tolist(),
              torch.randint(4, args.vocab, (args.reply,), generator=g).tolist()) for _ in range(n_rows)]
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "preset": args.preset, "batch": args.batch, "seq": args.seq, "prompt": args.prompt, "reply": args.reply,
            "date": time.strftime("%Y-%m-%d")}
    try:
        import transformers
        import trl

        meta.update(transformers=transformers.__version__, trl=trl.__version__)
    except ImportError:
        pass
    results = []

    def emit(r: dict) -> None:
        r = {**r, **meta}
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(r) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-posttrain-") as tmp:
        tmp = Path(tmp)
        from moeflow.models import hf

        model = build_model(args, device)
        hf_dir = tmp / "hf"
        hf.export_hf(model, hf_dir, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        tokenizer = word_tokenizer(args.vocab, hf_dir)
        # ours first, each on a fresh copy of the same initial weights
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        for name, fn in (("ours_sft", lambda m: ours_sft(args, m, rows, device)),
                         ("ours_dpo", lambda m: ours_dpo(args, m, pairs, device)),
                         ("ours_reward", lambda m: ours_reward(args, m, pairs, device))):
            if name in only:
                model.load_state_dict(state)
                emit(fn(model))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        if "trl_sft" in only:
            emit(trl_sft(args, hf_dir, tokenizer, rows, device, tmp))
            torch.cuda.empty_cache() if device == "cuda" else None
        if "trl_dpo" in only:
            emit(trl_dpo(args, hf_dir, tokenizer, pairs, device, tmp, precompute=False))
            if args.trl_precompute:
                torch.cuda.empty_cache() if device == "cuda" else None
                emit(trl_dpo(args, hf_dir, tokenizer, pairs, device, tmp, precompute=True))
        if "trl_reward" in only:
            torch.cuda.empty_cache() if device == "cuda" else None
            emit(trl_reward(args, hf_dir, tokenizer, pairs, device, tmp))
        if args.compile:  # last, so a compile that runs long costs no peer row
            for name, fn in (("ours_sft", ours_sft), ("ours_dpo", ours_dpo), ("ours_reward", ours_reward)):
                if name in only:
                    model = build_model(args, device)
                    model.load_state_dict(state)
                    emit(fn(args, model, rows if name == "ours_sft" else pairs, device, compile=True))
                    del model
                    torch.cuda.empty_cache() if device == "cuda" else None
    by = {r["bench"]: r["tokens_per_s"] for r in results}
    for ours, peer in (("ours_sft", "trl_sft"), ("ours_dpo", "trl_dpo"), ("ours_dpo", "trl_dpo_precomputed_ref"),
                       ("ours_sft_compiled", "trl_sft"), ("ours_dpo_compiled", "trl_dpo"),
                       ("ours_dpo_compiled", "trl_dpo_precomputed_ref"), ("ours_reward", "trl_reward"),
                       ("ours_reward_compiled", "trl_reward")):
        if by.get(ours) and by.get(peer):
            print(f"{ours} / {peer} = {by[ours] / by[peer]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
