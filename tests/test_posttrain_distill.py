"""The distill stage: teacher top-k cache in the store, held-out KL, and learning evidence."""

from __future__ import annotations

import pytest
import torch

from moeflow.models import MoETransformer
from moeflow.models.config import ModelConfig
from moeflow.platform.posttrain import distill as D
from moeflow.platform.store import LocalStore

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=40, **kw))


def _rows(n=6, t=9, seed=0):
    return torch.randint(0, 40, (n, t + 1), generator=torch.Generator().manual_seed(seed))


def test_topk_cache_is_written_once_and_reused(tmp_path):
    store, teacher, rows = LocalStore(tmp_path / "store"), _model(), _rows()
    loss = D.DistillLossConfig(top_k=5, temperature=2.0)
    top, uri, reused = D.teacher_topk_for_pool(store, teacher, teacher_uri="m://t", tokens_uri="s://x",
                                               rows_NT1=rows, loss=loss, batch_size=4)
    assert not reused and top.logprobs_NK.shape == (6, 9, 5) and top.indices_NK.shape == (6, 9, 5)
    # the values are the teacher's full-softmax log-probs at T (to fp16 precision)
    with torch.no_grad():
        full = torch.log_softmax(teacher(rows[:, :-1]).logits / 2.0, -1)
    assert torch.allclose(top.logprobs_NK, full.gather(-1, top.indices_NK), atol=2e-3)
    assert torch.equal(top.indices_NK, full.topk(5, -1).indices)

    class NoTeacher:  # a second run must not call the teacher at all
        def __call__(self, *a, **k):
            raise AssertionError("teacher called although the cache exists")

        def eval(self):
            return self

    again, uri2, reused2 = D.teacher_topk_for_pool(store, NoTeacher(), teacher_uri="m://t", tokens_uri="s://x",
                                                   rows_NT1=rows, loss=loss)
    assert reused2 and uri2 == uri and torch.equal(again.logprobs_NK, top.logprobs_NK)
    # another k, temperature, teacher or pool is another cache
    for kw in (dict(loss=D.DistillLossConfig(top_k=4, temperature=2.0)), dict(teacher_uri="m://other"),
               dict(rows_NT1=_rows(seed=1))):
        args = dict(teacher_uri="m://t", tokens_uri="s://x", rows_NT1=rows, loss=loss) | kw
        assert D.cache_prefix(args["teacher_uri"], "s://x", args["rows_NT1"], args["loss"].top_k,
                              args["loss"].temperature) != store.key_for_uri(uri)


def test_cache_with_other_rows_is_refused(tmp_path):
    store, rows = LocalStore(tmp_path / "store"), _rows()
    loss = D.DistillLossConfig(top_k=3)
    top = D.compute_topk(_model(), rows, k=3, temperature=1.0)
    prefix = D.cache_prefix("m://t", "s://x", rows, 3, 1.0)
    D.write_topk_cache(store, prefix, _rows(seed=5), top, {})   # a corrupted / colliding artefact
    with pytest.raises(RuntimeError, match="other rows"):
        D.teacher_topk_for_pool(store, _model(), teacher_uri="m://t", tokens_uri="s://x", rows_NT1=rows, loss=loss)


def test_held_out_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
    teacher, rows = _model(0), _rows(4, 7, seed=3)
    logp = D.teacher_logprobs(teacher, rows, batch_size=3)
    same = D.evaluate_student(teacher, rows, logp, batch_size=3)
    assert same["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # val_loss is the plain mean next-token NLL
        nll = torch.nn.functional.cross_entropy(teacher(rows[:, :-1]).logits.reshape(-1, 40), rows[:, 1:].reshape(-1))
    assert same["val_loss"] == pytest.approx(float(nll), rel=1e-5)
    other = D.evaluate_student(_model(1), rows, logp)
    assert other["kl_to_teacher"] > 1e-4


# ------------------------------------------------------------------ the stage on the engine core
def _noisy(docs, seed, p=0.2):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[d[0]] + [int(rng.integers(2, 64)) if rng.random() < p else t for t in d[1:]] for d in docs]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Token shards of learnable but noisy documents (a modular pattern, 20 % of tokens replaced at random),
    and a teacher MoE pretrained on all of them (HF export + tokenizer)."""
    from moeflow.models import hf as H
    from moeflow.models.tokenizer import train_bpe
    from moeflow.platform.catalog import Catalog
    from train_fakes import pattern_docs, tiny_model_overrides, write_token_artifact

    root = tmp_path_factory.mktemp("distill")
    store = LocalStore(root / "store")
    catalog = Catalog(f"sqlite:///{root / 'catalog.db'}")
    tok = train_bpe(["a tiny corpus for a real tokenizer file"] * 4, vocab_size=280)
    vocab = tok.vocab_size
    tokens_uri = write_token_artifact(store, "tokens/patterns", _noisy(pattern_docs(300, seed=0, bos_id=tok.bos_id), 0),
                                      _noisy(pattern_docs(40, seed=1, bos_id=tok.bos_id), 1), vocab_size=vocab,
                                      bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    torch.manual_seed(0)
    teacher = MoETransformer(ModelConfig.preset("tiny").replace(**tiny_model_overrides(vocab)))
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    rows = D._rows(tokens_uri, "train", 256, 32, seed=7, shuffle=True)
    for step in range(120):  # a teacher that knows the patterns
        batch = rows[torch.randint(0, len(rows), (16,), generator=torch.Generator().manual_seed(step))]
        loss = teacher(batch[:, :-1], targets=batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    local = root / "teacher-hf"
    H.export_hf(teacher, local, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    tok.save(local / "tokenizer.json")
    with store.write_artifact("runs/teacher/hf") as w:
        for p in sorted(local.iterdir()):
            w.put_file(p.name, p)
    teacher_uri = store.uri("runs/teacher/hf")
    yield {"store": store, "catalog": catalog, "tokens_uri": tokens_uri, "teacher_uri": teacher_uri, "root": root,
           "teacher_id": catalog.register_model("moe-tiny", teacher_uri, "teacher")}
    catalog.close()


def _distill(world, prefix, **kw):
    from moeflow.platform.tracking import NoopTracker

    cfg = D.DistillConfig(**{**dict(max_steps=40, lr=1e-2, micro_batch_size=8, seq_len=32, warmup_steps=2,
                                    log_every=10, checkpoint_every=20, pool_rows=128, eval_rows=16, top_k=8,
                                    student_overrides={"hidden_size": 32, "num_heads": 2, "kv_lora_rank": 16,
                                                       "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                                                       "v_head_dim": 8}), **kw})
    return D.run_distill(cfg, world["store"], model_uri=world["teacher_uri"], data_uri=world["tokens_uri"],
                         output_prefix=prefix, tracker=NoopTracker(), catalog=world["catalog"],
                         parent_model_id=world["teacher_id"], model_name="moe-tiny-distill")


def test_distilled_student_beats_the_same_student_without_the_teacher(world):
    """A small transfer set (32 noisy rows, ~15 epochs): hard labels fit the noise, the teacher's soft targets
    do not — the distilled student is closer to the teacher AND better on held-out text."""
    run = dict(pool_rows=32, max_steps=60)
    distilled = _distill(world, "runs/distill-kd", alpha=0.5, **run)
    alone = _distill(world, "runs/distill-hard", alpha=0.0, **run)   # same student, rows, steps: hard labels only
    assert distilled.before == alone.before   # the same fresh student
    assert distilled.after["kl_to_teacher"] < 0.3 * distilled.before["kl_to_teacher"]
    assert distilled.after["kl_to_teacher"] < alone.after["kl_to_teacher"] - 0.1
    assert distilled.after["val_loss"] < alone.after["val_loss"] - 0.05
    # lineage and export: a dense student is an ordinary HF model, child of the teacher
    row = world["catalog"].get_model(distilled.model_id)
    assert row["parent_model_id"] == world["teacher_id"] and distilled.hf_uri
    assert "config.json" in world["store"].read_artifact(distilled.hf_uri).names()


def test_online_teacher_trains_the_same_student_as_the_cache(world):
    cached = _distill(world, "runs/distill-cache", max_steps=6, checkpoint_every=0)
    online = _distill(world, "runs/distill-online", max_steps=6, checkpoint_every=0, teacher_logits="online")
    for key in ("kl_to_teacher", "val_loss"):  # the cache holds fp16 log-probs: equal to ~1e-3
        assert online.after[key] == pytest.approx(cached.after[key], rel=2e-2)
    assert online.before == cached.before


def test_distill_task_records_the_student_as_a_child_of_the_teacher(world, monkeypatch):
    """The Prefect task (its function): stage run + lineage in the catalog, the headline figures returned."""
    from moeflow.tasks.distill import distill_task

    monkeypatch.setenv("MOEFLOW_HOME", str(world["root"]))   # the world's store/ and catalog.db are the home's
    monkeypatch.setenv("MOEFLOW_TRACKING", "noop")
    cfg = D.DistillConfig(max_steps=2, lr=1e-2, micro_batch_size=4, seq_len=32, warmup_steps=0, log_every=1,
                          checkpoint_every=0, pool_rows=8, eval_rows=4, top_k=4,
                          student_overrides={"hidden_size": 32, "num_heads": 2, "kv_lora_rank": 16,
                                             "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8})
    out = distill_task.fn(cfg, world["tokens_uri"], model=world["teacher_id"], run_name="tiny-run")
    assert set(out["before"]) == {"kl_to_teacher", "val_loss"} and set(out["after"]) == {"kl_to_teacher", "val_loss"}
    row = world["catalog"].get_model(out["model_id"])
    assert row["name"] == "tiny-run-distill" and row["parent_model_id"] == world["teacher_id"]
