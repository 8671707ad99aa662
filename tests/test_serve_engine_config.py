"""``EngineConfig``'s device-decided settings: where the engine steps (``process``: 'auto' = a child process on
CUDA, a thread on the CPU), resolved in one place (``runs_in_child``); booleans of older configs and of YAML 1.1
(``--engine process=on`` parses to True) read as on/off; a typo is refused with the allowed values; and a
``ModelServer`` built with the default config on the CPU steps its engine in a thread of its own process."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from moeflow.platform.recipes import apply_overrides
from moeflow.platform.serve.config import EngineConfig, ServedModel

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.mark.parametrize("device, cuda_available, process, in_child", [
    ("auto", False, "auto", False),   # the CPU: a child costs a second model load and a process start
    ("auto", True, "auto", True),     # CUDA: 1.86x tok/s at 128 streams on an H100 (RESULTS.md)
    ("cpu", True, "auto", False),     # the device chosen, not what the machine has
    ("cuda", False, "auto", True),
    ("cuda:1", False, "auto", True),
    ("cuda", True, "off", False),     # forced either way
    ("cpu", False, "on", True),
    ("auto", True, "off", False),
    ("auto", False, "on", True),
])
def test_where_the_engine_steps_is_decided_by_the_device_unless_forced(monkeypatch, device, cuda_available,
                                                                       process, in_child):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    e = EngineConfig(device=device, process=process)
    assert e.runs_in_child() is in_child
    assert e.resolved_device() == (device if device != "auto" else ("cuda" if cuda_available else "cpu"))


def test_the_default_is_auto_and_booleans_read_as_on_off():
    assert EngineConfig().process == "auto" and EngineConfig().overlap == "auto"
    assert EngineConfig(process=True).process == "on" and EngineConfig(process=False).process == "off"
    # YAML 1.1 (--engine key=value, a serve YAML) reads on/off/true/false as booleans: all land on on/off
    for raw, want in (("on", "on"), ("off", "off"), ("true", "on"), ("false", "off"), ("auto", "auto")):
        assert EngineConfig.model_validate(apply_overrides({}, [f"process={raw}"])).process == want, raw
        assert EngineConfig.model_validate(apply_overrides({}, [f"overlap={raw}"])).overlap == want, raw
    # what a config records is the word, so a re-read config is the same config
    e = EngineConfig(process=True, overlap=False)
    assert e.to_dict()["process"] == "on" and EngineConfig.model_validate(e.to_dict()) == e


@pytest.mark.parametrize("bad", ["of", "yes please", 1, None])
def test_a_wrong_value_is_refused_with_the_allowed_ones(bad):
    with pytest.raises(ValidationError, match=r"process\n.*Input should be 'auto', 'on' or 'off'"):
        EngineConfig(process=bad)


def test_a_default_model_server_on_the_cpu_steps_its_engine_in_a_thread(tmp_path, monkeypatch):
    from serve_helpers import make_model_dir

    from moeflow.platform.serve.engine_loop import AsyncEngine
    from moeflow.platform.serve.model_server import ModelServer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU host runs it as on the CPU
    spec = ServedModel(name="tiny", version="1", model_dir=str(make_model_dir(tmp_path / "m")),
                       engine={"max_batch": 2, "prefill_chunk": 16})
    assert spec.engine.process == "auto" and spec.engine.device == "auto"
    server = ModelServer(spec)
    try:
        assert isinstance(server.loop, AsyncEngine) and server.model is not None
        assert next(server.model.parameters()).device.type == "cpu"
        assert not hasattr(server.loop, "pid")  # no child process
    finally:
        server.close()


@pytest.mark.parametrize("setting, value", [("off", False), ("auto", None), ("on", True)])
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_fused_moe_reaches_the_routed_experts_of_the_loaded_model_but_not_int8_stacks(tmp_path, setting, value,
                                                                                      quantize):
    """``EngineConfig.fused_moe`` (default auto) sets ``RoutedExperts.fused_decode`` on
    every MoE layer of the served model; INT8 stacks keep their per-slot / whole-stack path."""
    from serve_helpers import make_model_dir

    from moeflow.models.moe import RoutedExperts
    from moeflow.models.quant import Int8RoutedExperts
    from moeflow.platform.serve.model_server import load_model

    assert EngineConfig().fused_moe == "auto" and RoutedExperts.fused_decode is None
    spec = ServedModel(name="tiny", version="1", model_dir=str(make_model_dir(tmp_path / "m")),
                       engine={"fused_moe": setting, "quantize": quantize})
    experts = [m for m in load_model(spec).modules() if isinstance(m, RoutedExperts)]
    assert experts
    for m in experts:
        assert m.fused_decode is (False if isinstance(m, Int8RoutedExperts) else value)
    assert all(isinstance(m, Int8RoutedExperts) for m in experts) == (quantize == "int8")
