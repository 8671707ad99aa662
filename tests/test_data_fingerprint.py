"""Changed inputs are noticed (issue 9): the inputs' fingerprint is part of the shard ids, the
default output prefix and the curate task's Prefect cache key; a re-run after editing or adding
files curates the new content, and a resume at the same prefix over changed inputs is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moeflow.platform.data.curate import (
    FAULT_ENV,
    CurateConfig,
    CurationError,
    default_output_prefix,
    run_curation,
)
from moeflow.platform.data.documents import iter_artifact_documents
from moeflow.platform.data.fingerprint import hash_versions, versions_of
from moeflow.platform.data.sources import inputs_fingerprint
from moeflow.platform.data.sources import SourceConfig, plan_shards
from moeflow.platform.store import LocalStore

STEPS = ["normalize", "exact_dedup"]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))


def write_corpus(root: Path, texts: list[str]) -> None:
    root.mkdir(exist_ok=True)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "b.txt").write_text("a plain text file\n")


def config_for(root: Path) -> CurateConfig:
    return CurateConfig(sources=[SourceConfig(uri=str(root))], steps=STEPS, records_per_shard=2)


def test_fingerprint_follows_content_not_touches(tmp_path):
    root = tmp_path / "in"
    write_corpus(root, ["one", "two", "three"])
    sources = [SourceConfig(uri=str(root))]
    first = inputs_fingerprint(sources)
    assert first == hash_versions(versions_of(plan_shards(sources, records_per_shard=2)))
    os.utime(root / "b.txt", ns=(1, 1))  # touched, same bytes: same fingerprint
    assert inputs_fingerprint(sources) == first
    (root / "b.txt").write_text("A plain text file\n")  # same size, one byte changed
    edited = inputs_fingerprint(sources)
    assert edited != first
    (root / "c.txt").write_text("added\n")
    assert inputs_fingerprint(sources) not in (first, edited)
    (root / "c.txt").unlink()
    assert inputs_fingerprint(sources) == edited
    # large files: size + mtime + first/last MiB
    from moeflow.platform.data import fingerprint

    big = root / "big.txt"
    big.write_bytes(b"x" * (fingerprint.FULL_HASH_BYTES + 10))
    v1 = fingerprint.local_version(str(big))
    os.utime(big, ns=(5, 5))
    assert fingerprint.local_version(str(big)) != v1 and "mtime" in v1


def test_rerun_after_editing_or_adding_files_returns_the_new_documents(tmp_path):
    root = tmp_path / "in"
    store = LocalStore(tmp_path / "store")
    write_corpus(root, ["alpha words", "beta words"])
    first = run_curation(config_for(root), store, output_prefix=default_output_prefix(config_for(root)),
                         num_workers=1, progress=False)
    again = run_curation(config_for(root), store, output_prefix=default_output_prefix(config_for(root)),
                         num_workers=1, progress=False)
    assert again.reused and again.content_hash == first.content_hash
    write_corpus(root, ["alpha words", "gamma words"])  # edited
    (root / "new.txt").write_text("an added file\n")
    prefix = default_output_prefix(config_for(root))
    assert prefix != first.uri.rsplit("/", 3)[-1] and prefix not in first.uri
    edited = run_curation(config_for(root), store, output_prefix=prefix, num_workers=1, progress=False)
    assert not edited.reused and edited.inputs_fingerprint != first.inputs_fingerprint
    texts = sorted(d.text for d in iter_artifact_documents(edited.uri))
    assert texts == sorted(["alpha words", "gamma words", "a plain text file\n", "an added file\n"])


def test_same_prefix_over_changed_inputs_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "in"
    store = LocalStore(tmp_path / "store")
    write_corpus(root, [f"record number {i}" for i in range(6)])
    # a finished artefact, then an edit: refused, naming the file
    run_curation(config_for(root), store, output_prefix="x/done", num_workers=1, progress=False)
    write_corpus(root, [f"record number {i}" for i in range(7)])
    with pytest.raises(CurationError, match=r"inputs changed.*a\.jsonl"):
        run_curation(config_for(root), store, output_prefix="x/done", num_workers=1, progress=False)
    # crash, edit, resume: refused (old and new documents would mix), nothing committed
    monkeypatch.setenv(FAULT_ENV, "2")
    with pytest.raises(CurationError, match="injected fault"):
        run_curation(config_for(root), store, output_prefix="x/crashed", num_workers=1, progress=False)
    monkeypatch.delenv(FAULT_ENV)
    (root / "b.txt").write_text("edited while the run was down\n")
    with pytest.raises(CurationError, match=r"inputs changed.*b\.txt"):
        run_curation(config_for(root), store, output_prefix="x/crashed", num_workers=1, progress=False)
    assert not store.artifact_exists("x/crashed")


def test_curate_task_cache_key_changes_with_the_inputs(tmp_path):
    from moeflow.tasks.curate import curate_task

    root = tmp_path / "in"
    write_corpus(root, ["one"])
    config = config_for(root)

    def key() -> str:
        return curate_task.cache_policy.compute_key(task_ctx=None, inputs={"config": config, "num_workers": 1},
                                                    flow_parameters={})

    first = key()
    assert key() == first
    (root / "b.txt").write_text("changed text\n")
    assert key() != first
