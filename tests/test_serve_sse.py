"""The gateway's streaming path without a model or a socket: templated SSE chunks against ``json.dumps``,
``SSEResponse`` (one write for the end of a stream, disconnects, cancellation) and the per-request wait bound,
driven through the ASGI app with a fake replica."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest

from moeflow.platform.serve import protocol as P
from moeflow.platform.serve.config import GatewayConfig
from moeflow.platform.serve.gateway import Gateway, LocalBackend, create_app
from moeflow.platform.serve.routing import LocalRouteStore, RouteTable
from moeflow.platform.serve.sse import SSE_DONE, SSEResponse

TRICKY = ["", " t", 'say "hi"', "back\\slash\\", "line\nbreak\r\ttab", "\x00\x1f\x7f", "héllo wörld", "✓ 中文",
          "🚀 rocket 👩‍💻", "\u2028\u2029", "</script>", "'single'", "{\"json\": [1, 2]}"]
ENVELOPE = {"id": "cmpl-0123", "object": "text_completion", "created": 1700000000, "model": "m@1"}


@pytest.mark.parametrize("text", TRICKY)
def test_templated_chunks_equal_json_dumps(text):
    chunks = P.SSEChunks(ENVELOPE)
    for i in (0, 3, 17):
        for reason in (None, "stop", "length"):
            assert chunks.text(i, text, reason) == P.sse(
                {**ENVELOPE, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]})
        assert chunks.content(i, text) == P.sse(
            {**ENVELOPE, "choices": [{"index": i, "delta": {"content": text}, "logprobs": None,
                                      "finish_reason": None}]})
    assert json.loads(chunks.text(0, text)[6:])["choices"][0]["text"] == text


# ---------------------------------------------------------------- SSEResponse against a fake ASGI server
class FakeConnection:
    """The ASGI server's side: records sent messages; ``disconnect()`` makes ``receive`` answer the disconnect."""

    def __init__(self, body: bytes = b"") -> None:
        self.sent: list[dict] = []
        self.body = body
        self.gone = asyncio.Event()
        self.closed_error: type[BaseException] | None = None

    async def receive(self) -> dict:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        if self.closed_error is not None and message["type"] == "http.response.body":
            raise self.closed_error("connection closed")
        self.sent.append(message)

    def bodies(self) -> list[tuple[bytes, bool]]:
        return [(m["body"], m.get("more_body", False)) for m in self.sent if m["type"] == "http.response.body"]


def _chunks(parts: list[str], log: list[str], wait: asyncio.Event | None = None):
    async def gen():
        try:
            for p in parts:
                yield p
            if wait is not None:
                await wait.wait()
        finally:
            log.append("closed")
    return gen()


def test_sse_response_ends_with_the_done_chunk_in_one_message():
    async def run():
        conn, log = FakeConnection(None), []
        await SSEResponse(_chunks(["data: a\n\n", "data: b\n\n" + SSE_DONE], log), {"x-h": "1"})(
            {"type": "http"}, conn.receive, conn.send)
        return conn, log

    conn, log = asyncio.run(run())
    assert conn.sent[0]["type"] == "http.response.start" and conn.sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in conn.sent[0]["headers"]
    assert conn.bodies() == [(b"data: a\n\n", True), (b"data: b\n\n" + SSE_DONE.encode(), False)]
    assert log == ["closed"]


def test_sse_response_without_done_still_ends_the_body():
    async def run():
        conn, log = FakeConnection(None), []
        await SSEResponse(_chunks(["data: a\n\n"], log), {})({"type": "http"}, conn.receive, conn.send)
        return conn, log

    conn, log = asyncio.run(run())
    assert conn.bodies() == [(b"data: a\n\n", True), (b"", False)] and log == ["closed"]


@pytest.mark.parametrize("how", ["disconnect", "send_raises"])
def test_a_client_gone_mid_stream_stops_and_closes_the_chunks(how):
    async def run():
        conn, log, never = FakeConnection(None), [], asyncio.Event()
        call = asyncio.ensure_future(SSEResponse(_chunks(["data: a\n\n"], log, never), {})(
            {"type": "http"}, conn.receive, conn.send))
        await asyncio.sleep(0.05)
        assert not call.done() and log == []  # waiting for the next chunk
        if how == "disconnect":
            conn.gone.set()
        else:  # an ASGI 2.4 server raises on a send to a closed connection
            conn.closed_error = OSError
            never.set()
        await asyncio.wait_for(call, 5)  # returns normally: a client going away is no error
        return log

    assert asyncio.run(run()) == ["closed"]


def test_cancelling_the_request_cancels_the_stream():
    async def run():
        conn, log = FakeConnection(None), []
        call = asyncio.ensure_future(SSEResponse(_chunks([], log, asyncio.Event()), {})(
            {"type": "http"}, conn.receive, conn.send))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return log

    assert asyncio.run(run()) == ["closed"]


# ---------------------------------------------------------------- the gateway's stream through ASGI
class FakeReplica:
    """``ModelServer.generate``'s protocol: accepted, then one token event per text, ``gaps_s`` apart."""

    def __init__(self, texts: list[str], gaps_s: float = 0.0) -> None:
        self.texts, self.gaps_s = texts, gaps_s

    async def generate(self, payload: dict):
        yield {"kind": "accepted", "num_prompt_tokens": 3, "prompt_ids": [1, 2, 3], "prompt_text": "", "replica": "r0"}
        seed = payload["params"]["seed"]
        texts = self.texts if seed is None else self.texts[:2 + seed % 3]  # choices of different lengths
        for k, text in enumerate(texts):
            await asyncio.sleep(self.gaps_s)
            last = k == len(texts) - 1
            yield {"kind": "token", "token_ids": [k], "text": text, "finish_reason": "length" if last else None,
                   "num_generated": k + 1, "tokens": None, "logprobs": None, "tops": None, "prompt_logprobs": None}


def _app(replica, **config):
    table = RouteTable(versions={"m": ["1"]})
    gw = Gateway(GatewayConfig(**config), LocalRouteStore(table), LocalBackend({"m@1": replica}))
    return gw, create_app(gw)


def _post(app, path: str, body: dict, *, read_gap_s: float = 0.0) -> FakeConnection:
    async def run():
        conn = FakeConnection(json.dumps(body).encode())
        send = conn.send
        if read_gap_s:  # a client that reads slowly: each body message takes a while to go out
            async def send(message, _send=conn.send):
                await asyncio.sleep(read_gap_s)
                await _send(message)
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80)}
        await asyncio.wait_for(app(scope, conn.receive, send), 10)
        return conn

    return asyncio.run(run())


def _events(conn: FakeConnection) -> list:
    text = b"".join(b for b, _ in conn.bodies()).decode()
    assert text.endswith(SSE_DONE)
    return [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stream_of_tricky_text_round_trips_and_ends_in_one_write(path):
    texts = TRICKY[1:]
    start_up, before = [[] for _ in range(1000)], gc.get_freeze_count()
    gw, app = _app(FakeReplica(texts))
    assert gc.get_freeze_count() >= before + len(start_up)  # create_app froze the start-up heap (heap.py)
    body = {"model": "m", "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True}}
    body.update({"prompt": "x"} if "chat" not in path else {"messages": [{"role": "user", "content": "x"}]})
    conn = _post(app, path, body)
    events = _events(conn)
    key = (lambda c: c["text"]) if "chat" not in path else (lambda c: c["delta"].get("content", ""))
    assert "".join(key(e["choices"][0]) for e in events if e["choices"]) == "".join(texts)
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]] \
        == ["length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == len(texts)
    # the finishing chunk, the usage chunk and [DONE] leave as the last body message, with the end of the body
    last, more = conn.bodies()[-1]
    assert not more and b'"finish_reason":"length"' in last and b'"usage"' in last and last.endswith(SSE_DONE.encode())
    assert gw.inflight == 0


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_several_choices_stream_merged_and_the_last_finish_ends_the_stream(path):
    texts = ["a", "b", "c", "d"]
    gw, app = _app(FakeReplica(texts, gaps_s=0.001))
    body = {"model": "m", "n": 3, "seed": 10, "stream": True, "stream_options": {"include_usage": True}}
    body.update({"prompt": "x"} if "chat" not in path else {"messages": [{"role": "user", "content": "x"}]})
    conn = _post(app, path, body)
    events = _events(conn)
    key = (lambda c: c["text"]) if "chat" not in path else (lambda c: c["delta"].get("content", ""))
    got = {i: "".join(key(e["choices"][0]) for e in events if e["choices"] and e["choices"][0]["index"] == i)
           for i in range(3)}
    assert got == {i: "".join(texts[:2 + (10 + i) % 3]) for i in range(3)}
    finishes = [e["choices"][0]["index"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2]
    assert events[-1]["usage"]["completion_tokens"] == sum(len(t) for t in got.values())
    last, more = conn.bodies()[-1]
    assert not more and last.count(b'"finish_reason":"length"') == 1 and last.endswith(SSE_DONE.encode())
    assert gw.inflight == 0


def test_the_wait_bound_answers_stalls_and_deadlines_but_not_a_slow_reader():
    stalling = FakeReplica(["a", "b"], gaps_s=1.0)
    _, app = _app(stalling, stall_timeout_s=0.2)
    err = json.loads(_post(app, "/v1/completions", {"model": "m", "prompt": "x"}).bodies()[0][0])
    assert err["error"]["code"] == "stream_stalled"
    _, app = _app(stalling, stall_timeout_s=5.0, request_timeout_s=0.3)
    err = json.loads(_post(app, "/v1/completions", {"model": "m", "prompt": "x"}).bodies()[0][0])
    assert err["error"]["code"] == "timeout"
    # the bound counts only the waits for the replica: a client reading slower than the stall bound is served
    gw, app = _app(FakeReplica(["a", "b", "c", "d"]), stall_timeout_s=0.1)
    conn = _post(app, "/v1/completions", {"model": "m", "prompt": "x", "stream": True}, read_gap_s=0.15)
    assert "".join(e["choices"][0]["text"] for e in _events(conn)) == "abcd"
    assert gw.inflight == 0
