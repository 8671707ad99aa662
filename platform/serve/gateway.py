"""The OpenAI-compatible gateway: auth, validation, routing, streaming and metrics over model replicas.

``Gateway`` holds the logic and is independent of Ray: it resolves a request's ``model`` in the
route store, opens one backend stream per choice (``len(prompts) × n``), merges them, and turns
the replicas' events (``model_server``) into OpenAI responses or SSE chunks. ``create_app`` puts it
behind FastAPI; ``app.py`` runs that app as the Ray Serve ingress with a backend of Ray handles,
and tests run it in process with a ``LocalBackend``.

Failure handling, so nothing hangs and nothing is a 500 that should not be:
- every refusal known before the first byte (bad JSON, bad fields, unknown model, prompt too long,
  over the caps, overload) is a 4xx JSON error: the gateway waits for each choice's first replica
  event (``accepted`` or ``error``) before it answers;
- concurrency per gateway replica is bounded (``max_inflight``: 429 beyond it); waiting for a
  replica is bounded by ``first_token_timeout_s`` (503), a whole request by ``request_timeout_s``;
- once a stream has started, a failure becomes an SSE ``{"error": ...}`` event followed by
  ``data: [DONE]``; a client that disconnects cancels its choices, which frees their slots.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .config import GatewayConfig
from .heap import freeze_startup_objects
from .metrics import GatewayMetrics
from .routing import Route, UnknownModel
from .sse import SSE_DONE, SSEResponse

log = logging.getLogger(__name__)
_DONE = object()


class Backend(Protocol):
    def stream(self, route: Route, payload: dict) -> AsyncIterator[dict]: ...


class LocalBackend:
    """Model servers in this process, by version key (``name@version``)."""

    def __init__(self, servers: dict) -> None:
        self.servers = servers

    def stream(self, route: Route, payload: dict) -> AsyncIterator[dict]:
        server = self.servers.get(route.key)
        if server is None:
            raise P.APIError(503, f"{route.key} is not loaded on this gateway", code="version_unavailable")
        return server.generate(payload)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Gateway:
    def __init__(self, config: GatewayConfig, store, backend: Backend, key_hashes: set[str] | frozenset = frozenset()):
        self.config, self.store, self.backend = config, store, backend
        self.key_hashes = frozenset(key_hashes)
        self.metrics = GatewayMetrics()
        self.inflight = 0

    # ------------------------------------------------------------------ auth
    def check_auth(self, authorization: str | None) -> None:
        if not self.key_hashes:
            return
        scheme, _, token = (authorization or "").partition(" ")
        presented = hash_key(token.strip()) if scheme.lower() == "bearer" and token.strip() else ""
        if not any(hmac.compare_digest(presented, h) for h in self.key_hashes):
            raise P.APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                             code="invalid_api_key")

    # ------------------------------------------------------------------ routes
    async def list_models(self) -> dict:
        table = await self.store.get()
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "moeflow"}
                                           for m in table.model_ids()]}

    async def completions(self, req: P.CompletionRequest):
        prompts = req.prompts()
        if len(prompts) > self.config.max_prompts:
            raise P.APIError(400, f"at most {self.config.max_prompts} prompts per request", param="prompt")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        self._check_caps(max_tokens, req.n)
        params = dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                      stop=req.stop, stop_token_ids=req.stop_token_ids or (), logprobs=req.logprobs,
                      prompt_logprobs=req.logprobs if req.echo else None)
        payloads = [{"prompt": p, "echo": req.echo, "params": self._seeded(params, req.seed, i * req.n + j)}
                    for i, p in enumerate(prompts) for j in range(req.n)]
        run = await self._start(req, payloads)
        return await (self._stream_completion(req, run) if req.stream else self._complete(req, run))

    async def chat(self, req: P.ChatCompletionRequest):
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        self._check_caps(max_tokens or 0, req.n)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                      stop=req.stop, logprobs=top)
        if req.stop_token_ids:
            params["stop_token_ids"] = req.stop_token_ids
        messages = [m.model_dump() for m in req.messages]
        payloads = [{"messages": messages, "max_tokens_cap": self.config.max_tokens_cap,
                     "params": self._seeded(params, req.seed, j)} for j in range(req.n)]
        run = await self._start(req, payloads)
        return await (self._stream_chat(req, run) if req.stream else self._chat_complete(req, run))

    def _check_caps(self, max_tokens: int, n: int) -> None:
        if max_tokens > self.config.max_tokens_cap:
            raise P.APIError(400, f"max_tokens={max_tokens} is over this server's cap of {self.config.max_tokens_cap}",
                             param="max_tokens")
        if n > self.config.n_cap:
            raise P.APIError(400, f"n={n} is over this server's cap of {self.config.n_cap}", param="n")

    @staticmethod
    def _seeded(params: dict, seed: int | None, i: int) -> dict:
        return {**params, "seed": None if seed is None else seed + i}

    # ------------------------------------------------------------------ running choices
    async def _start(self, req, payloads: list[dict]) -> "_Run":
        try:
            route = (await self.store.get()).resolve(req.model, req.user)
        except UnknownModel as err:
            raise P.APIError(404, str(err), param="model", code="model_not_found") from None
        if self.inflight >= self.config.max_inflight:
            raise P.APIError(429, f"the gateway is at its limit of {self.config.max_inflight} concurrent requests; "
                                  "retry later", code="overloaded")
        self.metrics.child(self.metrics.routed, route.name, route.version, route.via).inc()
        run = _Run(self, route, payloads)
        self.inflight += 1
        try:
            await run.open()
        except BaseException as err:
            run.count_error(err)
            await run.close()
            raise
        return run

    async def _complete(self, req: P.CompletionRequest, run: "_Run") -> dict:
        try:
            texts = {i: (c.accepted["prompt_text"] if req.echo else "") for i, c in enumerate(run.choices)}
            lps = {i: P.CompletionLogprobs() for i in range(len(run.choices))} if req.logprobs is not None else None
            reasons: dict[int, str | None] = {}
            async for i, ev in run.events():
                if lps is not None:
                    if ev["prompt_logprobs"] is not None:
                        lps[i].add_prompt(ev["prompt_logprobs"])
                    lps[i].add_all(ev["tokens"], ev["logprobs"], ev["tops"])
                texts[i] += ev["text"]
                reasons[i] = ev["finish_reason"]
            choices = [{"index": i, "text": texts[i], "logprobs": lps[i].take() if lps else None,
                        "finish_reason": reasons.get(i)} for i in range(len(run.choices))]
            return {"id": P.new_id("cmpl"), "object": "text_completion", "created": P.now(), "model": run.route.key,
                    "choices": choices, "usage": run.usage()}
        finally:
            await run.close()

    async def _chat_complete(self, req: P.ChatCompletionRequest, run: "_Run") -> dict:
        try:
            texts = {i: "" for i in range(len(run.choices))}
            lps: dict[int, list] = {i: [] for i in range(len(run.choices))}
            reasons: dict[int, str | None] = {}
            async for i, ev in run.events():
                texts[i] += ev["text"]
                if req.logprobs:
                    lps[i].extend(map(P.chat_logprob_entry, ev["tokens"], ev["logprobs"], ev["tops"]))
                reasons[i] = ev["finish_reason"]
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": {"content": lps[i]} if req.logprobs else None, "finish_reason": reasons.get(i)}
                       for i in range(len(run.choices))]
            return {"id": P.new_id("chatcmpl"), "object": "chat.completion", "created": P.now(),
                    "model": run.route.key, "choices": choices, "usage": run.usage()}
        finally:
            await run.close()

    async def _stream_completion(self, req: P.CompletionRequest, run: "_Run") -> SSEResponse:
        rid, created = P.new_id("cmpl"), P.now()
        chunks = P.SSEChunks({"id": rid, "object": "text_completion", "created": created, "model": run.route.key})

        async def body():
            lps = {i: P.CompletionLogprobs() for i in range(len(run.choices))} if req.logprobs is not None else None
            tail = ""  # the stream's last chunk goes out with the usage and [DONE], in one write
            try:
                if req.echo and lps is None:
                    for i, c in enumerate(run.choices):
                        yield chunks.text(i, c.accepted["prompt_text"])
                async for i, ev in run.events():
                    text, reason = ev["text"], ev["finish_reason"]
                    if lps is None:
                        if not (text or reason):
                            continue
                        out = chunks.text(i, text, reason)
                    else:
                        if ev["prompt_logprobs"] is not None:
                            lps[i].add_prompt(ev["prompt_logprobs"])
                            text = run.choices[i].accepted["prompt_text"] + text
                        lps[i].add_all(ev["tokens"], ev["logprobs"], ev["tops"])
                        out = chunks({"index": i, "text": text, "logprobs": lps[i].take(), "finish_reason": reason})
                    if reason and run.all_finished():
                        tail = out
                    else:
                        yield out
                if req.include_usage():
                    tail += P.sse({"id": rid, "object": "text_completion", "created": created,
                                   "model": run.route.key, "choices": [], "usage": run.usage()})
            except P.APIError as err:
                tail += P.sse(err.body())
            finally:
                await run.close()
            yield tail + SSE_DONE

        return SSEResponse(body(), _stream_headers(run))

    async def _stream_chat(self, req: P.ChatCompletionRequest, run: "_Run") -> SSEResponse:
        rid, created = P.new_id("chatcmpl"), P.now()
        chunks = P.SSEChunks({"id": rid, "object": "chat.completion.chunk", "created": created,
                              "model": run.route.key})

        def chunk(i, delta, reason=None, logprobs=None):
            return chunks({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason})

        async def body():
            tail = ""  # the stream's last chunks go out with the usage and [DONE], in one write
            try:
                for i in range(len(run.choices)):
                    yield chunk(i, {"role": "assistant", "content": ""})
                async for i, ev in run.events():
                    text, reason = ev["text"], ev["finish_reason"]
                    out = ""
                    if req.logprobs and ev["token_ids"]:
                        lp = {"content": list(map(P.chat_logprob_entry, ev["tokens"], ev["logprobs"], ev["tops"]))}
                        out = chunk(i, {"content": text}, None, lp)
                    elif text:
                        out = chunks.content(i, text)
                    if reason:
                        out += chunk(i, {}, reason)
                        if run.all_finished():
                            tail = out
                            continue
                    if out:
                        yield out
                if req.include_usage():
                    tail += P.sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                   "model": run.route.key, "choices": [], "usage": run.usage()})
            except P.APIError as err:
                tail += P.sse(err.body())
            finally:
                await run.close()
            yield tail + SSE_DONE

        return SSEResponse(body(), _stream_headers(run))


def _stream_headers(run: "_Run") -> dict:
    return {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "x-moeflow-model-version": run.route.key}


class _Choice:
    def __init__(self, stream: AsyncIterator[dict]) -> None:
        self.stream = stream
        self.accepted: dict = {}
        self.num_generated = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.finish_reason: str | None = None
        self.series: tuple | None = None  # (generation_tokens, ttft, itl) children of its replica, once known


class _Run:
    """The choices of one request on one version: opening, merged events, metrics, cleanup."""

    def __init__(self, gw: Gateway, route: Route, payloads: list[dict]) -> None:
        self.gw, self.route, self.payloads = gw, route, payloads
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + gw.config.request_timeout_s
        self.choices: list[_Choice] = []
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._counted_waiting = 0
        self._counted_running = 0

    async def open(self) -> None:
        m, r = self.gw.metrics, self.route
        for payload in self.payloads:
            try:
                stream = self.gw.backend.stream(r, payload)
            except P.APIError:
                raise
            except Exception as err:  # noqa: BLE001 - a backend that cannot be reached is a 503
                raise P.APIError(503, f"{r.key} is unavailable: {type(err).__name__}", code="version_unavailable")
            self.choices.append(_Choice(stream))
            m.child(m.waiting, r.name, r.version).inc()
            self._counted_waiting += 1
        if len(self.choices) == 1:  # the common request: no task per choice
            firsts = [await self._first(self.choices[0])]
        else:
            firsts = await asyncio.gather(*(self._first(c) for c in self.choices), return_exceptions=True)
            for first in firsts:
                if isinstance(first, BaseException):
                    raise first
        for c, first in zip(self.choices, firsts):
            if first["kind"] == "error":
                raise P.APIError(first["status"], first["message"], param=first.get("param"), code=first.get("code"),
                                 type_=first.get("type"))
            c.accepted = first
        prompt_tokens = {}
        for c, p in zip(self.choices, self.payloads):
            prompt_tokens[id(p.get("prompt", p.get("messages")))] = c.accepted["num_prompt_tokens"]
        self.prompt_tokens = sum(prompt_tokens.values())
        for c in self.choices:
            replica = c.accepted["replica"]
            m.child(m.prompt_tokens, r.name, r.version, replica).inc(c.accepted["num_prompt_tokens"])
            # the labelled children once per choice, not per token
            c.series = (m.child(m.generation_tokens, r.name, r.version, replica),
                        m.child(m.ttft, r.name, r.version, replica), m.child(m.itl, r.name, r.version, replica))

    async def _first(self, c: _Choice) -> dict:
        try:
            async with asyncio.timeout(self.gw.config.first_token_timeout_s):  # wait_for made a task
                return await c.stream.__anext__()
        except TimeoutError:
            raise P.APIError(503, f"{self.route.key} did not accept the request within "
                                  f"{self.gw.config.first_token_timeout_s:g} s; retry later", code="queue_timeout")
        except StopAsyncIteration:
            raise P.APIError(503, f"{self.route.key} closed the stream", code="version_unavailable")
        except P.APIError:
            raise
        except Exception as err:  # noqa: BLE001 - Ray backpressure, a dead replica, ...
            raise _backend_error(self.route, err) from None

    async def events(self) -> AsyncIterator[tuple[int, dict]]:
        """(choice index, token event) merged over choices, until all finished; metrics on the way.

        One choice (the common request) is read straight from its replica's stream; several go through
        a queue fed by one task per choice. Either way each wait for an event is bounded (``_WaitBound``:
        one timer per request, where ``asyncio.timeout`` per wait cost a timer per token)."""
        single = self.choices[0] if len(self.choices) == 1 else None
        source = single.stream if single is not None else self._merged()
        bound = _WaitBound(self.deadline, self.gw.config.stall_timeout_s)
        try:
            while single is None or single.finish_reason is None:
                bound.begin()
                try:
                    item = await source.__anext__()
                except StopAsyncIteration:
                    if single is not None:
                        raise self._interrupted() from None
                    return
                except asyncio.CancelledError:
                    bound.raise_if_expired(self)
                    raise
                except P.APIError:
                    raise
                except Exception as err:  # noqa: BLE001 - Ray backpressure, a dead replica, ...
                    if single is None:
                        raise
                    raise _backend_error(self.route, err) from None
                finally:
                    bound.end()
                i, ev = (0, item) if single is not None else item
                if isinstance(ev, BaseException):
                    raise ev if isinstance(ev, P.APIError) else _backend_error(self.route, ev)
                if ev["kind"] == "error":
                    raise P.APIError(ev["status"], ev["message"], code=ev.get("code"), type_=ev.get("type"))
                self._observe(self.choices[i], ev)
                yield i, ev
        except P.APIError as err:
            self.count_error(err)
            raise
        finally:
            bound.cancel()
            if single is None:
                await source.aclose()

    async def _merged(self) -> AsyncIterator[tuple[int, dict | BaseException]]:
        queue: asyncio.Queue = asyncio.Queue()
        for i, c in enumerate(self.choices):
            self._tasks.append(asyncio.create_task(self._pump(i, c, queue)))
        remaining = len(self.choices)
        while remaining:
            i, ev = await queue.get()
            if ev is _DONE:
                remaining -= 1
                continue
            yield i, ev

    def _interrupted(self) -> P.APIError:
        # the replica's stream stopped without a finish: never pass that off as complete
        return P.APIError(503, f"{self.route.key} ended the stream before the end of the completion; retry",
                          code="stream_interrupted", type_="server_error")

    def count_error(self, err: BaseException) -> None:
        """Count an error answered for this run's version (``version_errors``); a cancellation is none."""
        if isinstance(err, P.APIError):
            m, r = self.gw.metrics, self.route
            m.child(m.version_errors, r.name, r.version, str(err.status), err.code or "").inc()

    async def _pump(self, i: int, c: _Choice, queue: asyncio.Queue) -> None:
        ended = False
        try:
            async for ev in c.stream:
                await queue.put((i, ev))
                if ev.get("finish_reason") or ev["kind"] == "error":
                    ended = True
                    break
            if not ended:
                raise self._interrupted()
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, err))
        await queue.put((i, _DONE))

    def _observe(self, c: _Choice, ev: dict) -> None:
        """Metrics of one event. An event of k tokens that came ``gap`` after the previous one counts k
        inter-token latencies of gap / k (the first token of a choice counts its time to first token
        instead), so the histogram's mean stays the stream's mean token interval whether or not
        tokens were coalesced."""
        k = len(ev["token_ids"])
        if k:
            now = time.perf_counter()
            generated, ttft, itl = c.series
            c.num_generated += k
            generated.inc(k)
            if c.first_at is None:
                c.first_at = c.last_at = now
                ttft.observe(now - self.t0)
                m, r = self.gw.metrics, self.route
                m.child(m.waiting, r.name, r.version).dec()
                m.child(m.running, r.name, r.version).inc()
                self._counted_waiting -= 1
                self._counted_running += 1
                k -= 1
            if k:
                gap = (now - c.last_at) / k
                for _ in range(k):
                    itl.observe(gap)
            c.last_at = now
        if ev["finish_reason"]:
            c.finish_reason = ev["finish_reason"]
            m, r = self.gw.metrics, self.route
            m.child(m.finished, r.name, r.version, c.accepted["replica"], ev["finish_reason"]).inc()

    def all_finished(self) -> bool:
        return all(c.finish_reason for c in self.choices)

    def usage(self) -> dict:
        return P.usage(self.prompt_tokens, sum(c.num_generated for c in self.choices))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.gw.inflight -= 1
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except BaseException:  # noqa: BLE001 - cancelled or already reported
                pass
        for c in self.choices:
            try:
                await c.stream.aclose()
            except BaseException:  # noqa: BLE001
                pass
        m, r = self.gw.metrics, self.route
        m.child(m.waiting, r.name, r.version).dec(self._counted_waiting)
        m.child(m.running, r.name, r.version).dec(self._counted_running)
        self._counted_waiting = self._counted_running = 0
        if self.all_finished():
            m.child(m.e2e, r.name, r.version).observe(time.perf_counter() - self.t0)


class _WaitBound:
    """Bounds each wait of one task for a replica event by ``stall_s`` and all of them by ``deadline``
    (``time.perf_counter`` seconds), with ONE timer per request: the timer, when it fires, re-arms for
    the current wait's due time, or cancels the task if that has passed (a 503 ``stream_stalled`` or a
    504 ``timeout``, as ``asyncio.timeout`` would). Per event this costs a clock read, not a timer."""

    def __init__(self, deadline: float, stall_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.deadline = self.loop.time() + (deadline - time.perf_counter())  # on the loop's clock
        self.stall_s = stall_s
        self.since: float | None = None  # when the current wait began; None between waits
        self.timer: asyncio.TimerHandle | None = None
        self.expired: str | None = None
        self.cancelling = self.task.cancelling()

    def begin(self) -> None:
        self.since = now = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_at(min(self.deadline, now + self.stall_s), self._fire)

    def end(self) -> None:
        self.since = None

    def _fire(self) -> None:
        self.timer = None
        if self.since is None or self.expired:
            return  # between waits: the next wait arms it again
        due = min(self.deadline, self.since + self.stall_s)
        if due > self.loop.time() + 1e-3:
            self.timer = self.loop.call_at(due, self._fire)
            return
        self.expired = "timeout" if self.deadline <= self.since + self.stall_s else "stream_stalled"
        self.task.cancel()

    def raise_if_expired(self, run: "_Run") -> None:
        """In the wait's ``except CancelledError``: the cancellation was this bound's alone -> its APIError."""
        if self.expired and self.task.uncancel() <= self.cancelling:
            cfg = run.gw.config
            if self.expired == "timeout":
                raise P.APIError(504, f"the request took longer than {cfg.request_timeout_s:g} s",
                                 code="timeout", type_="server_error") from None
            raise P.APIError(503, f"{run.route.key} sent nothing for {self.stall_s:g} s; retry",
                             code="stream_stalled", type_="server_error") from None

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _backend_error(route: Route, err: BaseException) -> P.APIError:
    name = type(err).__name__
    if "BackPressure" in name:
        return P.APIError(429, f"{route.key} has too many queued requests; retry later", code="overloaded")
    log.warning("backend error on %s: %s", route.key, name)
    return P.APIError(503, f"{route.key} failed to answer ({name}); retry", code="version_unavailable",
                      type_="server_error")


# ---------------------------------------------------------------------- FastAPI
def create_app(gw: Gateway) -> FastAPI:
    # FastAPI's OpenTelemetry hooks off: the gateway has its own Prometheus series, and checking whether a
    # tracer is configured (environment lookups) cost ~5 % of the gateway's CPU, per request
    app = FastAPI(title="moeflow serving gateway", docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False})

    async def body_of(request: Request) -> bytes:
        limit = gw.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise P.APIError(413, f"the request body is over {limit} bytes")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise P.APIError(413, f"the request body is over {limit} bytes")
        return bytes(data)

    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, err: P.APIError):
        gw.metrics.child(gw.metrics.http, request.url.path, str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        return await _api_error(request, P.APIError(400, str(err.errors()[:1])))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return await _api_error(request, P.APIError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return await _api_error(request, P.APIError(500, f"internal error ({type(err).__name__})",
                                                    type_="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        gw.check_auth(request.headers.get("authorization"))
        return await gw.list_models()

    # The two generation routes are plain Starlette routes: FastAPI's per-request machinery (dependency
    # solving, exit stacks, response serialization) was over a quarter of a one-token request's server CPU, for
    # nothing these endpoints use. The app's exception handlers still answer their errors.
    async def completions(request: Request) -> Response:
        gw.check_auth(request.headers.get("authorization"))
        req = P.parse_request(P.CompletionRequest, await body_of(request))
        return _respond(request, await gw.completions(req))

    async def chat(request: Request) -> Response:
        gw.check_auth(request.headers.get("authorization"))
        req = P.parse_request(P.ChatCompletionRequest, await body_of(request))
        return _respond(request, await gw.chat(req))

    def _respond(request: Request, out: dict | Response) -> Response:
        gw.metrics.child(gw.metrics.http, request.scope["path"], "200").inc()
        return JSONResponse(out) if isinstance(out, dict) else out

    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/chat/completions", chat, methods=["POST"])

    freeze_startup_objects()  # this is the gateway process's start-up (see heap.py)
    return app
