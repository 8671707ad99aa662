"""The engine's step loop in a background thread, and one asyncio stream of events per request.

``Engine.step()`` is synchronous torch work; running it on the event loop would block every other
request of the replica. A daemon thread steps while there is work and sleeps on an event
otherwise; each step's ``TokenOutput``s are handed to the owning request's ``asyncio.Queue`` with
``call_soon_threadsafe``. A consumer that stops iterating (client gone, timeout, cancellation)
cancels its request in the engine, which frees the slot at the next step.

If a step raises (a bug, an out-of-memory), every request in flight gets an ``EngineFailed``
instead of hanging, and the engine is rebuilt from its factory so later requests are served.
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


class AsyncEngine:
    def __init__(self, make_engine: Callable[[], Engine]) -> None:
        self._make_engine = make_engine
        self.engine = make_engine()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.num_steps = 0
        self._thread = threading.Thread(target=self._run, name="moeflow-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ consumer side
    def open(self, prompt_ids: Sequence[int], params: SamplingParams,
             request_id: str | None = None) -> AsyncIterator[TokenOutput]:
        """Queue a request now (RequestError / EngineOverloaded raise here) and return its event stream.

        Call from a coroutine and iterate the result: leaving the iteration early (break, an
        exception, ``aclose``, task cancellation) cancels the request in the engine.
        """
        rid = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._queues[rid] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.add(rid, prompt_ids, params)
        except BaseException:
            with self._lock:
                self._queues.pop(rid, None)
            raise
        self._wake.set()
        return self._events(rid, queue)

    async def _events(self, rid: str, queue: asyncio.Queue) -> AsyncIterator[TokenOutput]:
        finished = False
        try:
            while True:
                ev = await queue.get()
                if isinstance(ev, BaseException):
                    raise ev
                finished = ev.finish_reason is not None
                yield ev
                if finished:
                    return
        finally:
            with self._lock:
                self._queues.pop(rid, None)
            if not finished:
                self.engine.cancel(rid)
                self._wake.set()

    def stats(self) -> dict:
        return {"running": self.engine.num_running(), "waiting": self.engine.num_waiting(), "steps": self.num_steps}

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
                self._fail_all(EngineFailed(f"engine step failed: {type(err).__name__}: {err}"))
                self.engine = self._make_engine()
                continue
            for ev in events:
                self._deliver(ev.request_id, ev)

    def _deliver(self, rid: str, item) -> None:
        with self._lock:
            target = self._queues.get(rid)
        if target is not None:
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def _fail_all(self, err: BaseException) -> None:
        with self._lock:
            rids = list(self._queues)
        for rid in rids:
            self._deliver(rid, err)
