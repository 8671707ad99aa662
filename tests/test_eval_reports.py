"""Reports: expert specialisation (planted vs random routing, padding-free counts, figure + table) and
decontamination (a planted overlap in curated and post-training data is found and excluded)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.eval.specialisation import route_counts
from moeflow.models.tokenizer import train_bpe
from moeflow.platform.eval.decontaminate import decontaminate, index_training_data, training_texts
from moeflow.platform.eval.specialisation import domain_texts, expert_specialisation, plot, table_rows
from moeflow.platform.eval.tasks import load_task, load_task_data
from moeflow.platform.store import LocalStore

A_IDS, B_IDS = range(10, 50), range(60, 100)


@pytest.fixture(scope="module")
def cfg(one_cpu_thread):
    return ModelConfig.preset("tiny").replace(vocab_size=128, num_routed_experts=8, num_experts_per_tok=2)


def _docs(rng, ids, n=6, length=20):
    return [[0] + rng.choice(list(ids), size=length).tolist() for _ in range(n)]


def _planted(cfg) -> MoETransformer:
    """Domain A's tokens carry a large +x component along hidden dim 0, B's along dim 1; experts 0-1
    read dim 0 and experts 2-3 read dim 1: the router should split the domains."""
    torch.manual_seed(0)
    m = MoETransformer(cfg).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight[list(A_IDS), 0] = 3.0
        m.model.embed_tokens.weight[list(B_IDS), 1] = 3.0
        for r in m.routers():
            r.weight[:2, 0] = 4.0
            r.weight[2:4, 1] = 4.0
    return m


def test_planted_specialisation_has_high_mi_and_a_random_router_does_not(cfg):
    rng = np.random.default_rng(0)
    docs = {"code": _docs(rng, A_IDS), "prose": _docs(rng, B_IDS)}
    _, planted = route_counts(_planted(cfg), docs)
    torch.manual_seed(0)
    _, control = route_counts(MoETransformer(cfg).eval(), docs)
    from moeflow.models.eval.specialisation import mutual_information

    mi_planted, mi_control = mutual_information(planted), mutual_information(control)
    assert (mi_planted > 0.8).all(), mi_planted  # of at most 1 bit for two equal domains
    assert (mi_control < 0.5 * mi_planted).all(), (mi_control, mi_planted)
    assert planted[:, 0, :2].sum() > 0.9 * planted[:, 0].sum()


def test_route_counts_count_real_tokens_only_whatever_the_batch(cfg):
    rng = np.random.default_rng(1)
    docs = {"code": [[0] + rng.integers(5, 120, size=n).tolist() for n in (3, 17, 8, 30, 1)]}
    _, c1 = route_counts(_planted(cfg), docs, batch_size=1)
    _, c8 = route_counts(_planted(cfg), docs, batch_size=8)
    assert (c1 == c8).all()
    num_tokens = sum(len(d) for d in docs["code"])
    assert (c1.sum(axis=(1, 2)) == num_tokens * cfg.num_experts_per_tok).all()


def test_report_figure_and_table_from_the_shipped_domain_texts(tmp_path):
    texts = domain_texts(max_per_domain=8)
    assert set(texts) == {"code", "prose", "maths", "chat"} and all(len(v) == 8 for v in texts.values())
    tok = train_bpe([t for v in texts.values() for t in v if isinstance(t, str)], vocab_size=400)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size)).eval()
    report, counts = expert_specialisation(model, tok, texts)
    assert counts.shape == (model.cfg.num_moe_layers, 4, model.cfg.num_routed_experts)
    rows = table_rows(report)
    assert [r["layer"] for r in rows] == list(range(model.cfg.num_moe_layers))
    assert {"mi_bits", "normalized_mi", "maxvio", "top_code", "top_chat"} <= set(rows[0])
    png = plot(report, tmp_path / "specialisation.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def _curated_artifact(store: LocalStore, prefix: str, texts: list[str]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts, "source": ["test"] * len(texts),
                      "metadata": ["{}"] * len(texts), "domain": ["prose"] * len(texts), "ppl_bucket": ["head"] * len(texts)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with store.write_artifact(prefix, metadata={"kind": "dataset"}) as w:
        w.put_bytes("part-00000.parquet", buf.getvalue())
    return store.uri(prefix)


def test_planted_overlap_is_found_in_curated_and_post_training_data_and_excluded(tmp_path):
    store = LocalStore(tmp_path / "store")
    data = load_task_data(load_task("python_mc"))
    victim_mc = data.items[4]  # its question + answer copied into the pretraining corpus
    curated = _curated_artifact(store, "datasets/curated", [
        "An unrelated document about gardening and the care of tomato plants in a cold climate. " * 3,
        f"Quiz time! {victim_mc.question} The answer is {victim_mc.choices[victim_mc.answer]}, as everyone knows."])
    humaneval = load_task_data(load_task("humaneval").model_copy(update={"limit": 10}))
    victim_code = humaneval.items[7]
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "Write it"},
                                            {"role": "assistant", "content": victim_code.prompt + victim_code.canonical_solution}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    assert len(list(training_texts(curated))) == 2 and len(list(training_texts(sft.as_uri()))) == 2
    index = index_training_data([curated, sft.as_uri()])

    clean_mc, rep_mc = decontaminate(data, index)
    assert rep_mc.contaminated == [data.ids[4]] and len(clean_mc.items) == len(data.items) - 1
    assert victim_mc not in clean_mc.items
    clean_code, rep_code = decontaminate(humaneval, index)
    assert rep_code.contaminated == ["HumanEval/7"] and len(clean_code.items) == 9
    kept, rep_kept = decontaminate(humaneval, index, exclude=False)
    assert len(kept.items) == 10 and rep_kept.to_dict()["num_contaminated"] == 1 and not rep_kept.excluded
    # a clean corpus flags nothing
    empty_index = index_training_data([_curated_artifact(store, "datasets/other", ["nothing to see " * 20])])
    assert decontaminate(data, empty_index)[1].contaminated == []
