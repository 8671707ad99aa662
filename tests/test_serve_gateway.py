"""The OpenAI-compatible gateway in process (uvicorn on loopback, two model versions), driven by
the official ``openai`` client and raw HTTP: greedy output equals ``generate``, streaming format,
errors are the right 4xx, routing by name/alias/version, sticky A/B, alias moves, cancellation."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from moeflow.models.chat import prompt_ids as chat_prompt_ids, stop_ids as chat_stop_ids
from moeflow.models.generation import generate
from moeflow.platform.serve.config import GatewayConfig, ServedModel
from moeflow.platform.serve.gateway import Gateway, LocalBackend, create_app, hash_key
from moeflow.platform.serve.model_server import ModelServer
from moeflow.platform.serve.routing import Arm, LocalRouteStore, RouteTable

from serve_helpers import LoopbackServer, make_model_dir

KEY = "sk-test-key-123"
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, one_cpu_thread):
    root = tmp_path_factory.mktemp("serve")
    servers = {}
    for version, seed in (("1", 0), ("2", 1)):
        d = make_model_dir(root / f"v{version}", seed=seed)
        # version 2 runs the engine's overlap (CUDA's default) on the CPU: the same answers, one step later. The CPU
        # and the in-process engine also on a GPU machine: the tests read server.model and server.loop.engine
        spec = ServedModel(name="tiny", version=version, model_dir=str(d),
                           engine={"max_batch": 4, "prefill_chunk": 16, "overlap": "on" if version == "2" else "auto",
                                   "device": "cpu", "process": "off"})
        servers[spec.key] = ModelServer(spec)
    table = RouteTable(versions={"tiny": ["1", "2"]}, aliases={"tiny": {"champion": "1", "candidate": "2"}})
    store = LocalRouteStore(table)
    config = GatewayConfig(max_tokens_cap=64, n_cap=4, max_body_bytes=64 * 1024, max_inflight=16)
    gw = Gateway(config, store, LocalBackend(servers), {hash_key(KEY)})
    with LoopbackServer(create_app(gw)) as srv:
        yield {"url": srv.url, "servers": servers, "store": store, "gw": gw, "table": table}
    for s in servers.values():
        s.close()


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _server(stack, version="1") -> ModelServer:
    return stack["servers"][f"tiny@{version}"]


def _reference(server: ModelServer, ids: list[int], n: int, stops) -> list[int]:
    return generate(server.model, [ids], n, stop_token_ids=stops).tokens[0]


def _set_table(stack, table):
    stack["store"].table = table


# ---------------------------------------------------------------- correctness
def test_greedy_completion_equals_generate_streamed_and_not(stack, client):
    srv = _server(stack)
    tok = srv.tokenizer
    prompt = "def add(a, b):"
    ids = tok.encode(prompt, add_bos=True)
    ref = _reference(srv, ids, 24, [tok.eos_id])
    ref_text = tok.decode(ref)
    # a neighbour request runs alongside in the same engine
    other = threading.Thread(target=lambda: client.completions.create(model="tiny", prompt="for i in", max_tokens=30,
                                                                      temperature=0))
    other.start()
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    other.join()
    assert out.choices[0].text == ref_text
    assert out.usage.completion_tokens == len(ref) and out.usage.prompt_tokens == len(ids)
    assert out.model == "tiny@1" and out.object == "text_completion"
    assert out.choices[0].finish_reason == ("stop" if ref[-1] == tok.eos_id else "length")
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref_text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref)


def test_overlapped_engine_serves_generate_greedy_output_streamed_and_not(stack, client):
    srv = _server(stack, "2")
    assert srv.loop.engine.overlap and not _server(stack, "1").loop.engine.overlap
    tok = srv.tokenizer
    ids = tok.encode("for i in range(", add_bos=True)
    ref = _reference(srv, ids, 20, [tok.eos_id])
    other = threading.Thread(target=lambda: client.completions.create(model="tiny@2", prompt="x = ", max_tokens=9,
                                                                      temperature=0))
    other.start()
    out = client.completions.create(model="tiny@2", prompt=ids, max_tokens=20, temperature=0)
    other.join()
    assert out.model == "tiny@2" and out.choices[0].text == tok.decode(ref)
    assert out.usage.completion_tokens == len(ref)
    chunks = list(client.completions.create(model="tiny@2", prompt=ids, max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == tok.decode(ref)


def test_chat_completion_uses_the_chat_template_streamed_and_not(stack, client):
    srv = _server(stack)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ids = chat_prompt_ids(srv.tokenizer, messages)
    ref = _reference(srv, ids, 20, chat_stop_ids(srv.tokenizer))
    out = client.chat.completions.create(model="tiny@champion", messages=messages, max_tokens=20, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == srv.tokenizer.decode(ref)
    assert out.object == "chat.completion" and out.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == srv.tokenizer.decode(ref)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [out.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == len(ids) + len(ref)


def test_raw_sse_ends_with_done(stack):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert all(l.startswith("data: ") for l in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_echo_logprobs_score_the_prompt_like_lm_eval(stack, client):
    """lm-eval local-completions: echo=True, logprobs=1, max_tokens=0 -> prompt log-likelihoods."""
    srv = _server(stack)
    ids = srv.tokenizer.encode("the quick brown fox", add_bos=True)
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    with torch.no_grad():
        ref = torch.log_softmax(srv.model(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
    assert out.choices[0].text == srv.tokenizer.decode(ids)
    gen = client.completions.create(model="tiny", prompt=ids, max_tokens=3, echo=True, logprobs=2, temperature=0)
    assert len(gen.choices[0].logprobs.tokens) == len(ids) + 3
    assert all(len(t) == 2 for t in gen.choices[0].logprobs.top_logprobs[len(ids):])


def test_n_seed_and_stop(stack, client):
    a = client.completions.create(model="tiny", prompt="import", max_tokens=12, n=3, seed=7, temperature=1.0)
    b = client.completions.create(model="tiny", prompt="import", max_tokens=12, n=3, seed=7, temperature=1.0)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1, "each choice has its own seed"
    full = client.completions.create(model="tiny", prompt="import", max_tokens=16, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="tiny", prompt="import", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- errors
def _post(stack, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(stack["url"] + path, content=raw, headers=headers, timeout=30)
    return httpx.post(stack["url"] + path, json=body, headers=headers, timeout=30)


def test_auth_is_required_and_keys_never_leak(stack):
    for key in (None, "wrong"):
        r = _post(stack, "/v1/completions", {"model": "tiny", "prompt": "x"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack["url"] + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(stack["url"] + "/health").json() == {"status": "ok"}
    assert KEY not in httpx.get(stack["url"] + "/metrics").text


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "tiny@9", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "abc"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "n": 5}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": [1] * 120, "max_tokens": 20}, 400, None),   # context is 128
    ({"model": "tiny", "prompt": [1, 99999]}, 400, None),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"prompt": "x"}, 400, "model"),
])
def test_bad_completion_requests_get_openai_errors(stack, body, status, param):
    r = _post(stack, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    if body.get("prompt") == [1] * 120:
        assert "maximum context length is 128" in err["message"]


def test_malformed_json_oversized_body_and_bad_messages(stack):
    assert _post(stack, "/v1/completions", None, raw=b"{not json").status_code == 400
    assert _post(stack, "/v1/completions", None, raw=b"[1, 2]").status_code == 400
    big = {"model": "tiny", "prompt": "x" * (70 * 1024)}
    assert _post(stack, "/v1/completions", big).status_code == 413
    r = _post(stack, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["param"]
    r = _post(stack, "/v1/chat/completions", {"model": "tiny", "messages": []})
    assert r.status_code == 400
    r = _post(stack, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                              "stream": True, "max_tokens": 10_000})
    assert r.status_code == 400


# ---------------------------------------------------------------- routing
def test_models_list_and_routing_by_alias_and_version(stack, client):
    ids = {m.id for m in client.models.list().data}
    assert {"tiny", "tiny@champion", "tiny@candidate", "tiny@1", "tiny@2"} <= ids
    for model, version in (("tiny", "1"), ("tiny@candidate", "2"), ("tiny@2", "2"), ("models:/tiny@champion", "1"),
                           ("models:/tiny/2", "2")):
        out = client.completions.create(model=model, prompt="x", max_tokens=1)
        assert out.model == f"tiny@{version}", model


def test_ab_split_is_sticky_per_user_and_counted_per_version(stack, client):
    table = stack["table"]
    _set_table(stack, table.with_split("tiny", [Arm(target="champion", weight=0.5),
                                                Arm(target="candidate", weight=0.5)]))
    try:
        seen = {}
        for u in range(16):
            for _ in range(2):
                v = client.completions.create(model="tiny", prompt="x", max_tokens=1, user=f"user-{u}").model
                assert seen.setdefault(u, v) == v, "a user keeps their arm"
        assert set(seen.values()) == {"tiny@1", "tiny@2"}
    finally:
        _set_table(stack, table)
    text = httpx.get(stack["url"] + "/metrics").text
    assert 'moeflow_serve_routed_requests_total{model="tiny",version="2",via="split:candidate"}' in text
    assert 'moeflow_serve_time_to_first_token_seconds_count{model="tiny",replica="local",version="2"}' in text
    assert 'finish_reason="length"' in text


def test_moving_the_alias_keeps_the_stream_in_flight(stack, client):
    table = stack["table"]
    stream = client.completions.create(model="tiny", prompt="for i in", max_tokens=40, temperature=0, stream=True,
                                       stop=[])
    first = next(stream)
    assert first.model == "tiny@1"
    _set_table(stack, table.with_alias("tiny", "champion", "2"))
    try:
        assert client.completions.create(model="tiny", prompt="x", max_tokens=1).model == "tiny@2"
        rest = list(stream)
        assert all(c.model == "tiny@1" for c in rest)
        assert rest[-1].choices[0].finish_reason is not None
    finally:
        _set_table(stack, table)


# ---------------------------------------------------------------- overload, disconnects
def test_a_client_that_disconnects_frees_its_slot(stack):
    srv = _server(stack)
    body = {"model": "tiny", "prompt": "def", "max_tokens": 60, "stream": True, "temperature": 1.0}
    with httpx.stream("POST", stack["url"] + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        it = r.iter_lines()
        next(it)
        assert srv.loop.engine.num_running() == 1
    deadline = time.time() + 10
    while srv.loop.engine.num_running() and time.time() < deadline:
        time.sleep(0.05)
    assert srv.loop.engine.num_running() == 0 and srv.loop.engine.slots.num_live() == 0


def test_overload_answers_429(stack, client):
    gw = stack["gw"]
    old = gw.config
    gw.config = old.model_copy(update={"max_inflight": 1})
    try:
        stream = client.completions.create(model="tiny", prompt="x", max_tokens=30, stream=True)
        next(stream)  # one request in flight: the limit is reached
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="tiny", prompt="x", max_tokens=1)
        assert err.value.body["code"] == "overloaded"
        list(stream)
    finally:
        gw.config = old
    assert gw.inflight == 0
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1).choices


def test_the_gateway_logprob_cap_is_the_engines():
    from moeflow.models.serving.engine import MAX_LOGPROBS
    from moeflow.platform.serve import protocol

    assert protocol.MAX_LOGPROBS == MAX_LOGPROBS


def test_bounded_load_of_concurrent_streams_all_complete(stack):
    """The fast twin of test_serve_ray's load test: 12 concurrent streams, bounded time, nothing hangs."""

    async def run():
        client = openai.AsyncOpenAI(base_url=stack["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)

        async def one(i):
            t0, first, reason = time.perf_counter(), None, None
            stream = await client.completions.create(model="tiny", prompt=f"r{i}", max_tokens=16, stream=True,
                                                     seed=i)
            async for c in stream:
                if c.choices and first is None:
                    first = time.perf_counter() - t0
                if c.choices and c.choices[0].finish_reason:
                    reason = c.choices[0].finish_reason
            return first, time.perf_counter() - t0, reason

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(12))), 60)
        finally:
            await client.close()

    res = asyncio.run(run())
    assert all(r[2] in ("stop", "length") for r in res)
    e2e = sorted(r[1] for r in res)
    print(f"\n12 streams in process: e2e p50 {e2e[6]:.2f} s, p99 {e2e[-1]:.2f} s")
    assert stack["gw"].inflight == 0


def test_lm_eval_local_completions_scores_through_the_gateway(stack, monkeypatch):
    """lm-eval's ``local-completions`` model (HF tokenizer from the export) against the gateway:
    its log-likelihoods equal a full forward of the model, its greedy generations equal generate()."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    srv = _server(stack)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    lm = LocalCompletionsAPI(base_url=stack["url"] + "/v1/completions", model="tiny", tokenizer_backend="huggingface",
                             tokenizer=srv.spec.model_dir, num_concurrent=1, max_retries=1, max_length=128)
    pairs = [("the quick brown", " fox jumps"), ("def add(a, b):", "\n    return a + b")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                           disable_tqdm=True)
    tok = srv.tokenizer
    for (ctx, cont), (ll, _greedy) in zip(pairs, got):
        ctx_ids = tok.encode(ctx, add_bos=False)
        whole = tok.encode(ctx + cont, add_bos=False)
        cont_ids = whole[len(ctx_ids):]  # lm-eval's split: the sequence scored is ctx_ids + cont_ids
        with torch.no_grad():
            lp = torch.log_softmax(srv.model(torch.tensor([ctx_ids + cont_ids])).logits[0].float(), -1)
        ref = sum(float(lp[len(ctx_ids) + j - 1, t]) for j, t in enumerate(cont_ids))
        assert ll == pytest.approx(ref, abs=1e-3)
    ids = tok.encode("for i in", add_bos=False)
    ref_text = tok.decode(generate(srv.model, [ids], 12, stop_token_ids=[tok.eos_id]).tokens[0])
    (gen,) = lm.generate_until([Instance("generate_until", {}, ("for i in", {"until": ["\u2603"], "max_gen_toks": 12}),
                                         0)], disable_tqdm=True)
    assert gen == ref_text.split("\u2603")[0]


def test_int8_model_server_serves_with_smaller_weights(stack):
    """--quantize int8 end to end: the replica loads int8 weights and still answers (greedy = its own generate)."""
    import asyncio as aio

    from moeflow.models.quant import Int8Linear, model_bytes

    base = _server(stack)
    spec = base.spec.model_copy(update={"engine": base.spec.engine.model_copy(update={"quantize": "int8"})})
    q = ModelServer(spec)
    try:
        assert any(isinstance(m, Int8Linear) for m in q.model.modules())
        assert model_bytes(q.model) < 0.45 * model_bytes(base.model)
        ids = q.tokenizer.encode("def add", add_bos=True)

        async def run():
            return [e async for e in q.generate({"prompt": ids, "params": {"max_tokens": 8, "temperature": 0}})]

        toks = [t for e in aio.run(run()) if e["kind"] == "token" for t in e["token_ids"]]
        assert toks == generate(q.model, [ids], 8, stop_token_ids=[q.tokenizer.eos_id]).tokens[0]
    finally:
        q.close()


def test_a_replica_stream_that_stops_early_is_an_error_not_a_short_answer(stack):
    """A backend stream that ends without a finish_reason (a replica died) must surface as an error."""

    class Truncating:
        def __init__(self, inner):
            self.inner = inner

        def stream(self, route, payload):
            async def gen():
                n = 0
                async for ev in self.inner.stream(route, payload):
                    yield ev
                    n += ev["kind"] == "token"
                    if n == 2:
                        return
            return gen()

    gw = stack["gw"]
    old = gw.backend
    gw.backend = Truncating(old)
    before = _version_errors(stack)
    try:
        r = _post(stack, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10})
        assert r.status_code == 503 and r.json()["error"]["code"] == "stream_interrupted"
        with httpx.stream("POST", stack["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "tiny", "prompt": "x", "max_tokens": 10, "stream": True}, timeout=30) as s:
            lines = [l for l in s.iter_lines() if l]
        assert "stream_interrupted" in lines[-2] and lines[-1] == "data: [DONE]"
    finally:
        gw.backend = old
    # both count for the version, the streamed one too (its HTTP status was already 200)
    assert _new_errors(before, _version_errors(stack)) == {("1", "503", "stream_interrupted"): 2.0}


def _version_errors(stack) -> dict[tuple[str, str, str], float]:
    """``moeflow_serve_version_errors_total`` of the gateway's /metrics by (version, status, code)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(stack["url"] + "/metrics").text
    return {(s.labels["version"], s.labels["status"], s.labels["code"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "moeflow_serve_version_errors_total"}


def _new_errors(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def test_errors_after_the_version_is_chosen_are_counted_per_version(stack):
    """The dashboard's per-version errors: a version's replica refusing a request counts for that version;
    a refusal before any version is chosen (over the gateway's caps) counts in http_requests only."""
    before = _version_errors(stack)
    assert _post(stack, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 999}).status_code == 400
    refused = _post(stack, "/v1/completions", {"model": "tiny@2", "prompt": [10 ** 9], "max_tokens": 2})
    assert refused.status_code == 400 and "outside" in refused.json()["error"]["message"]
    code = refused.json()["error"]["code"] or ""
    assert _new_errors(before, _version_errors(stack)) == {("2", "400", code): 1.0}


def test_a_stalled_replica_stream_times_out_instead_of_hanging(stack):
    class Stalling:
        def __init__(self, inner):
            self.inner = inner

        def stream(self, route, payload):
            async def gen():
                async for ev in self.inner.stream(route, payload):
                    yield ev
                    if ev["kind"] == "token":
                        await asyncio.sleep(3600)  # a replica that died without closing its stream
            return gen()

    gw = stack["gw"]
    old_backend, old_config = gw.backend, gw.config
    gw.backend, gw.config = Stalling(old_backend), old_config.model_copy(update={"stall_timeout_s": 1.0})
    try:
        t0 = time.perf_counter()
        r = _post(stack, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10})
        assert r.status_code == 503 and r.json()["error"]["code"] == "stream_stalled"
        assert time.perf_counter() - t0 < 10
    finally:
        gw.backend, gw.config = old_backend, old_config
    assert gw.inflight == 0


def test_a_consumer_that_falls_behind_gets_coalesced_chunks_with_every_token_and_logprob(stack, client):
    """Tokens that queued up while the consumer was busy come as ONE multi-token event / SSE chunk (not one per
    late token); the text, the completion logprobs lists and the chat logprobs entries still cover every token
    in order, equal to the non-streamed answer and to ``generate``."""

    class Lagging:
        def __init__(self, inner):
            self.inner = inner

        def stream(self, route, payload):
            async def gen():
                it = self.inner.stream(route, payload)
                try:
                    yield await it.__anext__()  # accepted
                    await asyncio.sleep(1.0)  # the engine runs on; its tokens queue up for this request
                    async for ev in it:
                        yield ev
                finally:
                    await it.aclose()
            return gen()

    srv = _server(stack)
    ids = srv.tokenizer.encode("def add", add_bos=True)
    ref = _reference(srv, ids, 12, [srv.tokenizer.eos_id])
    body = {"model": "tiny", "prompt": ids, "max_tokens": 12, "temperature": 0, "logprobs": 2}
    plain = client.completions.create(**body).choices[0]
    gw = stack["gw"]
    old = gw.backend
    gw.backend = Lagging(old)
    try:
        with httpx.stream("POST", stack["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={**body, "stream": True}, timeout=30) as s:
            chunks = [json.loads(l[6:]) for l in s.iter_lines() if l.startswith("data: {")]
        chat_body = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=0,
                         logprobs=True, top_logprobs=2)
        chat_plain = client.chat.completions.create(**chat_body).choices[0]
        chat_chunks = list(client.chat.completions.create(**chat_body, stream=True))
    finally:
        gw.backend = old
    n = len(ref)
    assert len(plain.logprobs.tokens) == n and plain.text == srv.tokenizer.decode(ref)
    assert len(chunks) < n, "the late tokens were not coalesced"
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain.text
    streamed = {k: [x for c in chunks for x in c["choices"][0]["logprobs"][k]]
                for k in ("tokens", "token_logprobs", "top_logprobs")}
    assert streamed["tokens"] == plain.logprobs.tokens
    assert streamed["token_logprobs"] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert [sorted(t) for t in streamed["top_logprobs"]] == [sorted(t) for t in plain.logprobs.top_logprobs]
    content = [e for c in chat_chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in content] == [e.token for e in chat_plain.logprobs.content]
    assert [e.logprob for e in content] == pytest.approx([e.logprob for e in chat_plain.logprobs.content], abs=1e-5)
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices) == chat_plain.message.content
    assert sum(1 for c in chat_chunks if c.choices and c.choices[0].delta.content) < len(content)


def test_gil_switch_interval_is_set_by_the_engine_config(tmp_path):
    """EngineConfig.gil_switch_ms: the engine thread, back from a GPU wait, gets the GIL within this interval
    instead of Python's 5 ms (the CPU stub benchmark in RESULTS.md shows what that costs at 128 streams)."""
    import sys

    from pydantic import ValidationError

    before = sys.getswitchinterval()
    d = make_model_dir(tmp_path / "m")
    try:
        server = ModelServer(ServedModel(name="tiny", version="9", model_dir=str(d),
                                         engine={"max_batch": 2, "gil_switch_ms": 0.5}))
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        server.close()
    finally:
        sys.setswitchinterval(before)
    with pytest.raises(ValidationError, match="gil_switch_ms"):
        ServedModel(name="tiny", version="9", model_dir=str(d), engine={"gil_switch_ms": 0.0})
