"""The sft stage on the post-training engine: lineage, export, resume after kill -9, balancing, learning."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models import hf as H
from moeflow.models.tokenizer import train_bpe
from moeflow.models.train.state import load_model_weights
from moeflow.platform.catalog import Catalog
from moeflow.platform.model_refs import ModelRefError, resolve
from moeflow.platform.posttrain.engine import PostTrainJob, dead_experts, posttrain_worker
from moeflow.platform.posttrain.generated import GeneratedDataConfig, write_generated_sets
from moeflow.platform.posttrain.sft import BUILDER, SFTConfig, run_sft
from moeflow.platform.store.local import LocalStore
from moeflow.platform.tracking import NoopTracker
from moeflow.platform.train.checkpoint import CheckpointManager
from train_fakes import one_thread, tiny_model_overrides

REPO = Path(__file__).resolve().parent.parent
DATA = GeneratedDataConfig(max_functions=0, num_arithmetic=700, max_operand=20, heldout_fraction=0.15)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with a tiny base model (HF export + tokenizer) registered in a catalog, and generated chat data."""
    root = tmp_path_factory.mktemp("posttrain")
    store = LocalStore(root / "store")
    catalog = Catalog(f"sqlite:///{root / 'catalog.db'}")
    sets = write_generated_sets(store, DATA, catalog=catalog)
    texts = [json.dumps(r) for r in (store.read_artifact(sets.chat_uri).get_bytes("train.jsonl").decode().splitlines())]
    tok = train_bpe(texts * 3, vocab_size=384)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(**{**tiny_model_overrides(tok.vocab_size),
                                                                 "max_seq_len": 128}))
    local = root / "base-hf"
    H.export_hf(model, local, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    tok.save(local / "tokenizer.json")
    with store.write_artifact("runs/base/hf") as w:
        for p in sorted(local.iterdir()):
            w.put_file(p.name, p)
    base_uri = store.uri("runs/base/hf")
    base_id = catalog.register_model("moe-tiny", base_uri, "base")
    yield {"store": store, "catalog": catalog, "sets": sets, "base_uri": base_uri, "base_id": base_id, "root": root}
    catalog.close()


def _cfg(**kw) -> SFTConfig:
    base = dict(max_steps=6, lr=3e-3, micro_batch_size=8, seq_len=64, warmup_steps=1, log_every=2,
                checkpoint_every=3, heldout_max_examples=32, exact_match_max_prompts=16, max_new_tokens=4)
    return SFTConfig(**{**base, **kw})


def test_sft_config_is_checked_at_the_edge():
    with pytest.raises(ValueError, match="choose from"):
        SFTConfig(method="lora", lora_targets=["q_prj"])
    with pytest.raises(ValueError, match="did you mean 'lora_rank'"):
        SFTConfig(lora_rnk=4)
    with pytest.raises(ValueError, match="warmup_steps"):
        SFTConfig(max_steps=2, warmup_steps=5)


def test_resolve_model_by_id_uri_and_default(world):
    cat, store = world["catalog"], world["store"]
    for ref in (world["base_id"], f"catalog:{world['base_id']}"):
        assert resolve(ref, catalog=cat, store=store).hf_uri == world["base_uri"], ref
    assert resolve(world["base_uri"], catalog=cat, store=store).model_id == world["base_id"]
    assert resolve(None, catalog=cat, default_name="moe-tiny", store=store).model_id == world["base_id"]
    with pytest.raises(ModelRefError, match="no model named"):
        resolve(None, catalog=cat, default_name="nope")
    with pytest.raises(ModelRefError, match="catalog"):
        resolve("catalog:no-such-id", catalog=cat)


def test_lora_sft_registers_a_child_version_with_export_adapter_and_expert_load(world):
    store, cat = world["store"], world["catalog"]
    tracker = NoopTracker()
    result = run_sft(_cfg(method="lora", lora_rank=4), store, model_uri=world["base_uri"], data_uri=world["sets"].chat_uri,
                     prompts_uri=world["sets"].prompt_uri, output_prefix="runs/sft-lora", tracker=tracker, catalog=cat,
                     parent_model_id=world["base_id"], model_name="moe-tiny-sft")
    assert result.steps == 6 and result.checkpoint_uri.endswith("step-00000006")
    row = cat.get_model(result.model_id)
    assert row["parent_model_id"] == world["base_id"] and row["checkpoint_uri"] == result.hf_uri
    assert set(result.before) == set(result.after) == {"assistant_loss", "exact_match"}
    assert result.metrics["tokens_per_s"] > 0
    hf = store.read_artifact(result.hf_uri)
    names = set(hf.names())
    assert {"config.json", "tokenizer.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= names
    local = hf.download(world["root"] / "sft-hf")
    with_merged = H.import_hf(local).eval()
    assert not any("lora" in k for k in with_merged.state_dict())
    # the PEFT folder on the INPUT model's export computes what the merged export computes
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    base_dir = store.read_artifact(world["base_uri"]).download(world["root"] / "base-dl")
    adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                             str(local / "adapter")).eval()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = with_merged(ids).logits, adapted(input_ids=ids).logits
    assert float((ours - theirs).norm() / ours.norm()) < 1e-4
    # evaluation and serving load the LoRA-merged export through the one loader, with the export's tokenizer
    from moeflow.platform.model_refs import load

    evaluated = load(resolve(result.hf_uri, catalog=cat, store=store), store=store, cache_dir=world["root"] / "eval-dl")
    assert evaluated.ref.catalog_id == result.model_id
    with torch.no_grad():
        assert torch.equal(evaluated.model(ids).logits, ours)
    counts = __import__("numpy").load(__import__("io").BytesIO(
        store.read_artifact(result.expert_load_uri).get_bytes("expert_load.npz")))["counts"]
    assert counts.shape[0] == 3 and counts.sum() > 0  # a window per log interval (steps 2, 4, 6)
    report = store.read_artifact(store.uri("runs/sft-lora/data"))
    assert json.loads(report.get_bytes("stats.json"))["packing"]["documents"] > 0
    assert "quarantine.jsonl" in report.names()
    assert tracker.metric_history("before/assistant_loss") and tracker.metric_history("experts/dead_in_interval")
    # inside the engine loop the stacked expert adapters got gradients and moved (B starts at 0)
    ckpt = CheckpointManager(store, "runs/sft-lora").download_latest(world["root"] / "sft-lora-ckpt")[1]
    weights = load_model_weights(ckpt)
    for pname in ("gate_up_proj", "down_proj"):
        lora_B = weights[f"model.layers.1.mlp.experts.parametrizations.{pname}.0.lora_B"]
        assert lora_B.shape[0] == 4 and bool((lora_B.abs().sum(dim=(1, 2)) > 0).all()), pname  # every expert


def _job(world, prefix: str, **kw) -> dict:
    return PostTrainJob(stage="sft", builder=BUILDER, config=_cfg(**kw).to_dict(), model_uri=world["base_uri"],
                        output_prefix=prefix, data_uris={"chat": world["sets"].chat_uri, "prompts": ""},
                        store_uri=world["store"].root_uri, tracking="noop", device="cpu").to_dict()


def _final(store, prefix, tmp_path):
    d = CheckpointManager(store, prefix).download_latest(tmp_path / prefix.replace("/", "_"))[1]
    history = [{k: v for k, v in h.items() if k != "tokens_per_s"}
               for h in torch.load(d / "trainer.pt", weights_only=False)["loop"]["history"]]
    return history, load_model_weights(d)


def test_failed_mid_run_resumes_to_the_uninterrupted_result_in_process(world, tmp_path, monkeypatch):
    """The fast twin of the kill -9 test: the run dies by an exception after step 4, then resumes from step 3."""
    import moeflow.platform.posttrain.engine as engine

    store = world["store"]
    posttrain_worker(_job(world, "runs/sft-ref-fast", method="lora", exact_match_max_prompts=0))

    def die(marker):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine, "_maybe_die", die)
    job = {**_job(world, "runs/sft-failed", method="lora", exact_match_max_prompts=0), "fault_step": 4,
           "fault_marker": str(tmp_path / "m")}
    with pytest.raises(RuntimeError, match="injected"):
        posttrain_worker(job)
    assert CheckpointManager(store, "runs/sft-failed").latest().step == 3
    posttrain_worker({**job, "fault_step": None})
    (h_ref, w_ref), (h_run, w_run) = _final(store, "runs/sft-ref-fast", tmp_path), _final(store, "runs/sft-failed", tmp_path)
    assert h_run == h_ref
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)


@pytest.mark.slow
def test_killed_mid_run_resumes_to_the_uninterrupted_result(world, tmp_path):
    store = world["store"]
    posttrain_worker(_job(world, "runs/sft-ref", exact_match_max_prompts=0))
    job = {**_job(world, "runs/sft-killed", exact_match_max_prompts=0), "fault_step": 4,
           "fault_marker": str(tmp_path / "killed")}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "MOEFLOW_TRACKING": "noop", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "moeflow.platform.posttrain.engine", "--job", str(path)]
    first = subprocess.run(cmd, cwd=str(REPO.parent), env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == -9, first.stderr[-2000:]
    assert CheckpointManager(store, "runs/sft-killed").latest().step == 3
    second = subprocess.run(cmd, cwd=str(REPO.parent), env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]

    (h_ref, w_ref), (h_run, w_run) = _final(store, "runs/sft-ref", tmp_path), _final(store, "runs/sft-killed", tmp_path)
    assert h_run == h_ref
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)


def test_router_bias_switch_and_dead_expert_warning(world, caplog):
    store = world["store"]
    assert dead_experts(torch.tensor([[3.0, 0.0], [1.0, 2.0]])) == [(0, 1)]
    # the bias update is off: the routing bias must not move; expert 0 of the MoE layer is starved
    import moeflow.platform.posttrain.sft as sft_module

    original = sft_module.build_sft

    def starved(job, base, tok, ctx):
        with torch.no_grad():
            base.routers()[0].e_score_correction_bias[0] = -1e4
        return original(job, base, tok, ctx)

    sft_module.build_sft = starved
    try:
        with caplog.at_level(logging.WARNING, logger="moeflow.platform.posttrain.engine"):
            posttrain_worker(_job(world, "runs/sft-nobias", router_bias_update=False, exact_match_max_prompts=0,
                                  max_steps=4))
    finally:
        sft_module.build_sft = original
    assert "router 0 expert 0" in caplog.text and "received no tokens" in caplog.text
    d = CheckpointManager(store, "runs/sft-nobias").download_latest(world["root"] / "nobias")[1]
    bias = load_model_weights(d)["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert float(bias[0]) == -1e4 and torch.count_nonzero(bias[1:]) == 0


@pytest.mark.slow
def test_sft_learns_the_heldout_assistant_tokens_and_answers(world):
    """From the untrained base (the control: the same held-out set before SFT): held-out assistant loss falls
    far below the base's, and more held-out problems are answered exactly (measured 5.93 -> ~1.0 nats, 0 -> ~4 %)."""
    method = "full"
    kw = dict(max_steps=400, lr=3e-3, micro_batch_size=16, warmup_steps=10,
              log_every=40, checkpoint_every=0, exact_match_max_prompts=96, heldout_max_examples=96)
    result = run_sft(_cfg(method=method, **kw), world["store"], model_uri=world["base_uri"],
                     data_uri=world["sets"].chat_uri, prompts_uri=world["sets"].prompt_uri,
                     output_prefix=f"runs/sft-learn-{method}", tracker=NoopTracker())
    before, after = result.before, result.after
    assert after["assistant_loss"] < 0.5 * before["assistant_loss"], (before, after)
    assert after["exact_match"] > before["exact_match"] + 0.05, (before, after)


def _shuffled_answers(store, chat_uri: str, path: Path, seed: int = 0) -> str:
    """The control set: the same training prompts, each with the answer of another training problem (a
    permutation, so the answers' format and distribution stay the same); the held-out split is unchanged."""
    import random

    from moeflow.platform.posttrain.data import to_jsonl

    path.mkdir(parents=True, exist_ok=True)
    art = store.read_artifact(chat_uri)
    rows = [json.loads(line) for line in art.get_bytes("train.jsonl").decode().splitlines()]
    answers = [r["messages"][-1]["content"] for r in rows]
    random.Random(seed).shuffle(answers)
    rows = [{"messages": r["messages"][:-1] + [{"role": "assistant", "content": a}]} for r, a in zip(rows, answers)]
    (path / "train.jsonl").write_bytes(to_jsonl(rows))
    (path / "heldout.jsonl").write_bytes(art.get_bytes("heldout.jsonl"))
    return str(path)


def _arithmetic_sft(world, data_uri: str, prefix: str, steps: int):
    kw = dict(max_steps=steps, lr=3e-3, micro_batch_size=16, warmup_steps=10, log_every=max(1, steps // 4),
              checkpoint_every=0, exact_match_max_prompts=128, heldout_max_examples=64, max_new_tokens=8)
    return run_sft(_cfg(**kw), world["store"], model_uri=world["base_uri"], data_uri=data_uri,
                   prompts_uri=world["sets"].prompt_uri, output_prefix=prefix, tracker=NoopTracker())


def _check_exact_match_gain(world, tmp_path, steps: int, gain: float):
    real = _arithmetic_sft(world, world["sets"].chat_uri, f"runs/sft-arith-{steps}", steps)
    control = _arithmetic_sft(world, _shuffled_answers(world["store"], world["sets"].chat_uri, tmp_path / "shuffled"),
                              f"runs/sft-arith-shuffled-{steps}", steps)
    print("exact match on held-out problems: before", real.before["exact_match"], "after", real.after["exact_match"],
          "shuffled-answer control", control.after["exact_match"])
    assert real.before["exact_match"] < 0.02
    assert real.after["exact_match"] >= real.before["exact_match"] + gain, (real.before, real.after)
    assert real.after["exact_match"] >= control.after["exact_match"] + gain, (real.after, control.after)
    return real, control


def test_sft_on_the_generated_arithmetic_answers_held_out_problems_beside_a_shuffled_control(world, tmp_path):
    """Fast twin of the slow test below: a few hundred steps already answer held-out problems (unseen
    operands) exactly well above the base and above the same SFT on shuffled answers (measured 2026-12-01 on
    the 91 held-out problems: base 0, after 300 steps 6/91 = 0.066, shuffled-answer control 0)."""
    _check_exact_match_gain(world, tmp_path, steps=300, gain=0.04)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 2 x 800 steps: ~2-3 min on 2 idle cores, far more under load
def test_sft_long_on_the_generated_arithmetic_answers_many_more_held_out_problems(world, tmp_path):
    """Long enough to be a clear gain: exact match on the 91 held-out problems (measured 2026-12-01, 2 shared
    cores: base 0, after 800 steps 14/91 = 0.154, shuffled-answer control 1/91 = 0.011; 6.8 min at load ~12)."""
    _check_exact_match_gain(world, tmp_path, steps=800, gain=0.08)


@pytest.mark.slow
def test_two_ray_workers_lora_sft_survives_a_killed_worker(world, tmp_path):
    """The same launch path as pretraining: Ray Train, 2 gloo workers (DDP over the LoRA parameters),
    rank 1 SIGKILLed after step 4 on the first attempt; FailureConfig restarts the group from step 3."""
    from moeflow.platform.compute import ensure_ray

    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    ensure_ray()
    try:
        result = run_sft(_cfg(method="lora", lora_rank=4, micro_batch_size=4, exact_match_max_prompts=0),
                         world["store"], model_uri=world["base_uri"], data_uri=world["sets"].chat_uri,
                         output_prefix="runs/sft-ray", tracker=NoopTracker(), catalog=world["catalog"],
                         parent_model_id=world["base_id"], num_workers=2,
                         extra_job={"fault_step": 4, "fault_rank": 1, "fault_marker": str(tmp_path / "killed")})
    finally:
        import ray

        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous
    assert (tmp_path / "killed").exists()  # the fault happened
    assert result.steps == 6 and result.after["assistant_loss"] < result.before["assistant_loss"]
    assert world["catalog"].get_model(result.model_id)["parent_model_id"] == world["base_id"]


# ------------------------------------------------------------------ LoRA learning beside full fine-tuning
OLD_TASKS_BASE_STEPS = {"fast": 120, "slow": 300}


def _task_subset(store, chat_uri: str, path: Path, new: bool, shuffle: bool = False) -> str:
    """The generated chat set restricted to the 'new' tasks (reverse a list, count a word's letters) or to the
    others; ``shuffle`` permutes the training answers among the training prompts (the control)."""
    import random

    from moeflow.platform.posttrain.data import to_jsonl

    path.mkdir(parents=True, exist_ok=True)
    art = store.read_artifact(chat_uri)
    for split in ("train", "heldout"):
        rows = [json.loads(line) for line in art.get_bytes(f"{split}.jsonl").decode().splitlines()]
        rows = [r for r in rows if r["messages"][0]["content"].startswith(("Reverse the list", "How many letters")) == new]
        if shuffle and split == "train":
            answers = [r["messages"][-1]["content"] for r in rows]
            random.Random(0).shuffle(answers)
            rows = [{"messages": r["messages"][:-1] + [{"role": "assistant", "content": a}]} for r, a in zip(rows, answers)]
        (path / f"{split}.jsonl").write_bytes(to_jsonl(rows))
    return str(path)


def _lora_shift(world, tmp_path, size: str, runs: dict[str, dict]) -> dict:
    """A base fully fine-tuned on the old tasks (so its embeddings and head know every reply token, as a
    pretrained model's do), then each run of ``runs`` on the new tasks from that base; held-out figures."""
    store = world["store"]
    old = _task_subset(store, world["sets"].chat_uri, tmp_path / "old", new=False)
    data = {"new": _task_subset(store, world["sets"].chat_uri, tmp_path / "new", new=True),
            "shuffled": _task_subset(store, world["sets"].chat_uri, tmp_path / "new-shuffled", new=True, shuffle=True)}
    common = dict(lr=3e-3, micro_batch_size=16, warmup_steps=5, log_every=50, checkpoint_every=0,
                  exact_match_max_prompts=0, heldout_max_examples=64)
    base = run_sft(_cfg(max_steps=OLD_TASKS_BASE_STEPS[size], **common), store, model_uri=world["base_uri"],
                   data_uri=old, output_prefix=f"runs/lora-shift-base-{size}", tracker=NoopTracker())
    out = {}
    for name, kw in runs.items():
        kw = dict(kw)
        on = data[kw.pop("data", "new")]
        out[name] = run_sft(_cfg(**{**common, **kw}), store, model_uri=base.hf_uri, data_uri=on,
                            output_prefix=f"runs/lora-shift-{size}-{name}", tracker=NoopTracker())
    print({name: (round(r.before["assistant_loss"], 3), round(r.after["assistant_loss"], 3)) for name, r in out.items()})
    return out


def test_lora_learns_new_tasks_beside_a_shuffled_answer_control(world, tmp_path):
    """Why the last session saw LoRA stand still (2.118 -> 2.112 in 60 steps while full FT reached 1.229): its
    base had not yet learnt the reply tokens' output statistics, and what a few dozen steps teach such a base
    lives in the embeddings and LM head, which LoRA (like PEFT) leaves frozen. Measured 2026-12-07 from that
    same base, plain loop: full FT 2.109 -> 1.142; embeddings + head + final norm only -> 1.193; every OTHER
    parameter at full rank (what LoRA adapts) -> 2.115; LoRA -> 2.113. The engine, schedule, alpha/rank and
    expert adapters were not the cause. So LoRA is tested where it is meant to work: a base that knows the
    tokens (fine-tuned on the old tasks) learns new tasks. Fast: base 120 steps, then 80 LoRA steps (lr 1e-2,
    LoRA's usual larger rate) on reverse/letter-count; the control is the same run on shuffled answers (it can
    learn the answers' format, not the mapping). Measured (2 shared cores, load ~8, 98 s): held-out assistant loss
    LoRA 1.338 -> 1.072, control 1.338 -> 1.288."""
    runs = _lora_shift(world, tmp_path, "fast", {
        "lora": dict(method="lora", lr=1e-2, max_steps=80),
        "control": dict(method="lora", lr=1e-2, max_steps=80, data="shuffled")})
    lora, control = runs["lora"], runs["control"]
    assert lora.after["assistant_loss"] < 0.85 * lora.before["assistant_loss"], (lora.before, lora.after)
    assert lora.after["assistant_loss"] < control.after["assistant_loss"] - 0.1, (lora.after, control.after)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_lora_and_expert_only_lora_beside_full_fine_tuning_and_a_control(world, tmp_path):
    """From a base fine-tuned 300 steps on the old tasks, 200 steps on the new ones (held-out assistant loss,
    measured 2026-12-07, 2 shared cores, 7 min at load ~15): full FT 1.647 -> 0.420; LoRA on everything (lr 1e-2)
    -> 0.617; LoRA on the routed experts' stacked 3-D weights ONLY -> 1.034; LoRA on shuffled answers (control)
    -> 1.122 (it learns the answers' format, not the mapping)."""
    runs = _lora_shift(world, tmp_path, "slow", {
        "full": dict(max_steps=200),
        "lora": dict(method="lora", lr=1e-2, max_steps=200),
        "experts_only": dict(method="lora", lr=1e-2, max_steps=200, lora_targets=["experts"]),
        "control": dict(method="lora", lr=1e-2, max_steps=200, data="shuffled")})
    before = runs["lora"].before["assistant_loss"]
    full, lora, experts, control = (runs[k].after["assistant_loss"] for k in ("full", "lora", "experts_only", "control"))
    assert full < lora < control - 0.3
    assert lora < 0.5 * before
    assert experts < control - 0.05 and experts < before - 0.2


def test_a_training_checkpoint_resolves_to_its_runs_hf_export(world):
    """Pretraining records its checkpoint as the model version; post-training loads that run's HF export."""
    from moeflow.platform.model_refs import hf_export_of

    store = world["store"]
    with store.write_artifact("runs/pre/checkpoints/step-00000010") as w:
        w.put_bytes("model.pt", b"x")
    ckpt = store.uri("runs/pre/checkpoints/step-00000010")
    assert hf_export_of(store, ckpt) is None
    with pytest.raises(ModelRefError, match="neither an HF export"):
        resolve(ckpt, store=store).require_hf()
    src = store.read_artifact(world["base_uri"])
    with store.write_artifact("runs/pre/hf", metadata={"checkpoint_uri": ckpt}) as w:
        for name in src.names():
            w.put_bytes(name, src.get_bytes(name))
    assert hf_export_of(store, ckpt) == store.uri("runs/pre/hf")
    assert hf_export_of(store, world["base_uri"]) == world["base_uri"]
    ref = resolve(ckpt, store=store)
    assert (ref.hf_uri, ref.checkpoint_uri) == (store.uri("runs/pre/hf"), ckpt)
    with store.write_artifact("runs/pre/checkpoints/step-00000005") as w:  # an earlier step: not what hf/ holds
        w.put_bytes("model.pt", b"x")
    assert resolve(store.uri("runs/pre/checkpoints/step-00000005"), store=store).hf_uri is None
