"""The engine in a child process (``EngineConfig.process``, platform/serve/engine_proc.py), real processes:
through ``ModelServer`` and the gateway greedy output equals ``generate``, stop strings and log-probs work, a
client that leaves frees its slot, a child killed mid-stream fails its requests cleanly and is restarted; with
a scripted engine (no model): a failing step, checks at ``open``, the overload bound, cancellation and close."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from moeflow.models.generation import generate
from moeflow.models.serving import EngineOverloaded, RequestError, SamplingParams
from moeflow.platform.serve.config import GatewayConfig, ServedModel
from moeflow.platform.serve.engine_loop import EngineFailed
from moeflow.platform.serve.engine_proc import ProcessEngine
from moeflow.platform.serve.gateway import Gateway, LocalBackend, create_app, hash_key
from moeflow.platform.serve.model_server import ModelServer, load_model
from moeflow.platform.serve.routing import LocalRouteStore, RouteTable

from serve_helpers import LoopbackServer, ScriptedEngine, make_model_dir, scripted_engine_setup

KEY = "sk-test-key-123"
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _children() -> set[int]:
    """Pids of this process's children, zombies included (a child not reaped yet is still listed); /proc, as the
    GPU image may lack psutil."""
    out = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            out.update(int(k) for k in (task / "children").read_text().split())
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory, one_cpu_thread):
    d = make_model_dir(tmp_path_factory.mktemp("proc") / "v1")
    spec = ServedModel(name="tiny", version="1", model_dir=str(d),
                       engine={"max_batch": 4, "prefill_chunk": 16, "process": True})
    server = ModelServer(spec)
    table = RouteTable(versions={"tiny": ["1"]}, aliases={"tiny": {"champion": "1"}})
    config = GatewayConfig(max_tokens_cap=100, n_cap=4, max_body_bytes=64 * 1024, max_inflight=16)
    gw = Gateway(config, LocalRouteStore(table), LocalBackend({spec.key: server}), {hash_key(KEY)})
    with LoopbackServer(create_app(gw)) as srv:
        # the reference model, loaded here: the server process holds none
        yield {"url": srv.url, "server": server, "model": load_model(spec), "gw": gw}
    pid = server.loop.pid
    server.close()
    assert pid not in _children()


@pytest.fixture
def client(stack):
    import openai  # here, not at the top: the GPU image runs this file's gpu test and may lack the client

    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _reference(stack, ids: list[int], n: int) -> list[int]:
    return generate(stack["model"], [ids], n, stop_token_ids=[stack["server"].tokenizer.eos_id]).tokens[0]


# ---------------------------------------------------------------- through the model server and the gateway
def test_the_server_process_holds_no_model_and_the_child_does(stack):
    server = stack["server"]
    assert server.model is None and server.loop.pid != os.getpid() and server.loop.pid in _children()
    info = server.info()
    assert info["context_len"] == 128 and info["pid"] == server.loop.pid


def test_greedy_completion_equals_generate_streamed_and_not(stack, client):
    tok = stack["server"].tokenizer
    ids = tok.encode("def add(a, b):", add_bos=True)
    ref = _reference(stack, ids, 24)
    # a neighbour request runs alongside in the same engine
    other = threading.Thread(target=lambda: client.completions.create(model="tiny", prompt="for i in", max_tokens=30,
                                                                      temperature=0))
    other.start()
    out = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=24, temperature=0)
    other.join()
    assert out.choices[0].text == tok.decode(ref)
    assert out.usage.completion_tokens == len(ref) and out.usage.prompt_tokens == len(ids)
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == tok.decode(ref)
    assert chunks[-1].usage.completion_tokens == len(ref)


def test_stop_strings_and_logprobs(stack, client):
    full = client.completions.create(model="tiny", prompt="import", max_tokens=16, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="tiny", prompt="import", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"

    tok = stack["server"].tokenizer
    ids = tok.encode("the quick brown fox", add_bos=True)
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=3, echo=True, logprobs=2, temperature=0)
    lp = out.choices[0].logprobs
    gen = _reference(stack, ids, 3)
    with torch.no_grad():
        ref = torch.log_softmax(stack["model"](torch.tensor([ids + gen])).logits[0].float(), -1)
    seq = ids + gen
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(seq)
    for i in range(1, len(seq)):  # prompt and generated tokens alike
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, seq[i]]), abs=1e-4)
    assert all(len(t) == 2 for t in lp.top_logprobs[len(ids):])


def test_a_client_that_disconnects_frees_its_slot(stack):
    loop = stack["server"].loop
    body = {"model": "tiny", "prompt": "def", "max_tokens": 100, "stream": True, "temperature": 1.0, "seed": 1,
            "stop": []}
    import httpx

    with httpx.stream("POST", stack["url"] + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        it = r.iter_lines()
        next(it)
        assert loop.stats()["running"] == 1
        steps = loop.stats()["steps"]
    deadline = time.time() + 10
    while loop.stats()["running"] and time.time() < deadline:
        time.sleep(0.02)
    # cancelled at once, not finished 100 tokens later (a cancel that never reached the child)
    assert loop.stats()["running"] == 0 and loop.stats()["steps"] - steps < 60
    assert stack["gw"].inflight == 0


def test_a_generate_closed_at_accepted_leaves_the_engine(stack):
    """The gateway closes a replica stream right after "accepted" when the client left (or a sibling choice
    failed): the request must leave the engine then, not run to max_tokens in a slot nobody reads."""
    server = stack["server"]

    async def run():
        agen = server.generate({"prompt": "def", "params": {"max_tokens": 100, "temperature": 1.0, "seed": 2}})
        assert (await agen.__anext__())["kind"] == "accepted"
        # until the child has run a step of it (polled: a fixed 0.2 s sleep let the 100 tokens finish first when
        # a loaded machine kept this process from waking up in time)
        steps0, deadline = server.loop.stats()["steps"], time.time() + 5
        while server.loop.stats()["steps"] == steps0 and time.time() < deadline:
            await asyncio.sleep(0.005)
        assert server.loop.stats()["running"] + server.loop.stats()["waiting"] == 1
        steps = server.loop.stats()["steps"]
        await agen.aclose()
        deadline = time.time() + 10
        while server.loop.stats()["running"] and time.time() < deadline:
            await asyncio.sleep(0.02)
        return steps

    steps = asyncio.run(run())
    assert server.loop.stats()["running"] == 0 and server.loop.stats()["steps"] - steps < 60


def test_a_killed_child_fails_its_streams_then_a_new_one_serves(stack):
    server = stack["server"]
    old = server.loop.pid
    tok = server.tokenizer
    ids = tok.encode("for i in", add_bos=True)

    async def one(started: asyncio.Event, prompt):
        out = []
        async for ev in server.generate({"prompt": prompt, "params": {"max_tokens": 100, "temperature": 1.0,
                                                                      "seed": 3}}):
            out.append(ev)
            if ev["kind"] == "token":
                started.set()
        return out

    async def run():
        flags = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.create_task(one(f, ids)) for f in flags]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 30)
        os.kill(old, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)

    for events in asyncio.run(run()):
        assert events[-1]["kind"] == "error" and events[-1]["code"] == "engine_failed", events[-1]
        assert "died" in events[-1]["message"]
    # the next request waits for the new child, then is served as before
    ref = _reference(stack, ids, 12)

    async def again():
        return [ev async for ev in server.generate({"prompt": ids, "params": {"max_tokens": 12, "temperature": 0}})]

    events = asyncio.run(asyncio.wait_for(again(), 60))
    assert [t for ev in events if ev["kind"] == "token" for t in ev["token_ids"]] == ref
    assert server.loop.pid != old and server.loop.num_restarts == 1
    assert old not in _children()  # reaped, no zombie


# ---------------------------------------------------------------- the scripted engine (no model)
@pytest.fixture(scope="module")
def scripted():
    engine = ProcessEngine(functools.partial(scripted_engine_setup, 0.02, 2), max_batch=2, max_waiting=2)
    yield engine
    engine.close()


async def _collect(events) -> list:
    return [ev for batch in [b async for b in events] for ev in batch]


def test_scripted_events_reach_their_streams(scripted):
    async def run():
        a = scripted.open([100], SamplingParams(max_tokens=5))
        b = scripted.open([200], SamplingParams(max_tokens=3))
        return await asyncio.wait_for(asyncio.gather(_collect(a), _collect(b)), 30)

    a, b = asyncio.run(run())
    assert [ev.token_id for ev in a] == [101, 102, 103, 104, 105] and a[-1].finish_reason == "length"
    assert [ev.token_id for ev in b] == [201, 202, 203] and [ev.num_generated for ev in b] == [1, 2, 3]


def test_requests_are_checked_and_bounded_at_open(scripted):
    async def run():
        with pytest.raises(RequestError):
            scripted.open([], SamplingParams())
        with pytest.raises(RequestError):
            scripted.open([5000], SamplingParams())  # outside the vocabulary the child reported
        with pytest.raises(RequestError):
            scripted.open([1], SamplingParams(stop=("x",)))  # no decode function in the child
        streams = [scripted.open([i], SamplingParams(max_tokens=10_000)) for i in range(4)]  # 2 slots + 2 waiting
        with pytest.raises(EngineOverloaded):
            scripted.open([9], SamplingParams(max_tokens=1))
        for i, s in enumerate(streams):  # leaving cancels them in the child; only then is there room again
            first = await asyncio.wait_for(s.__anext__(), 10)  # (a stream never started has nothing to leave)
            assert first[0].token_id == i + 1
            await s.aclose()
        deadline = time.time() + 10
        while True:
            try:
                return await asyncio.wait_for(_collect(scripted.open([9], SamplingParams(max_tokens=2))), 10)
            except EngineOverloaded:
                assert time.time() < deadline, "the cancelled requests were never freed"
                await asyncio.sleep(0.05)

    assert [ev.token_id for ev in asyncio.run(run())] == [10, 11]
    assert scripted.stats()["running"] == 0


def test_a_cancelled_request_leaves_the_child_engine(scripted):
    async def run():
        events = scripted.open([50], SamplingParams(max_tokens=10_000))  # 200 s unless cancelled
        await asyncio.wait_for(events.__anext__(), 10)
        assert scripted.stats()["running"] == 1
        await events.aclose()
        deadline = time.time() + 10
        while scripted.stats()["running"] and time.time() < deadline:
            await asyncio.sleep(0.02)

    asyncio.run(run())
    assert scripted.stats()["running"] == 0


@pytest.mark.parametrize("engine", ["thread", "process"])
def test_a_request_left_before_its_first_event_is_cancelled(scripted, engine):
    """Closed or dropped before its first ``__anext__`` (an async generator would never run its cleanup then)."""
    from moeflow.platform.serve.engine_loop import AsyncEngine

    loop = scripted if engine == "process" else AsyncEngine(lambda: ScriptedEngine(0.02, 2))

    async def run():
        closed = loop.open([30], SamplingParams(max_tokens=10_000))
        dropped = loop.open([40], SamplingParams(max_tokens=10_000))
        await asyncio.sleep(0.1)  # both running now: 2 slots
        closed.close()
        del dropped
        deadline = time.time() + 10
        while loop.stats()["running"] and time.time() < deadline:
            await asyncio.sleep(0.02)
        assert loop.stats()["running"] == 0
        return await asyncio.wait_for(_collect(loop.open([1], SamplingParams(max_tokens=2))), 10)

    try:
        assert [ev.token_id for ev in asyncio.run(run())] == [2, 3]
    finally:
        if engine == "thread":
            loop.close()


def test_a_failing_step_fails_its_requests_and_the_child_rebuilds_its_engine(scripted):
    pid = scripted.pid

    async def run():
        good = scripted.open([60], SamplingParams(max_tokens=10_000))
        await asyncio.wait_for(good.__anext__(), 10)
        bad = scripted.open([ScriptedEngine.POISON], SamplingParams(max_tokens=5))
        for events in (good, bad):
            with pytest.raises(EngineFailed, match="poisoned"):
                await asyncio.wait_for(_collect(events), 10)
        return await asyncio.wait_for(_collect(scripted.open([70], SamplingParams(max_tokens=2))), 10)

    assert [ev.token_id for ev in asyncio.run(run())] == [71, 72]
    assert scripted.pid == pid and scripted.num_restarts == 0


def test_close_fails_what_is_in_flight_and_leaves_no_child():
    engine = ProcessEngine(functools.partial(scripted_engine_setup, 0.02, 2), max_batch=2, max_waiting=2)
    pid = engine.pid
    assert pid in _children()

    async def run():
        events = engine.open([1], SamplingParams(max_tokens=10_000))
        await asyncio.wait_for(events.__anext__(), 10)
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        with pytest.raises(EngineFailed, match="closed"):
            await asyncio.wait_for(_collect(events), 10)

    asyncio.run(run())
    assert pid not in _children() and not engine._reader.is_alive()


# ---------------------------------------------------------------- an engine that cannot come back
def _check_health(loop) -> None:
    from types import SimpleNamespace

    ModelServer.check_health(SimpleNamespace(loop=loop, spec=SimpleNamespace(key="tiny@1")))


def test_a_thread_engine_that_cannot_be_rebuilt_refuses_and_fails_its_health_check():
    """A failed step whose rebuild fails too: the requests in flight fail, later ones are refused at once (not
    left to hang on a thread that is gone), and the replica's health check raises so Ray Serve replaces it."""
    from moeflow.platform.serve.engine_loop import AsyncEngine

    made = []

    def make():
        if made:
            raise RuntimeError("cannot load the model (test)")
        made.append(ScriptedEngine(0.02, 2))
        return made[-1]

    loop = AsyncEngine(make)
    try:
        _check_health(loop)  # healthy

        async def run():
            good = loop.open([60], SamplingParams(max_tokens=10_000))
            await asyncio.wait_for(good.__anext__(), 10)
            bad = loop.open([ScriptedEngine.POISON], SamplingParams(max_tokens=5))
            for events in (good, bad):
                with pytest.raises(EngineFailed, match="poisoned"):
                    await asyncio.wait_for(_collect(events), 10)
            deadline = time.time() + 10
            while loop.problem() is None and time.time() < deadline:
                await asyncio.sleep(0.02)
            with pytest.raises(EngineFailed, match="cannot be rebuilt"):
                loop.open([1], SamplingParams(max_tokens=2))

        asyncio.run(run())
        with pytest.raises(RuntimeError, match="tiny@1: the engine cannot be rebuilt"):
            _check_health(loop)
    finally:
        loop.close()


def test_a_process_engine_whose_child_cannot_restart_fails_its_health_check(tmp_path):
    from serve_helpers import scripted_engine_setup_once

    engine = ProcessEngine(functools.partial(scripted_engine_setup_once, 0.02, 2, str(tmp_path / "started")),
                           max_batch=2, max_waiting=2)
    try:
        _check_health(engine)
        os.kill(engine.pid, signal.SIGKILL)
        deadline = time.time() + 30
        while engine.problem() is None and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="cannot start"):
            _check_health(engine)

        async def refused():
            return engine.open([1], SamplingParams(max_tokens=2))

        with pytest.raises(EngineFailed, match="cannot start"):
            asyncio.run(refused())
    finally:
        engine.close()


def test_a_child_in_a_crash_loop_is_not_restarted_again_and_the_health_check_fails():
    """More deaths than max_restarts within the window: no new child (each would reload the model and fail
    what it held); the engine refuses requests and fails its health check, so Ray Serve replaces the replica."""
    engine = ProcessEngine(functools.partial(scripted_engine_setup, 0.02, 2), max_batch=2, max_waiting=2,
                           max_restarts=1, restart_window_s=120.0)
    try:
        first = engine.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.time() + 30
        while (engine.pid == first or engine.num_restarts < 1) and time.time() < deadline:
            time.sleep(0.05)
        assert engine.num_restarts == 1 and engine.problem() is None  # one restart is within the budget
        _check_health(engine)
        os.kill(engine.pid, signal.SIGKILL)
        while engine.problem() is None and time.time() < deadline:
            time.sleep(0.05)
        assert "died 2 times within 120 s" in engine.problem() and engine.num_restarts == 1
        with pytest.raises(RuntimeError, match="not restarting"):
            _check_health(engine)
    finally:
        engine.close()
    assert first not in _children()


# ---------------------------------------------------------------- GPU: CUDA in the spawned child
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_process_engine_serves_generate_greedy_output_on_the_gpu(tmp_path):
    """bf16 on CUDA, graph decode with overlap (CUDA's defaults), the model in the child: greedy == generate."""
    d = make_model_dir(tmp_path / "m")
    spec = ServedModel(name="tiny", version="1", model_dir=str(d),
                       engine={"max_batch": 4, "prefill_chunk": 16, "process": True, "dtype": "bfloat16",
                               "device": "cuda"})
    server = ModelServer(spec)
    try:
        assert server.model is None and server.loop.info["decode_mode"] == "graph" and server.loop.info["overlap"]
        model = load_model(spec)
        tok = server.tokenizer
        prompts = [tok.encode(t, add_bos=True) for t in ("def add(a, b):", "for i in", "the quick", "x")]

        async def one(ids):
            return [t async for ev in server.generate({"prompt": ids, "params": {"max_tokens": 40, "temperature": 0}})
                    if ev["kind"] == "token" for t in ev["token_ids"]]

        async def run():
            return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 120)

        for ids, got in zip(prompts, asyncio.run(run())):
            assert got == generate(model, [ids], 40, stop_token_ids=[tok.eos_id]).tokens[0]
    finally:
        pid = server.loop.pid
        server.close()
    assert pid not in _children()
