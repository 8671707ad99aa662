"""The gateway as a real Ray Serve application on loopback: two model versions as their own Serve apps,
the gateway ingress, the route-store actor; driven by the official ``openai`` client.

The default run keeps one test (start-up dominates: ~30 s on 2 cores); the load, replica-kill and
alias-swap-under-load tests are ``slow``.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import openai
import pytest

from moeflow.models.generation import generate
from moeflow.models.hf import import_hf
from moeflow.models.tokenizer import Tokenizer
from moeflow.platform.serve.config import GatewayConfig, ServeConfig, ServedModel

from serve_helpers import free_port, make_model_dir

KEY = "sk-ray-test"


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    from moeflow.platform.serve import app as serve_app

    root = tmp_path_factory.mktemp("ray-serve")
    models = []
    for version, seed in (("1", 0), ("2", 1)):
        d = make_model_dir(root / f"v{version}", seed=seed)
        # version 2's replica steps its engine in a child process (EngineConfig.process): spawned from a Ray actor
        models.append(ServedModel(name="tiny", version=version, model_dir=str(d), num_cpus=0.5,
                                  engine={"max_batch": 8, "prefill_chunk": 32, "process": version == "2"}))
    config = ServeConfig(models=models, aliases={"tiny": {"champion": "1", "candidate": "2"}},
                         gateway=GatewayConfig(port=free_port(), max_tokens_cap=128, first_token_timeout_s=60,
                                               stall_timeout_s=10))
    handle = serve_app.start(config, api_keys=[KEY])
    yield {"handle": handle, "models": models}
    serve_app.shutdown()


@pytest.fixture
def client(serving):
    return openai.OpenAI(base_url=serving["handle"].url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _reference(spec: ServedModel, text: str, n: int):
    model = import_hf(spec.model_dir, include_mtp=False).eval()
    tok = Tokenizer.from_file(f"{spec.model_dir}/tokenizer.json")
    ids = tok.encode(text, add_bos=True)
    return tok.decode(generate(model, [ids], n, stop_token_ids=[tok.eos_id]).tokens[0])


def test_ray_serve_gateway_end_to_end(serving, client):
    v1, v2 = serving["models"]
    # greedy, non-streamed and streamed, equals generate() on the same model
    ref = _reference(v1, "def add(a, b):", 20)
    out = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=20, temperature=0)
    assert out.choices[0].text == ref and out.model == "tiny@1"
    chunks = list(client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    chat = list(client.chat.completions.create(model="tiny@2", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[0].model == "tiny@2"
    # version 2's replica serves from its engine's child process (its stats name the child), version 1 from a thread
    from ray import serve

    from moeflow.platform.serve.app import app_name

    info = {v: serve.get_app_handle(app_name("tiny", v)).info.remote().result(timeout_s=60) for v in ("1", "2")}
    assert info["2"]["pid"] > 0 and info["2"]["restarts"] == 0 and "pid" not in info["1"]
    # routing, auth, errors through the Ray proxy
    assert {"tiny", "tiny@champion", "tiny@1", "tiny@2"} <= {m.id for m in client.models.list().data}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=serving["handle"].url + "/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1000)
    # moving the alias: a stream in flight stays on v1, new requests go to v2
    stream = client.completions.create(model="tiny", prompt="for i in", max_tokens=40, stream=True)
    assert next(stream).model == "tiny@1"
    serving["handle"].move_alias("tiny", "champion", "2")
    try:
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).model == "tiny@2"
        assert _reference(v2, "x", 2) == client.completions.create(model="tiny", prompt="x", max_tokens=2,
                                                                    temperature=0).choices[0].text
        rest = list(stream)
        assert rest and all(c.model == "tiny@1" for c in rest) and rest[-1].choices[0].finish_reason
    finally:
        serving["handle"].move_alias("tiny", "champion", "1")


# ---------------------------------------------------------------- slow: load, failures
async def _load(url: str, num_streams: int, max_tokens: int, model: str = "tiny", seconds: float = 90.0,
                started: asyncio.Event | None = None):
    """N concurrent streaming clients; every request must end complete or with a clear error."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=seconds)
    results = []

    async def one(i: int):
        t0 = time.perf_counter()
        ttft, n, reason, err, models = None, 0, None, None, set()
        try:
            stream = await client.completions.create(model=model, prompt=f"request {i}:", max_tokens=max_tokens,
                                                     stream=True, temperature=1.0, seed=i)
            async for c in stream:
                models.add(c.model)
                if c.choices and c.choices[0].text and ttft is None:
                    ttft = time.perf_counter() - t0
                    if started is not None:
                        started.set()
                if c.choices:
                    n += 1
                    reason = c.choices[0].finish_reason or reason
        except openai.APIError as e:
            err = type(e).__name__
        results.append({"e2e": time.perf_counter() - t0, "ttft": ttft, "chunks": n, "reason": reason,
                        "error": err, "models": models})

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(num_streams))), seconds)
    await client.close()
    return results


def _pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


@pytest.mark.slow
def test_load_many_concurrent_streams_nothing_hangs(serving):
    res = asyncio.run(_load(serving["handle"].url, num_streams=24, max_tokens=24))
    assert len(res) == 24
    assert all(r["error"] is None and r["reason"] in ("stop", "length") for r in res), res
    e2e = [r["e2e"] for r in res]
    print(f"\n24 streams: e2e p50 {_pct(e2e, .5):.2f} s p99 {_pct(e2e, .99):.2f} s; "
          f"ttft p50 {_pct([r['ttft'] for r in res], .5):.2f} s p99 {_pct([r['ttft'] for r in res], .99):.2f} s")


@pytest.mark.slow
def test_alias_swap_under_load_loses_no_request(serving):
    async def run():
        load = asyncio.create_task(_load(serving["handle"].url, num_streams=16, max_tokens=24))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(serving["handle"].move_alias, "tiny", "champion", "2")
        return await load

    try:
        res = asyncio.run(run())
    finally:
        serving["handle"].move_alias("tiny", "champion", "1")
    assert all(r["error"] is None and r["reason"] for r in res), res
    assert all(len(r["models"]) == 1 for r in res), "a request never changes version mid-stream"


@pytest.mark.slow
def test_killed_replica_gives_clean_errors_and_serving_recovers(serving, client):
    import ray

    from moeflow.platform.serve.app import app_name

    async def run():
        started = asyncio.Event()
        load = asyncio.create_task(_load(serving["handle"].url, num_streams=8, max_tokens=110, model="tiny@2",
                                         started=started))
        await asyncio.wait_for(started.wait(), 60)  # kill while streams are mid-way
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if "ModelServer" in a["name"] and app_name("tiny", "2") in a["name"]]
        assert actors, "the replica actor of v2 must be found"
        ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=False)
        return await load

    res = asyncio.run(run())
    assert all(r["error"] is not None or r["reason"] in ("stop", "length") for r in res), res
    # a 503 before the stream started, or the SSE error event (openai raises APIError) after
    assert all(r["error"] in (None, "InternalServerError", "APIError") for r in res), res
    assert any(r["error"] for r in res), "the kill should have hit requests in flight"
    deadline = time.time() + 90
    while True:
        try:
            if client.completions.create(model="tiny@2", prompt="x", max_tokens=2).choices:
                break
        except openai.APIError:
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.mark.slow
def test_promotion_hot_swaps_a_new_version_into_the_running_gateway(serving, client, tmp_path):
    from moeflow.platform.serve import app as serve_app

    d = make_model_dir(tmp_path / "v3", seed=3)
    said = serve_app.sync_alias("tiny", "champion", "3", str(d), template=serving["models"][0])
    try:
        assert "version 3" in said
        out = client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
        assert out.model == "tiny@3"
        v3 = ServedModel(name="tiny", version="3", model_dir=str(d))
        assert out.choices[0].text == _reference(v3, "x", 3)
    finally:
        serving["handle"].move_alias("tiny", "champion", "1")


@pytest.mark.slow
def test_a_replica_whose_engine_cannot_restart_is_replaced_by_serve(serving, client):
    """Version 2 steps its engine in a child process. Kill the child while its model cannot be loaded (the export
    folder moved away): the replica cannot restart it, answers ``engine_failed`` at once, and fails its health check;
    Ray Serve replaces the replica, which, with the folder back, serves again."""
    import os
    import signal
    from pathlib import Path

    from ray import serve

    from moeflow.platform.serve.app import app_name

    handle = serve.get_app_handle(app_name("tiny", "2"))
    pid = handle.info.remote().result(timeout_s=60)["pid"]
    model_dir = Path(serving["models"][1].model_dir)
    hidden = model_dir.with_name(model_dir.name + ".hidden")
    model_dir.rename(hidden)
    try:
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 60
        while True:  # the replica gives up restarting its child: requests fail at once, not after a timeout
            try:
                client.completions.create(model="tiny@2", prompt="x", max_tokens=2)
            except openai.APIError as err:
                if "cannot start" in str(err):
                    break
            assert time.time() < deadline, "the replica should report that its engine cannot start"
            time.sleep(0.5)
    finally:
        hidden.rename(model_dir)
    deadline = time.time() + 120
    while True:  # the health check fails, Serve starts a new replica, which loads the model again
        try:
            out = client.completions.create(model="tiny@2", prompt="x", max_tokens=2, temperature=0)
            break
        except openai.APIError:
            assert time.time() < deadline, "Serve should have replaced the unhealthy replica"
            time.sleep(1)
    assert out.choices[0].text == _reference(serving["models"][1], "x", 2)
    assert handle.info.remote().result(timeout_s=60)["pid"] != pid
