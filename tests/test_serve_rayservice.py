"""The RayService's Serve config, deployed for real: each application of ``infra/k8s/base/rayservice.yaml``'s
``serveConfigV2`` is built from its ``import_path`` and ``args`` (what Ray Serve does with a config file) on
a local Ray, with the model reference swapped for a tiny export and CPU-sized resources; the gateway then
answers an OpenAI completion for the config's model name. (``tests/test_infra.py`` checks the config's
shape against Ray Serve's schema; this checks that it serves.)"""

from __future__ import annotations

import importlib
import json
import urllib.request
from pathlib import Path

import pytest
import yaml

from serve_helpers import free_port, make_model_dir

pytestmark = pytest.mark.slow
MANIFEST = Path(__file__).resolve().parent.parent / "infra" / "k8s" / "base" / "rayservice.yaml"


def test_rayservice_serve_config_serves_a_completion(tmp_path):
    from ray import serve

    from moeflow.platform.compute import ensure_ray
    from moeflow.platform.serve import app as serve_app

    config = yaml.safe_load(yaml.safe_load(MANIFEST.read_text())["spec"]["serveConfigV2"])
    export = make_model_dir(tmp_path / "export")
    port = free_port()
    ensure_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for app in config["applications"]:
            args = app["args"]
            if app["import_path"].endswith(":model_app"):  # CPU-sized, and the tiny export for the reference
                args = {**args, "model_dir": str(export), "num_gpus": 0, "num_cpus": 0.5, "num_replicas": 1,
                        "engine": {"max_batch": 4, "prefill_chunk": 32}}
            module, attr = app["import_path"].split(":")
            built = getattr(importlib.import_module(module), attr)(args)
            serve.run(built, name=app["name"], route_prefix=app["route_prefix"])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=60) as resp:
            ids = {m["id"] for m in json.loads(resp.read())["data"]}
        assert {"moeflow-tiny", "moeflow-tiny@production"} <= ids, ids
        body = json.dumps({"model": "moeflow-tiny", "prompt": "def add(a, b):", "max_tokens": 5,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        assert answer["model"] == "moeflow-tiny@production" and answer["usage"]["completion_tokens"] >= 1
    finally:
        serve_app.shutdown()
