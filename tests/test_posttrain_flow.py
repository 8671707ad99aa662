"""The sft flow under Prefect with the real stores of a MOEFLOW_HOME: generated data, lineage, MLflow alias 'sft'."""

from __future__ import annotations

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models import hf as H
from moeflow.models.tokenizer import train_bpe
from moeflow.platform.catalog import Catalog
from moeflow.platform.posttrain.generated import GeneratedDataConfig
from moeflow.platform.posttrain.sft import SFTConfig
from moeflow.platform.settings import get_settings
from moeflow.platform.store import open_store
from train_fakes import one_thread, tiny_model_overrides

pytestmark = pytest.mark.slow


def _register_pretrained(tmp_path, run_name: str) -> tuple[str, str]:
    """A tiny 'pretrained' model as pretraining leaves it: HF export + tokenizer in the store, a catalog version."""
    store = open_store(get_settings(), create_bucket=True)
    tok = train_bpe(["What is 12 + 7? 19. Sort the list [3, 1, 2]. [1, 2, 3]. " * 40], vocab_size=320)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(**tiny_model_overrides(tok.vocab_size)))
    local = tmp_path / "hf"
    H.export_hf(model, local, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    tok.save(local / "tokenizer.json")
    with store.write_artifact(f"runs/{run_name}/hf") as w:
        for p in sorted(local.iterdir()):
            w.put_file(p.name, p)
    uri = store.uri(f"runs/{run_name}/hf")
    with Catalog.from_settings(get_settings()) as catalog:
        return uri, catalog.register_model(run_name, uri, "pretrained-fake")


def test_sft_flow_registers_a_child_version_with_lineage_and_alias(moeflow_home, prefect_harness, tmp_path):
    from moeflow.flows.sft import sft

    with one_thread():
        base_uri, base_id = _register_pretrained(tmp_path, "moe-flowtest")
        config = SFTConfig(max_steps=4, micro_batch_size=4, seq_len=48, warmup_steps=1, log_every=2,
                           checkpoint_every=0, heldout_max_examples=8, exact_match_max_prompts=4, max_new_tokens=3)
        data = GeneratedDataConfig(max_functions=0, num_arithmetic=120, max_operand=12)
        result = sft(sft=config, posttrain_data=data, run_name="moe-flowtest")
    assert set(result["before"]) == {"assistant_loss", "exact_match"}
    with Catalog.from_settings(get_settings()) as catalog:
        child = catalog.get_model(result["model_id"])
        assert child["parent_model_id"] == base_id and child["name"] == "moe-flowtest-sft"
        upstream = {n.get("uri") for n in catalog.upstream(result["hf_uri"]) if n.get("type") == "artifact"}
        assert base_uri in upstream
        assert {d["kind"] for d in catalog.list_datasets()} >= {"chat_data", "prompt_data", "preference_data"}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=get_settings().tracking_uri)
    version = client.get_model_version_by_alias("moe-flowtest-sft", "sft")
    assert version.tags["moeflow.artifact_uri"] == result["hf_uri"]
    assert version.tags["moeflow.parent_model_uri"] == base_uri
    # a later stage can start from the registry alias: name@alias resolves to the export and its catalog version
    from moeflow.platform.model_refs import resolve
    from moeflow.platform.tracking import get_tracker

    with Catalog.from_settings(get_settings()) as catalog:
        ref = resolve("moe-flowtest-sft@sft", catalog=catalog, tracker=get_tracker(get_settings()))
    assert (ref.uri, ref.model_id, ref.alias) == (result["hf_uri"], result["model_id"], "sft")
    assert (ref.mlflow_name, ref.mlflow_version) == ("moe-flowtest-sft", version.version)
