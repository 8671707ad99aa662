"""The align stage's online RL (method grpo / ppo): config at the edge, rewards, the loop on the engine
(on-policy ratio, resume after a failure or kill -9), and evidence that it learns beside a shuffled-reward
control."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models import hf as H
from moeflow.models.align.reward import RewardModel
from moeflow.models.tokenizer import train_bpe
from moeflow.models.train.state import load_model_weights
from moeflow.platform.posttrain import rl_rewards as RW
from moeflow.platform.posttrain.align import AlignConfig, run_align
from moeflow.platform.posttrain.data import to_jsonl
from moeflow.platform.posttrain.engine import PostTrainJob, posttrain_worker
from moeflow.platform.posttrain.generated import GeneratedDataConfig, write_generated_sets
from moeflow.platform.posttrain.align import RL_BUILDER as BUILDER
from moeflow.platform.store.local import LocalStore
from moeflow.platform.tracking import NoopTracker
from moeflow.platform.train.checkpoint import CheckpointManager
from train_fakes import one_thread, tiny_model_overrides

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _export(model, tok, local: Path, store, prefix: str) -> str:
    H.export_hf(model, local, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    tok.save(local / "tokenizer.json")
    with store.write_artifact(prefix) as w:
        for p in sorted(local.iterdir()):
            w.put_file(p.name, p)
    return store.uri(prefix)


def _world(root: Path, data: GeneratedDataConfig) -> dict:
    store = LocalStore(root / "store")
    sets = write_generated_sets(store, data)
    texts = [json.dumps(r) for r in store.read_artifact(sets.chat_uri).get_bytes("train.jsonl").decode().splitlines()]
    tok = train_bpe(texts * 3, vocab_size=384)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(**{**tiny_model_overrides(tok.vocab_size),
                                                                 "max_seq_len": 128}))
    base_uri = _export(model, tok, root / "base-hf", store, "runs/base/hf")
    return {"store": store, "sets": sets, "tok": tok, "base_uri": base_uri, "root": root, "model": model}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny untrained base model (HF export + tokenizer) in a store, and the generated prompt set."""
    return _world(tmp_path_factory.mktemp("rl"), GeneratedDataConfig(max_functions=0, num_arithmetic=280,
                                                                      max_operand=10, heldout_fraction=0.15))


def _cfg(**kw) -> AlignConfig:
    base = dict(method="grpo", max_steps=4, lr=1e-3, warmup_steps=0, micro_batch_size=4, grad_accum_steps=1,
                prompts_per_rollout=2, samples_per_prompt=4, max_new_tokens=4, seq_len=64, log_every=2,
                checkpoint_every=3, eval_prompts=8, eval_samples=0, rewards={"exact_match": 1.0, "format": 0.5,
                                                                             "length": 0.1})
    return AlignConfig(**{**base, **kw})


# ------------------------------------------------------------------ config
def test_rl_config_is_checked_at_the_edge():
    with pytest.raises(ValidationError, match="multiple of micro_batch_size"):
        AlignConfig(method="grpo", prompts_per_rollout=3, samples_per_prompt=3, micro_batch_size=4)
    with pytest.raises(ValidationError, match="unknown reward"):
        AlignConfig(method="grpo", rewards={"exact_match": 1.0, "vibes": 1.0})
    with pytest.raises(ValidationError, match="non-zero weight"):
        AlignConfig(method="ppo", rewards={"exact_match": 0.0})
    with pytest.raises(ValidationError):
        AlignConfig(method="reinforce")
    with pytest.raises(ValidationError):
        AlignConfig(method="ppo", dual_clip=0.5)
    assert AlignConfig(method="dpo", prompts_per_rollout=3, samples_per_prompt=3).data_key == "preference_uri"
    assert AlignConfig(method="grpo").data_key == "prompt_uri"


# ------------------------------------------------------------------ rewards
def _sample(completion: str, answer: str | None = "42", finished=True, tests=None, ids=(5, 6)) -> RW.Sample:
    return RW.Sample([{"role": "user", "content": "q"}], completion, [1, 2, 3], list(ids), finished, answer, tests)


def test_exact_match_format_length_and_their_weighted_composite():
    samples = [_sample(" 42 "), _sample("41"), _sample("42", finished=False, ids=(5, 6, 7, 8)), _sample("", answer=None)]
    assert RW.ExactMatch()(samples) == [1.0, 0.0, 1.0, 0.0]
    assert RW.FormatReward()(samples) == [1.0, 1.0, 0.0, 0.0]
    assert RW.LengthPenalty(8)(samples) == [-0.25, -0.25, -0.5, -0.25]
    combo = RW.CompositeReward([(RW.ExactMatch(), 1.0), (RW.FormatReward(), 0.5), (RW.LengthPenalty(8), 2.0)])
    out = combo(samples)
    assert out.total == pytest.approx([1.0, 0.0, 0.0, -0.5])
    assert out.means == pytest.approx({"exact_match": 0.5, "format": 0.5, "length": -0.3125})
    with pytest.raises(ValueError, match="distinct"):
        RW.CompositeReward([(RW.ExactMatch(), 1.0), (RW.ExactMatch(), 2.0)])
    with pytest.raises(ValueError, match="unknown reward"):
        RW.build_rewards({"bleu": 1.0}, max_new_tokens=8)
    with pytest.raises(ValueError, match="reward_model"):
        RW.build_rewards({"reward_model": 1.0}, max_new_tokens=8)


def test_code_execution_reward_runs_the_reply_against_the_tests_in_the_sandbox():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
    samples = [_sample("```python\ndef add(a, b):\n    return a + b\n```", tests=tests),
               _sample("def add(a, b):\n    return a - b\n", tests=tests),
               _sample("def add(a, b):\n    while True: pass\n", tests="add(1, 2)\n"),
               _sample("def add(a, b): return a + b", tests=None)]
    assert RW.CodeExecution(timeout_s=2.0)(samples) == [1.0, 0.0, 0.0, 0.0]


def test_fluency_prefers_what_the_reference_finds_likely(world):
    from moeflow.models.generation import generate

    lm = world["model"].eval()
    prompt = [1, 7, 9, 11]
    greedy = generate(lm, [prompt], 6).tokens[0]
    rare = torch.topk(lm(torch.tensor([prompt])).logits[0, -1], 6, largest=False).indices.tolist()
    scores = RW.Fluency(lm, pad_id=0)([_sample("a", ids=greedy), _sample("b", ids=rare), _sample("", ids=())])
    assert scores[0] > scores[1] > 0 and scores[2] == 0.0 and scores[0] <= 1.0


def test_reward_model_term_scores_prompt_and_reply_with_the_learned_head(world):
    torch.manual_seed(1)
    rm = RewardModel(MoETransformer(world["model"].cfg)).eval()
    term = RW.RewardModelScore(rm, world["tok"])
    samples = [_sample("7"), _sample("a longer reply")]
    scores = term(samples)
    from moeflow.models.chat import render_ids

    ids = render_ids(world["tok"], samples[1].prompt + [{"role": "assistant", "content": "a longer reply"}]).ids
    direct = rm(torch.tensor([ids]), torch.tensor([len(ids)])).rewards_B.item()
    assert scores[1] == pytest.approx(direct, abs=1e-5) and scores[0] != scores[1]


def test_reward_model_by_reference_scores_samples_and_initialises_the_ppo_value_head(world, tmp_path):
    """A reward export in the store (LM + tokenizer + reward_head.pt), named by its URI: the composite reward loads it
    through model_refs and scores like the model itself; value_init=reward_model copies its head."""
    from moeflow.platform.posttrain.reward import save_head
    from moeflow.platform.posttrain.rl import PolicyWithValue, _init_value_from_reward_model

    torch.manual_seed(3)
    rm = RewardModel(MoETransformer(world["model"].cfg)).eval()
    with torch.no_grad():
        rm.score.bias.fill_(0.25)
    local = tmp_path / "rm"
    H.export_hf(rm.lm, local, bos_token_id=world["tok"].bos_id, eos_token_id=world["tok"].eos_id,
                pad_token_id=world["tok"].pad_id)
    save_head(rm, local)
    uri = _export(rm.lm, world["tok"], local, world["store"], "runs/rm/hf")  # re-export keeps the head file
    composite = RW.build_rewards({"reward_model": 1.0}, max_new_tokens=8, reward_model=uri, store=world["store"])
    samples = [_sample("7"), _sample("eight")]
    assert composite(samples).total == pytest.approx(RW.RewardModelScore(rm, world["tok"])(samples), abs=1e-5)
    policy = PolicyWithValue(MoETransformer(world["model"].cfg))
    assert policy.value_head.weight.abs().sum() == 0
    _init_value_from_reward_model(policy, _cfg(method="ppo", reward_model=uri, value_init="reward_model"), world["store"])
    assert torch.equal(policy.value_head.weight, rm.score.weight) and policy.value_head.bias.item() == 0.25


# ------------------------------------------------------------------ the loop
def _job(world, prefix: str, **kw) -> dict:
    return PostTrainJob(stage="align", builder=BUILDER, config=_cfg(**kw).to_dict(), model_uri=world["base_uri"],
                        output_prefix=prefix, data_uris={"prompt": world["sets"].prompt_uri},
                        store_uri=world["store"].root_uri, tracking="noop", device="cpu").to_dict()


def _final(store, prefix, tmp_path):
    d = CheckpointManager(store, prefix).download_latest(tmp_path / prefix.replace("/", "_"))[1]
    trainer = torch.load(d / "trainer.pt", weights_only=False)
    history = [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in trainer["loop"]["history"]]
    return history, load_model_weights(d), trainer


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_first_update_is_on_policy_and_the_run_logs_what_rl_needs(world, tmp_path, method):
    """Step 1 with one mini-batch per rollout: every ratio is 1 (nothing clipped); the final JSON-able result
    carries held-out reward, exact match, KL and MaxVio before and after."""
    result = run_align(_cfg(method=method, max_steps=2, log_every=1, checkpoint_every=0), world["store"],
                       model_uri=world["base_uri"], data_uri=world["sets"].prompt_uri,
                       output_prefix=f"runs/rl-onpolicy-{method}", tracker=NoopTracker())
    history, _, trainer = _final(world["store"], f"runs/rl-onpolicy-{method}", tmp_path)
    first = history[0]
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["clip_fraction"] == 0.0
    assert first["routing/agreement_mean"] == 1.0  # replay on: the update used the recorded experts
    for key in ("reward/total", "reward/exact_match", "reward/format", "reward/length", "rollout/maxvio_mean",
                "rollout/kl_to_reference", "kl_to_reference", "maxvio_batch/mean"):
        assert key in first, key
    if method == "grpo":
        assert 0.0 <= first["grpo/identical_reward_groups"] <= 1.0
    else:
        assert "value_loss" in first and "ppo/kl_coef" in first
    for when in (result.before, result.after):
        assert {"exact_match", "reward", "kl_to_reference", "maxvio_mean"} <= set(when)
    assert result.before["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert result.after["kl_to_reference"] > 0.0
    assert result.hf_uri is not None


def test_bf16_rollout_copy_follows_the_policy_between_rollouts(world, tmp_path):
    """rollout_dtype=bf16: a bf16 copy samples, synced from the fp32 policy before every rollout; with large steps
    an unsynced copy would sample from stale weights and the update's ratios would drift far from 1."""
    run_align(_cfg(max_steps=4, log_every=1, checkpoint_every=0, lr=2e-2, rollout_dtype="bf16", eval_prompts=2,
                   micro_batch_size=8,
                   rewards={"fluency": 1.0}),  # a reward that differs between samples: the weights really move
              world["store"], model_uri=world["base_uri"], data_uri=world["sets"].prompt_uri,
              output_prefix="runs/rl-bf16", tracker=NoopTracker())
    history, _, _ = _final(world["store"], "runs/rl-bf16", tmp_path)
    assert len(history) == 4
    print([(round(r["ratio_mean"], 4), round(r["kl_old"], 5)) for r in history])
    for row in history:  # one step per rollout: every step on-policy up to bf16-vs-fp32 rounding
        assert abs(row["ratio_mean"] - 1) < 0.01 and row["kl_old"] < 0.002, row


def test_routing_agreement_is_logged_below_one_without_replay(world, tmp_path):
    """Replay off: the update chooses its own experts; after a few large steps they drift from the rollout's."""
    run_align(_cfg(max_steps=4, log_every=1, checkpoint_every=0, routing_replay=False, lr=2e-2, ppo_epochs=2,
                   micro_batch_size=4, rewards={"fluency": 1.0}), world["store"], model_uri=world["base_uri"],
              data_uri=world["sets"].prompt_uri, output_prefix="runs/rl-noreplay", tracker=NoopTracker())
    history, _, _ = _final(world["store"], "runs/rl-noreplay", tmp_path)
    agreements = [h["routing/agreement_mean"] for h in history]
    assert all(0.0 < a <= 1.0 for a in agreements) and min(agreements) < 1.0, agreements


def test_router_bias_update_during_rl_is_a_setting(world, tmp_path):
    """On (the default) the aux-loss-free biases move with the update's expert counts; off they stay as the
    input version had them."""
    biases = {}
    for switch in (True, False):
        prefix = f"runs/rl-bias-{switch}"
        run_align(_cfg(max_steps=2, checkpoint_every=0, router_bias_update=switch, eval_prompts=2), world["store"],
                  model_uri=world["base_uri"], data_uri=world["sets"].prompt_uri, output_prefix=prefix,
                  tracker=NoopTracker())
        _, weights, _ = _final(world["store"], prefix, tmp_path)
        biases[switch] = {k: v for k, v in weights.items() if k.endswith("e_score_correction_bias")}
    base = {k: v for k, v in world["model"].state_dict().items() if k.endswith("e_score_correction_bias")}
    assert biases[False].keys() == base.keys() and biases[False]
    assert all(torch.equal(biases[False][k], base[k]) for k in base)
    assert any(not torch.equal(biases[True][k], base[k]) for k in base)


def test_failed_mid_rollout_resumes_to_the_uninterrupted_result_in_process(world, tmp_path, monkeypatch):
    """PPO with 2 epochs × 2 mini-batches per rollout: the checkpoint at step 3 falls inside a rollout batch,
    so the resumed run must restore the rollout buffer, its position and the adaptive KL coefficient."""
    import moeflow.platform.posttrain.engine as engine

    kw = dict(method="ppo", max_steps=6, ppo_epochs=2, micro_batch_size=4, kl_target=0.01, kl_horizon=100)
    store = world["store"]
    posttrain_worker(_job(world, "runs/rl-ref", **kw))

    def die(marker):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine, "_maybe_die", die)
    job = {**_job(world, "runs/rl-failed", **kw), "fault_step": 4, "fault_marker": str(tmp_path / "m")}
    with pytest.raises(RuntimeError, match="injected"):
        posttrain_worker(job)
    assert CheckpointManager(store, "runs/rl-failed").latest().step == 3
    posttrain_worker({**job, "fault_step": None})
    (h_ref, w_ref, t_ref), (h_run, w_run, t_run) = (_final(store, "runs/rl-ref", tmp_path),
                                                    _final(store, "runs/rl-failed", tmp_path))
    assert h_run == h_ref
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    assert any(k.startswith("value_head") for k in w_ref)
    assert t_ref["loader"][0]["kl_ctl"] == t_run["loader"][0]["kl_ctl"]


@pytest.mark.slow
def test_killed_mid_rollout_resumes_to_the_uninterrupted_result(world, tmp_path):
    store = world["store"]
    kw = dict(method="ppo", max_steps=6, ppo_epochs=2, micro_batch_size=4)
    posttrain_worker(_job(world, "runs/rl-kill-ref", **kw))
    job = {**_job(world, "runs/rl-killed", **kw), "fault_step": 4, "fault_marker": str(tmp_path / "killed")}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "MOEFLOW_TRACKING": "noop", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "moeflow.platform.posttrain.engine", "--job", str(path)]
    first = subprocess.run(cmd, cwd=str(REPO.parent), env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == -9, first.stderr[-2000:]
    assert CheckpointManager(store, "runs/rl-killed").latest().step == 3
    second = subprocess.run(cmd, cwd=str(REPO.parent), env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    (h_ref, w_ref, _), (h_run, w_run, _) = _final(store, "runs/rl-kill-ref", tmp_path), _final(store, "runs/rl-killed", tmp_path)
    assert h_run == h_ref
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)


# ------------------------------------------------------------------ evidence that it learns
LEARN_DATA = GeneratedDataConfig(max_functions=0, num_arithmetic=2100, max_operand=10, heldout_fraction=0.15)
LEARN_TASKS = ("length",)  # "How many letters are in the word 'cabd'?": many distinct held-out problems, 2..8


@pytest.fixture(scope="module")
def sft_world(tmp_path_factory):
    """The starting point RL needs: the tiny model SFT'd for 300 steps on the generated chat set (held-out greedy
    exact match on the letter-count task ≈ 0.47, sampled at T=0.7 ≈ 0.29 — non-zero reward from the start), and
    the letter-count prompts (train / held-out, split by problem) as a prompt set."""
    from moeflow.platform.posttrain.sft import SFTConfig, run_sft

    root = tmp_path_factory.mktemp("rl-learn")
    w = _world(root, LEARN_DATA)
    sft = run_sft(SFTConfig(max_steps=300, lr=3e-3, micro_batch_size=16, seq_len=64, warmup_steps=10, log_every=100,
                            checkpoint_every=0, heldout_max_examples=16, exact_match_max_prompts=0),
                  w["store"], model_uri=w["base_uri"], data_uri=w["sets"].chat_uri, output_prefix="runs/sft",
                  tracker=NoopTracker())
    art = w["store"].read_artifact(w["sets"].prompt_uri)
    prompts = root / "letters"
    prompts.mkdir()
    for split in ("train", "heldout"):
        rows = [json.loads(line) for line in art.get_bytes(f"{split}.jsonl").decode().splitlines()]
        (prompts / f"{split}.jsonl").write_bytes(to_jsonl([r for r in rows if r["task"] in LEARN_TASKS]))
    return {**w, "sft_uri": sft.hf_uri, "prompts_uri": str(prompts)}


def _learn(w, method: str, steps: int, shuffle: bool):
    cfg = AlignConfig(method=method, max_steps=steps, lr=1e-3, warmup_steps=10, schedule="constant",
                      micro_batch_size=16, grad_accum_steps=4, prompts_per_rollout=8, samples_per_prompt=8,
                      max_new_tokens=8, temperature=0.7, kl_coef=0.0, seq_len=64, log_every=10, checkpoint_every=0,
                      eval_prompts=90, eval_samples=8, shuffle_rewards=shuffle)
    result = run_align(cfg, w["store"], model_uri=w["sft_uri"], data_uri=w["prompts_uri"],
                       output_prefix=f"runs/{method}-{steps}-{'shuffled' if shuffle else 'real'}", tracker=NoopTracker())
    keys = ("exact_match", "sampled_exact_match", "sampled_reward", "kl_to_reference")
    print(method, steps, "shuffled" if shuffle else "real", {k: (round(result.before[k], 3), round(result.after[k], 3))
                                                              for k in keys})
    return result


def _check_learns(w, method: str, steps: int, gain: float, greedy_gain: float | None):
    real, control = _learn(w, method, steps, False), _learn(w, method, steps, True)
    before, after = real.before, real.after
    # held-out replies sampled as in training (8 per prompt, fixed seed): accuracy and mean reward rise
    assert after["sampled_exact_match"] >= before["sampled_exact_match"] + gain, (before, after)
    assert after["sampled_reward"] >= before["sampled_reward"] + gain, (before, after)
    # the same run with rewards shuffled across samples does not improve
    assert control.after["sampled_exact_match"] <= control.before["sampled_exact_match"] + 0.01, control.after
    assert after["sampled_exact_match"] >= control.after["sampled_exact_match"] + gain
    if greedy_gain is not None:  # greedy held-out exact match (a negative gain: it may not fall by more than that)
        assert after["exact_match"] >= before["exact_match"] + greedy_gain, (before, after)
    assert after["exact_match"] > control.after["exact_match"]
    return real, control


def test_grpo_raises_heldout_accuracy_and_reward_beside_a_shuffled_reward_control(sft_world):
    """100 GRPO steps (8 prompts × 8 replies each, T = 0.7) on the letter-count task, beside the same run with
    rewards shuffled across the rollout's samples. Measured 2026-12-07 (90 held-out prompts, 8 sampled replies
    each): on one 2-core machine sampled exact match = mean reward 0.294 -> 0.432, greedy 0.467 -> 0.544, KL 0.22
    (control: greedy 0.056, sampled 0.064, KL 0.78); on another (AMD EPYC, quiet, ~25 s for both runs) 0.296 ->
    0.410, greedy 0.478 -> 0.567, KL 0.15 (control collapses to 0.0, KL 5.8). 60 steps, the earlier length of this
    test, gained +0.06 on the first machine but only +0.015 on the second (float rounding differs by CPU), so the
    fast default now runs the 100 steps of the former slow twin. On a third (Intel Xeon, 2 cores, 2026-12-07 15:10
    UTC; the same result with the tree of the day before) sampled 0.303 -> 0.489 but greedy 0.511 -> 0.511, flat
    (control: greedy 0.0, sampled 0.047, KL 0.97): the greedy gain is where CPUs part, so it is asserted not to fall
    (by more than 0.03) and to beat the control; the gain asserted is the sampled reward's, the one RL optimises."""
    _check_learns(sft_world, "grpo", steps=100, gain=0.04, greedy_gain=-0.03)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ppo_raises_heldout_accuracy_and_reward_beside_a_shuffled_reward_control(sft_world):
    """100 PPO steps (value head zero-initialised on the policy, GAE γ=1 λ=0.95, whitened advantages, one epoch).
    Measured 2026-12-07 (90 held-out prompts): sampled exact match = mean reward 0.294 -> 0.396, greedy 0.467 ->
    0.478 (flat), KL 0.20; shuffled-reward control: sampled 0.131, greedy 0.100. ~3.5 min for both runs."""
    _check_learns(sft_world, "ppo", steps=100, gain=0.06, greedy_gain=None)


@pytest.mark.slow
def test_two_ray_workers_each_roll_out_their_shard_update_under_ddp_and_survive_a_killed_worker(world, tmp_path):
    """Colocated on Ray Train: 2 gloo workers, each samples replies to its own prompts and both update one DDP
    model; rank 1 is SIGKILLed after step 4 on the first attempt and the group resumes from step 3."""
    from moeflow.platform.compute import ensure_ray

    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    ensure_ray()
    try:
        result = run_align(_cfg(max_steps=6), world["store"], model_uri=world["base_uri"],
                           data_uri=world["sets"].prompt_uri, output_prefix="runs/rl-ray", tracker=NoopTracker(),
                           num_workers=2, extra_job={"fault_step": 4, "fault_rank": 1,
                                                     "fault_marker": str(tmp_path / "killed")})
    finally:
        import ray

        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous
    assert (tmp_path / "killed").exists()  # the fault happened
    assert result.steps == 6 and {"exact_match", "reward", "kl_to_reference"} <= set(result.after)
    _, _, trainer = _final(world["store"], "runs/rl-ray", tmp_path)
    loaders = trainer["loader"]
    assert trainer["world_size"] == 2 and len(loaders) == 2
    # each rank rolled out its own prompts: the two buffers hold different token ids
    a, b = loaders[0]["buffer"]["input_ids"], loaders[1]["buffer"]["input_ids"]
    assert a.shape[0] == b.shape[0] == 8 and not (a.shape == b.shape and torch.equal(a, b))
