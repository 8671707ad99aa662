"""platform/model_refs: every form a user types resolves to one ModelRef (artefact, HF export, catalog id,
MLflow name/version), and the loader loads it. (The catalog forms and a checkpoint's run export are in
test_posttrain_sft; the MLflow alias through a real server in test_posttrain_flow / test_eval_flow.)"""

from __future__ import annotations


import pytest
import torch

from moeflow.platform.model_refs import ModelRefError, load, resolve
from moeflow.platform.serve.registry import MemoryRegistry
from moeflow.platform.store import LocalStore
from moeflow.platform.tracking import NoopTracker


@pytest.fixture()
def stored(tmp_path):
    from serve_helpers import make_model_dir

    local = make_model_dir(tmp_path / "export")
    store = LocalStore(tmp_path / "store")
    with store.write_artifact("runs/moe/hf") as w:
        for p in sorted(local.rglob("*")):
            w.put_file(p.relative_to(local).as_posix(), p)
    return {"local": local, "store": store, "uri": store.uri("runs/moe/hf")}


def test_registry_forms_resolve_through_the_artifact_tag(stored):
    reg = MemoryRegistry()
    v1 = reg.add_version("moe", {"moeflow.artifact_uri": stored["uri"]})
    v2 = reg.add_version("moe", {"moeflow.hf_uri": stored["uri"]})  # pyfunc-only registration
    reg.set_alias("moe", "champion", v1)
    for ref, version, alias in (("moe@champion", v1, "champion"), ("models:/moe@champion", v1, "champion"),
                                (f"moe/{v2}", v2, None), (f"models:/moe/{v1}", v1, None)):
        mref = resolve(ref, registry=reg, store=stored["store"])
        assert (mref.uri, mref.hf_uri, mref.mlflow_name, mref.mlflow_version, mref.alias) == (
            stored["uri"], stored["uri"], "moe", version, alias), ref
        assert mref.label == f"moe/{version}"
    reg.add_version("other", {"unrelated": "x"})
    with pytest.raises(ModelRefError, match="not a moeflow model"):
        resolve("other/1", registry=reg)
    with pytest.raises(ModelRefError, match="no alias moe@candidate"):
        resolve("moe@candidate", registry=reg)
    with pytest.raises(ModelRefError, match="no model version moe/9"):
        resolve("moe/9", registry=reg)


def test_a_store_uri_learns_its_registered_version_and_a_local_dir_loads(stored):
    tracker = NoopTracker()
    tracker.register_model("moe-sft", str(stored["local"]), artifact_path="hf", tags={"moeflow.artifact_uri": stored["uri"]})
    mref = resolve(stored["uri"], tracker=tracker, store=stored["store"])
    assert (mref.mlflow_name, mref.mlflow_version, mref.hf_uri, mref.checkpoint_uri) == ("moe-sft", "1", stored["uri"], None)
    loaded = load(mref, store=stored["store"], cache_dir=stored["store"].root.parent / "dl")
    direct = load(str(stored["local"]))
    assert direct.ref.hf_uri == str(stored["local"].resolve())
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, direct.model(ids).logits)
    assert loaded.tokenizer.encode("def f(x):") == direct.tokenizer.encode("def f(x):")


def test_bad_references_are_one_line(stored, tmp_path):
    for ref, match in (("", "no model given"), ("no such thing here", "cannot resolve model"),
                       (stored["store"].uri("runs/none/hf"), "no committed artefact")):
        with pytest.raises(ModelRefError, match=match) as err:
            resolve(ref, store=stored["store"])
        assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelRefError, match="neither an HF export"):
        load(str(tmp_path / "empty"))
    with pytest.raises(ModelRefError, match="neither an HF export nor a checkpoint with one"):
        load(str(tmp_path / "empty"), require_hf=True)
    assert issubclass(ModelRefError, LookupError) and issubclass(ModelRefError, ValueError)
