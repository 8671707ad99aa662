"""One GRPO iteration on ``bench_ref``: our rollout + update beside TRL's ``GRPOTrainer``, in the same process.

Same model, prompts and settings on both sides:

* the model: ``bench_ref`` at random init (seed 0), exported to HF ``DeepseekV3`` format by
  ``models.hf.export_hf``; TRL loads that export with transformers (fp32 weights, ``bf16=True`` autocast), we
  run our ``MoETransformer`` (fp32 master weights, bf16 autocast in the update);
* the prompts: ``--prompts`` rows of ``--prompt-len`` random word tokens (``bench_posttrain.word_tokenizer``:
  word ``w<i>`` is id i, so both sides hold the same ids), ``--samples`` replies each of up to ``--new-tokens``
  tokens at temperature 1 (EOS = id 2 stops a reply on both sides; a random model rarely emits it);
* the reward: the share of reply words with an even id, computed from the decoded text on both sides;
* one optimiser step per iteration over all ``prompts × samples`` replies (micro-batches of ``--micro``
  rows, gradient accumulation), GRPO advantages, ε = 0.2, β = ``--beta`` (0: no reference pass, TRL's default);
* ours: rollout = ``models.generation.generate`` on a bf16 copy of the policy (weights copied in place from the
  fp32 master each iteration, included in the time) with the CUDA-graph decoder, sampling log-probs and routing
  recorded; update = the engine's ``PostTrainer`` with ``platform.posttrain.rl.RLObjective`` (routing replay on).
  TRL: ``GRPOTrainer.train`` for the same number of iterations, timed per optimiser step by a callback (its
  step = its transformers generation + scoring + update).

Reported per iteration (median over ``--iters`` after ``--warmup``): rollout tokens/s (generated tokens ÷
rollout time), update tokens/s (prompt + reply tokens ÷ update time), iteration tokens/s (generated tokens ÷
whole iteration) for both sides, and the rollout/update routing agreement with replay OFF in bf16 (the update's
own top-k vs the recorded rollout top-k, same weights).

GPU: ``python benchmarks/bench_grpo.py --out results/grpo_h100.jsonl``
CPU smoke (no TRL unless installed): ``python benchmarks/bench_grpo.py --smoke``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO.parent) not in sys.path:  # run as a script from a checkout: import the checkout as `moeflow`
    sys.path.insert(0, str(REPO.parent))
sys.path.insert(0, str(HERE))

from bench_posttrain import _StepTimer, _sync, _text, word_tokenizer  # noqa: E402

EOS = 2


def even_share(text: str) -> float:
    """The benchmark reward: share of words ``w<i>`` with an even i (0 for an empty reply)."""
    ids = [int(w[1:]) for w in text.split() if w.startswith("w") and w[1:].isdigit()]
    return sum(i % 2 == 0 for i in ids) / len(ids) if ids else 0.0


# ------------------------------------------------------------------ ours
class OursGRPO:
    def __init__(self, args, model, device: str) -> None:
        from moeflow.models.generation import CudaGraphPool
        from moeflow.platform.posttrain.align import AlignConfig
        from moeflow.platform.posttrain.engine import PostTrainer
        from moeflow.platform.posttrain.rl import RLObjective

        self.args, self.model, self.device = args, model, device
        rows = args.prompts * args.samples
        self.cfg = AlignConfig(method="grpo", max_steps=10_000, lr=1e-6, warmup_steps=0, schedule="constant",
                               micro_batch_size=args.micro, grad_accum_steps=rows // args.micro,
                               prompts_per_rollout=args.prompts, samples_per_prompt=args.samples,
                               max_new_tokens=args.new_tokens, temperature=1.0, kl_coef=args.beta, clip_eps=0.2,
                               loss_normalisation="sequence_mean", routing_replay=True, log_every=10_000,
                               checkpoint_every=0, seq_len=args.prompt_len + args.new_tokens, grad_clip=1.0)
        self.rollout_model = copy.deepcopy(model).to(torch.bfloat16).eval() if device == "cuda" else model
        self.pool = CudaGraphPool() if device == "cuda" else False
        self.batches: list[dict] = []
        self.trainer = PostTrainer(self.cfg, model, self._next(), objective=RLObjective(self.cfg, "grpo"), device=device)
        g = torch.Generator().manual_seed(2)
        self.prompts = [torch.randint(4, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
        self.iteration = 0

    def _next(self):
        while True:
            yield self.batches.pop(0)

    @torch.no_grad()
    def rollout(self) -> tuple[object, list[list[int]]]:
        from moeflow.models.generation import generate

        if self.rollout_model is not self.model:  # colocated weight sync: fp32 master -> bf16 rollout copy
            for p_roll, p in zip(self.rollout_model.parameters(), self.model.parameters()):
                p_roll.copy_(p)
        ids = [p for p in self.prompts for _ in range(self.args.samples)]
        gen = generate(self.rollout_model, ids, self.args.new_tokens, temperature=1.0, stop_token_ids=[EOS],
                       seed=self.iteration, record_routing=True, return_logprobs=True, cuda_graph=self.pool)
        return gen, ids

    @torch.no_grad()
    def prepare(self, gen, ids) -> tuple[dict, object]:
        from moeflow.models.align import rl as R
        from moeflow.models.align.rollout import pack_rollout, policy_pass

        rewards = torch.tensor([even_share(_text(t)) for t in gen.tokens])
        packed = pack_rollout(ids, gen.tokens, gen.logprobs, gen.routing, pad_id=0)
        if self.args.beta > 0:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                ref = policy_pass(self.reference, packed.input_ids_BT.to(self.device),
                                  packed.targets_BT.to(self.device), with_losses=False).logp_BT.float().cpu()
        else:
            ref = packed.old_logp_BT
        adv = R.group_advantages(rewards.view(-1, self.args.samples)).reshape(-1)
        buf = {"input_ids": packed.input_ids_BT, "targets": packed.targets_BT, "completion_mask": packed.completion_mask_BT,
               "token_mask": packed.token_mask_BT, "old_logp": packed.old_logp_BT, "ref_logp": ref,
               "advantages": adv[:, None] * packed.completion_mask_BT, "routing": packed.routing_LBTK}
        return buf, packed

    def iterate(self) -> dict:
        dev = self.device
        _sync(dev)
        t0 = time.perf_counter()
        gen, ids = self.rollout()
        _sync(dev)
        t1 = time.perf_counter()
        buf, packed = self.prepare(gen, ids)
        mb = self.args.micro
        rows = len(ids)
        self.batches = [{k: (v[:, i:i + mb] if k == "routing" else v[i:i + mb]) for k, v in buf.items()}
                        for i in range(0, rows, mb)]
        _sync(dev)
        t2 = time.perf_counter()
        self.trainer.train_step()
        _sync(dev)
        t3 = time.perf_counter()
        self.iteration += 1
        generated = sum(len(t) for t in gen.tokens)
        update_tokens = int(packed.token_mask_BT.sum())
        return {"rollout_s": t1 - t0, "prepare_s": t2 - t1, "update_s": t3 - t2, "iteration_s": t3 - t0,
                "generated_tokens": generated, "update_tokens": update_tokens,
                "reward_mean": float(sum(even_share(_text(t)) for t in gen.tokens) / rows), "packed": packed}

    @torch.no_grad()
    def agreement_without_replay(self, packed) -> list[float]:
        """The update's own top-k (bf16 autocast, fp32 master weights) vs the bf16 rollout's, same weights."""
        from moeflow.models.align.rollout import policy_pass, routing_agreement

        agree = []
        mb = self.args.micro
        for i in range(0, packed.input_ids_BT.shape[0], mb):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                out = policy_pass(self.model, packed.input_ids_BT[i:i + mb].to(self.device),
                                  packed.targets_BT[i:i + mb].to(self.device), with_losses=False)
            agree.append(routing_agreement(packed.routing_LBTK[:, i:i + mb].to(self.device), out.routing_LBTK,
                                           packed.token_mask_BT[i:i + mb].to(self.device)).cpu())
        return torch.stack(agree).mean(0).tolist()


def run_ours(args, model, device: str) -> dict:
    ours = OursGRPO(args, model, device)
    if args.beta > 0:
        ours.reference = copy.deepcopy(model).eval().requires_grad_(False)
    rows = []
    for _ in range(args.warmup + args.iters):
        rows.append(ours.iterate())
    # agreement measured on the weights that produced the last rollout: redo one rollout without an update
    gen, ids = ours.rollout()
    _, packed = ours.prepare(gen, ids)
    agreement = ours.agreement_without_replay(packed)
    timed = rows[args.warmup:]
    med = {k: statistics.median(r[k] for r in timed) for k in ("rollout_s", "prepare_s", "update_s", "iteration_s")}
    gen_tok, upd_tok = timed[-1]["generated_tokens"], timed[-1]["update_tokens"]
    return {"bench": "ours_grpo", **{f"median_{k}": v for k, v in med.items()},
            "rollout_tokens_per_s": gen_tok / med["rollout_s"], "update_tokens_per_s": upd_tok / med["update_s"],
            "iteration_tokens_per_s": gen_tok / med["iteration_s"], "generated_tokens": gen_tok,
            "update_tokens": upd_tok, "reward_mean": timed[-1]["reward_mean"],
            "routing_agreement_replay_off_per_layer": agreement,
            "routing_agreement_replay_off_mean": sum(agreement) / len(agreement), "iters_timed": len(timed)}


# ------------------------------------------------------------------ TRL
def run_trl(args, hf_dir: Path, tokenizer, device: str, out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    g = torch.Generator().manual_seed(2)
    prompts = [_text(torch.randint(4, args.vocab, (args.prompt_len,), generator=g).tolist()) for _ in range(args.prompts)]
    data = Dataset.from_dict({"prompt": prompts * (args.warmup + args.iters)})
    rows = args.prompts * args.samples
    timer = _StepTimer(device)
    generated = []

    def reward(prompts, completions, **kw):
        generated.append(sum(len(c.split()) for c in completions))
        return [even_share(c) for c in completions]

    config = GRPOConfig(output_dir=str(out_dir / "grpo"), per_device_train_batch_size=args.micro,
                        gradient_accumulation_steps=rows // args.micro, num_generations=args.samples,
                        max_completion_length=args.new_tokens, temperature=1.0, beta=args.beta, epsilon=0.2,
                        num_iterations=1, max_steps=args.warmup + args.iters, learning_rate=1e-6,
                        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, bf16=device == "cuda",
                        use_cpu=device != "cuda", logging_steps=10_000, save_strategy="no", report_to=[], seed=0,
                        disable_tqdm=True, dataloader_num_workers=0, shuffle_dataset=False)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(device)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tokenizer,
                          callbacks=[timer])
    trainer.train()
    times = timer.times[args.warmup:]
    med = statistics.median(times)
    gen_tok = statistics.median(generated[args.warmup:]) if len(generated) > args.warmup else float("nan")
    return {"bench": "trl_grpo", "median_iteration_s": med, "iteration_tokens_per_s": gen_tok / med,
            "generated_tokens": gen_tok, "iters_timed": len(times), "steps_seen": len(timer.times)}


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bench_ref")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro", type=int, default=64, help="rows per micro-batch of the update (both sides)")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference pass)")
    parser.add_argument("--iters", type=int, default=3, help="timed GRPO iterations")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", default="ours,trl")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny preset, 4 prompts x 2 samples x 8 tokens")
    parser.add_argument("--out", default=None, help="JSONL file to append to")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.vocab, args.prompts, args.samples, args.prompt_len = "tiny", 512, 4, 2, 8
        args.new_tokens, args.micro, args.iters, args.warmup = 8, 4, 1, 1
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "preset": args.preset, "prompts": args.prompts, "samples": args.samples, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "micro": args.micro, "beta": args.beta, "date": time.strftime("%Y-%m-%d")}
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

    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        tmp = Path(tmp)
        from moeflow.models import ModelConfig, MoETransformer, hf

        cfg = ModelConfig.preset(args.preset).replace(vocab_size=args.vocab,
                                                      max_seq_len=max(256, args.prompt_len + args.new_tokens + 8))
        torch.manual_seed(0)
        model = MoETransformer(cfg).to(device)
        hf_dir = tmp / "hf"
        hf.export_hf(model, hf_dir, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
        tokenizer = word_tokenizer(args.vocab, hf_dir)
        if "ours" in only:
            try:
                emit(run_ours(args, model, device))
            except Exception as err:  # keep the peer's row even if ours fails on this machine
                emit({"bench": "ours_grpo", "error": repr(err), "traceback": traceback.format_exc()[-3000:]})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        if "trl" in only:
            try:
                emit(run_trl(args, hf_dir, tokenizer, device, tmp))
            except ImportError as err:
                emit({"bench": "trl_grpo", "skipped": f"TRL not installed ({err})"})
            except Exception as err:
                emit({"bench": "trl_grpo", "error": repr(err), "traceback": traceback.format_exc()[-3000:]})
    by = {r["bench"]: r for r in results}
    if "iteration_tokens_per_s" in by.get("ours_grpo", {}) and "iteration_tokens_per_s" in by.get("trl_grpo", {}):
        ratio = by["ours_grpo"]["iteration_tokens_per_s"] / by["trl_grpo"]["iteration_tokens_per_s"]
        print(f"ours / TRL per GRPO iteration: {ratio:.2f} x")


if __name__ == "__main__":
    main()
