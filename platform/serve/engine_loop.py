"""The engine's step loop in a background thread, and one asyncio stream of events per request.

``Engine.step()`` is synchronous torch work; running it on the event loop would block every other
request of the replica. A daemon thread steps while there is work and sleeps on an event
otherwise. Each step's ``TokenOutput``s reach the event loop in ONE ``call_soon_threadsafe`` per
loop (not one per token: each such call wakes the loop through its self-pipe, a system call, and
at batch 32 that was 32 wake-ups per step); on the loop they are appended to the owning request's
buffer and its waiting consumer, if any, is woken.

A consumer iterates LISTS of events: everything its request has produced since it last looked,
at least one event, handed over as soon as there is one (a consumer that keeps up gets one token
per list, one that falls behind catches up in one go instead of paying per-token costs for tokens
that are already late). A consumer that stops iterating (client gone, timeout, cancellation)
cancels its request in the engine, which frees the slot at the next step.

If a step raises (a bug, an out-of-memory), every request in flight gets an ``EngineFailed``
instead of hanging, and the engine is rebuilt from its factory so later requests are served.

``EventStreams`` (the consumer half: streams, hand-over, failure) is shared with ``engine_proc.ProcessEngine``,
which steps the engine in a child process instead of a thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import AsyncIterator, Callable, Sequence

from ...models.serving import Engine, SamplingParams, TokenOutput

log = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """The engine step failed while this request was in flight."""


class _Stream:
    """One request's buffer of events on its event loop, and the future its consumer waits on."""

    __slots__ = ("loop", "items", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def push(self, item) -> None:  # on the loop
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _push_all(items: list[tuple[_Stream, object]]) -> None:
    for stream, item in items:
        stream.push(item)


class EventStreams:
    """The consumer half that the thread engine and the process engine (engine_proc.py) share: the streams of
    the requests in flight, keyed by request id, and the hand-over of a step's events to their loops.

    A subclass queues a request in its engine inside ``_open``'s ``submit`` and forgets one in ``_abandon`` (the
    consumer stopped iterating before the request finished)."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()

    def _open(self, rid: str, submit: Callable[[], None]) -> "RequestEvents":
        """Register ``rid``'s stream, then ``submit()`` it (whatever that raises propagates, the stream dropped)."""
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            self._streams[rid] = stream
        try:
            submit()
        except BaseException:
            self._forget(rid)
            raise
        return RequestEvents(self, rid, stream)

    def _forget(self, rid: str) -> None:
        with self._lock:
            self._streams.pop(rid, None)

    def _leave(self, rid: str) -> None:
        """The consumer left before ``rid`` finished: drop its stream, cancel it in the engine."""
        self._forget(rid)
        self._abandon(rid)

    def _abandon(self, rid: str) -> None:
        raise NotImplementedError

    def _deliver_events(self, events: Sequence[TokenOutput]) -> None:
        with self._lock:
            deliver([(self._streams.get(ev.request_id), ev) for ev in events])

    def _fail(self, err: BaseException, rids=None) -> None:
        """``err`` to the streams of ``rids`` (default: every stream)."""
        with self._lock:
            deliver([(s, err) for rid, s in self._streams.items() if rids is None or rid in rids])


class RequestEvents:
    """What ``open`` returns: the async iterator of one request's event lists (see the module docstring).

    Leaving before the request finished cancels it in the engine: ``close()`` / ``aclose()``, an exception or
    a cancellation while waiting, or dropping the iterator. A class, not an async generator: a generator closed
    before its first ``__anext__`` never runs its ``finally``, so a request whose consumer left at once (its
    ``ModelServer.generate`` closed at the "accepted" event) kept its slot until ``max_tokens``."""

    __slots__ = ("_owner", "_rid", "_stream", "_done")

    def __init__(self, owner: EventStreams, rid: str, stream: _Stream) -> None:
        self._owner, self._rid, self._stream, self._done = owner, rid, stream, False

    def __aiter__(self) -> "RequestEvents":
        return self

    async def __anext__(self) -> list[TokenOutput]:
        if self._done:
            raise StopAsyncIteration
        stream = self._stream
        if not stream.items:
            stream.waiter = stream.loop.create_future()
            try:
                await stream.waiter
            except BaseException:  # cancelled while waiting: the consumer is gone
                self.close()
                raise
            finally:
                stream.waiter = None
        batch, stream.items = stream.items, []
        failed = next((i for i, ev in enumerate(batch) if isinstance(ev, BaseException)), None)
        if failed is not None:
            if failed:  # the events before the error first, the error on the next call
                stream.items = batch[failed:]
                return batch[:failed]
            self.close()
            raise batch[0]
        if batch[-1].finish_reason is not None:  # a request's finishing event is its last
            self._done = True
            self._owner._forget(self._rid)
        return batch

    def close(self) -> None:
        """Leave: the request is cancelled in the engine unless it has finished (idempotent)."""
        if not self._done:
            self._done = True
            self._owner._leave(self._rid)

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        if self._done:
            return
        # on the loop, not here: a garbage collection may run this in any thread, inside a lock it would take
        try:
            self._stream.loop.call_soon_threadsafe(self._owner._leave, self._rid)
        except RuntimeError:  # the loop is closed: nothing runs on it any more
            self._owner._leave(self._rid)


def deliver(items: list[tuple[_Stream | None, object]]) -> None:
    """One hand-over per event loop for all of ``items`` (a stream gone already is skipped)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, item in items:
        if stream is not None:
            by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_push_all, batch)
        except RuntimeError:  # the consumer's loop is closed
            pass


class AsyncEngine(EventStreams):
    """The engine stepped by a daemon thread of this process (the default on the CPU; on CUDA it is
    ``ProcessEngine``, see ``EngineConfig.process``)."""

    def __init__(self, make_engine: Callable[[], Engine]) -> None:
        super().__init__()
        self._make_engine = make_engine
        self.engine = make_engine()
        self._wake = threading.Event()
        self._stop = False
        self.num_steps = 0
        self.broken: str | None = None  # why the engine could not be rebuilt after a failed step
        self._thread = threading.Thread(target=self._run, name="moeflow-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ consumer side
    def open(self, prompt_ids: Sequence[int], params: SamplingParams,
             request_id: str | None = None) -> RequestEvents:
        """Queue a request now (RequestError / EngineOverloaded raise here) and return its stream of event lists.

        Call from a coroutine and iterate the result: leaving it before the request finished (``close``,
        ``aclose``, dropping it, a cancellation while it waits) cancels the request in the engine.
        """
        if self.broken is not None:
            raise EngineFailed(f"the engine cannot be rebuilt: {self.broken}")
        rid = request_id or uuid.uuid4().hex
        events = self._open(rid, lambda: self.engine.add(rid, prompt_ids, params))
        self._wake.set()
        return events

    def _abandon(self, rid: str) -> None:
        self.engine.cancel(rid)
        self._wake.set()

    def stats(self) -> dict:
        return {"running": self.engine.num_running(), "waiting": self.engine.num_waiting(), "steps": self.num_steps}

    def problem(self) -> str | None:
        """Why this engine cannot serve (it could not be rebuilt, or its thread is gone), or None: the replica's
        health check, so that Ray Serve replaces a replica that would otherwise fail every request."""
        if self.broken is not None:
            return f"the engine cannot be rebuilt: {self.broken}"
        if not self._thread.is_alive() and not self._stop:
            return "the engine thread has stopped"
        return None

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
                self.num_steps += 1
            except Exception as err:  # noqa: BLE001 - every request must hear about it
                log.exception("engine step failed; failing the requests in flight and rebuilding the engine")
                self._fail(EngineFailed(f"engine step failed: {type(err).__name__}: {err}"))
                try:
                    self.engine = self._make_engine()
                except Exception as rebuild_err:  # noqa: BLE001 - refuse from now on, and say so to the health check
                    log.exception("the engine cannot be rebuilt; this replica now refuses requests")
                    self.broken = f"{type(rebuild_err).__name__}: {rebuild_err}"
                    self._fail(EngineFailed(f"the engine cannot be rebuilt: {self.broken}"))
                    return
                continue
            if events:
                self._deliver_events(events)
