"""The registered model loads as an MLflow pyfunc and generates text, against a real MLflow server.

``mlflow.pyfunc.load_model("models:/<name>@<alias>")`` must return the same completions as our own
``generate`` over the HF export (greedy, so exact), the version must carry a signature and the model
card, the MLflow model folder must hold no copy of the weights (stored once, in the store), and
logging it must not reach for the network.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow_server import mlflow_server

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.chat import prompt_ids, render_ids, stop_ids
from moeflow.models.generation import generate
from moeflow.models.hf import export_hf, import_hf
from moeflow.models.model_card import ModelCardInfo
from moeflow.models.tokenizer import Tokenizer, train_bpe
from moeflow.platform.store import LocalStore
from moeflow.platform.tracking import MLflowTracker

PROMPTS = ["What is 2 + 3?", "def add(a, b):"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-pyfunc")) as url:
        yield url


ANSWER = "The answer is 5."


def _taught_model(tok) -> MoETransformer:
    """A tiny model taught one chat turn (60 AdamW steps, ~4 s on one thread), so its answer is checkable."""
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=512))
    rendered = render_ids(tok, [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": ANSWER}])
    ids_BT = torch.tensor([rendered.ids])
    targets_BT = ids_BT[:, 1:].clone()
    targets_BT[torch.tensor([rendered.loss_mask])[:, 1:] == 0] = -100  # only the assistant turn is a target
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        model(ids_BT[:, :-1], targets_BT).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def taught_export(tmp_path_factory) -> Path:
    """The complete HF export of a taught tiny model (trained once per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~10x faster for tiny tensors on shared cores
    try:
        tok = train_bpe(["def add(a, b):\n    return a + b\n" * 20, "What is 2 + 3? The answer is 5. " * 30],
                        vocab_size=400)
        model = _taught_model(tok)
    finally:
        torch.set_num_threads(threads)
    return export_hf(model, tmp_path_factory.mktemp("pyfunc") / "export", tokenizer=tok,
                     card=ModelCardInfo(name="moe-pyfunc"))


@pytest.fixture
def hf_export(taught_export, tmp_path, monkeypatch):
    """The export committed to a local store under this test's MOEFLOW_HOME."""
    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))
    local = taught_export
    store = LocalStore(tmp_path / "home" / "store")
    with store.write_artifact("runs/moe/abc/hf") as w:
        for path in sorted(local.rglob("*")):
            w.put_file(path.relative_to(local).as_posix(), path)
    return store.uri("runs/moe/abc/hf"), local


def _reference(local: Path, prompts, chat: bool, max_new_tokens: int) -> list[str]:
    model, tok = import_hf(local).eval(), Tokenizer.from_file(local / "tokenizer.json")
    ids = [prompt_ids(tok, p) if chat else tok.encode(p) for p in prompts]
    stops = stop_ids(tok) if chat else [tok.eos_id]
    with torch.no_grad():
        out = generate(model, ids, max_new_tokens, stop_token_ids=stops, pad_id=tok.pad_id)
    return [tok.decode([t for t in row if t not in stops]) for row in out.tokens]


def _no_network(monkeypatch) -> list:
    """Refuse connections off this machine and record every pip subprocess."""
    calls: list = []
    real_connect, real_popen = socket.socket.connect, subprocess.Popen.__init__

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
            calls.append(("connect", address))
            raise OSError(f"network access to {address} in a test that must stay offline")
        return real_connect(self, address)

    def popen(self, args, *a, **kw):
        if "pip" in " ".join(map(str, args if isinstance(args, (list, tuple)) else [args])):
            calls.append(("pip", args))
        return real_popen(self, args, *a, **kw)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    return calls


@pytest.mark.service
def test_registered_model_loads_by_alias_and_generates_text(server, hf_export, tmp_path, monkeypatch):
    import mlflow

    from moeflow.platform.tracking.pyfunc import register_text_model

    hf_uri, local = hf_export
    tracker = MLflowTracker(server, experiment="pyfunc")
    calls = _no_network(monkeypatch)
    card = (local / "README.md").read_text()
    with tracker.start_run("pretrain"):
        version = register_text_model(tracker, "moe-pyfunc", hf_uri, alias="pretrained", model_card=card)
    assert calls == []  # no pip, no index, no telemetry while logging
    monkeypatch.undo()
    monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "home"))

    client = tracker.client
    mv = client.get_model_version_by_alias("moe-pyfunc", "pretrained")
    assert mv.version == version and mv.description == card and mv.tags["moeflow.hf_uri"] == hf_uri

    mlflow.set_tracking_uri(server)
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/moe-pyfunc@pretrained")
    finally:
        mlflow.set_tracking_uri(None)
    sig = pyfunc.metadata.signature
    assert sig.inputs.input_names() == ["prompt"] and sig.outputs.input_names() == ["text"]
    assert {p.name for p in sig.params.params} >= {"max_new_tokens", "temperature", "chat"}

    import pandas as pd

    texts = pyfunc.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 12})
    assert texts == _reference(local, PROMPTS, chat=True, max_new_tokens=12)
    assert texts[0] == ANSWER  # the taught turn, through the chat template, stopped at <|end|>
    raw = pyfunc.predict(pd.DataFrame({"prompt": PROMPTS[:1]}), params={"max_new_tokens": 6, "chat": False})
    assert raw == _reference(local, PROMPTS[:1], chat=False, max_new_tokens=6)

    # stored once: the MLflow model folder holds no weights, only a pointer to the store's export
    files = _all_artifacts(client, mv.run_id, "model")
    assert "model/MLmodel" in files and "model/README.md" in files
    assert not any(p.endswith(".safetensors") for p in files)


def test_predict_rejects_bad_input(hf_export):
    from moeflow.platform.tracking.pyfunc import MoeflowTextModel

    hf_uri, _ = hf_export
    model = MoeflowTextModel()
    model.load_context(type("Ctx", (), {"model_config": {"hf_uri": hf_uri}})())
    assert model.predict(None, {"prompt": "What is 2 + 3?"}, {"max_new_tokens": 3})  # a dict, one prompt
    with pytest.raises(ValueError, match="'prompt' column"):
        import pandas as pd

        model.predict(None, pd.DataFrame({"text": ["x"]}))
    with pytest.raises(ValueError, match="non-empty list of strings"):
        model.predict(None, [1, 2])
    with pytest.raises(ValueError, match="leaves no room"):
        model.predict(None, ["x"], {"max_new_tokens": 100000})


def _all_artifacts(client, run_id: str, path: str) -> set[str]:
    """Every file under ``path`` in the run's artefacts (list_artifacts lists one level)."""
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= _all_artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out
