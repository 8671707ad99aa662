"""The engine's step loop in a child process (vLLM's "engine core" split), ``EngineConfig.process`` (default on CUDA).

Why: with the thread engine (engine_loop.py) the HTTP side (event loop, per-token SSE chunks) and the
engine's Python (scheduling, stop rules, text, events) share one GIL, and at 128 streams on an H100 that
one core is the ceiling. Here the child process builds the model and the ``Engine`` itself (the GPU memory
lives there; CUDA cannot fork, so the child is *spawned*) and steps it; the server process keeps the
tokenizer, the HTTP side and one reader thread.

Wire (one duplex ``multiprocessing`` pipe, pickled tuples):

- parent → child: ``("add", rid, prompt, params)``, ``("cancel", rid)``, ``("stop",)``;
- child → parent: ``("ready", info)`` once the engine is built (or ``("error", text)``), then ONE
  ``("step", events, running, waiting, steps)`` per engine step that produced events, each event a plain
  tuple of ``TokenOutput``'s fields (a pickled dataclass costs its class reference and a ``__dict__`` per
  event: for 128 greedy events the tuples are 2/3 of the bytes and 2.0 instead of 3.3 µs per event to encode,
  pickle, unpickle and decode on the dev CPU); ``("failed", text, rids)`` when a step raised (the child rebuilds
  its engine and goes on; ``rids`` were in the engine that failed); ``("rejected", rid, text)`` if the
  engine refused an add the parent had admitted (it should not: the parent checks first).

The parent's reader thread blocks on the pipe (the GIL released) and hands each step's events to the event
loops with one ``call_soon_threadsafe`` per loop (``EventStreams``, shared with the thread engine).

Requests are checked in the parent at ``open`` (``check_request``, the checks ``Engine.add`` runs, with the
limits the child reported when it started), so ``RequestError`` and ``EngineOverloaded`` raise at once as
with the thread engine, without a round trip that would block the event loop while the child steps. The
parent bounds the requests in flight (added, not finished) at ``max_batch + max_waiting``; the thread engine
bounds those not yet in a slot at ``max_waiting``: the same total when the slots are full. The child's
engine is built with room for all of them, so it never refuses what the parent admitted.

If the child dies (killed, out of memory) the reader sees the pipe close: every request in flight gets
``EngineFailed``, the dead child is reaped, and a new one is spawned; requests opened meanwhile wait in a
backlog that is sent to the new child once it is ready. If it cannot be restarted, requests fail at once.

Process supervision is written here rather than taken from a library: what is needed (spawn, one pipe, a
restart that fails exactly the requests that were lost) is a few lines of ``multiprocessing``, and the
supervisors at hand (Ray actors, ``concurrent.futures``' process pool) add a per-call round trip or a
scheduler in between.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import traceback
import uuid
from typing import Callable, Sequence

from ...models.serving import EngineOverloaded, SamplingParams, TokenOutput, check_request
from .engine_loop import EngineFailed, EventStreams, RequestEvents

log = logging.getLogger(__name__)

# the setup runs in the child: it loads what the engine needs (model, tokenizer) ONCE and returns a factory of
# fresh engines (called again after a failed step); it must pickle (a module-level function, a partial of one)
EngineSetup = Callable[[], Callable[[], object]]


def encode(ev: TokenOutput) -> tuple:
    return (ev.request_id, ev.token_id, ev.text, ev.logprob, ev.top_logprobs, ev.finish_reason, ev.prompt_logprobs,
            ev.num_prompt_tokens, ev.num_generated)


def decode(t: tuple) -> TokenOutput:
    return TokenOutput(*t)


_FINISH = 5  # index of finish_reason in an encoded event


class ProcessEngine(EventStreams):
    """``AsyncEngine``'s consumer API (``open``, ``stats``, ``close``) over an engine stepped in a child process."""

    def __init__(self, setup: EngineSetup, *, max_batch: int, max_waiting: int, start_timeout_s: float = 1800.0,
                 name: str = "moeflow-engine", max_restarts: int = 3, restart_window_s: float = 300.0) -> None:
        """A child that dies more than ``max_restarts`` times within ``restart_window_s`` is not started again (a
        crash loop: each restart reloads the model and fails what the child held); the engine then refuses
        requests and fails the replica's health check, so Ray Serve replaces the replica."""
        super().__init__()
        self._setup, self._name, self._start_timeout_s = setup, name, start_timeout_s
        self._max_restarts, self._restart_window_s = max_restarts, restart_window_s
        self._deaths: list[float] = []       # monotonic times of the child's deaths within the window
        self._limit = max_batch + max_waiting
        self._ctx = mp.get_context("spawn")
        self._live: set[str] = set()         # added, not finished (guarded by self._lock)
        self._send_lock = threading.Lock()   # the pipe's writers; taken before self._lock where both are
        self._backlog: list[tuple] = []      # messages for the next child while there is none
        self._broken: str | None = None      # why no child could be started
        self._closing = False
        self._stats = {"running": 0, "waiting": 0, "steps": 0}
        self.num_restarts = 0
        self._proc, self._conn, self.info = self._spawn()  # raises if the first child cannot start
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ------------------------------------------------------------------ consumer side
    def open(self, prompt_ids: Sequence[int], params: SamplingParams,
             request_id: str | None = None) -> RequestEvents:
        """Queue a request now (RequestError / EngineOverloaded / EngineFailed raise here) and return its stream
        of event lists; leaving the iteration early cancels the request in the child (see ``AsyncEngine.open``)."""
        rid = request_id or uuid.uuid4().hex
        info = self.info
        prompt = check_request(prompt_ids, params, vocab_size=info["vocab_size"], context_len=info["context_len"],
                               can_decode=info["can_decode"])
        return self._open(rid, lambda: self._submit(rid, prompt, params))

    def _submit(self, rid: str, prompt: list[int], params: SamplingParams) -> None:
        # admitting and sending under one lock: a restart (which takes it too) sees the request either sent to
        # the old child (so lost with it) or in the backlog of the new one, never half way
        with self._send_lock:
            if self._broken is not None:
                raise EngineFailed(f"the engine process cannot start: {self._broken}")
            with self._lock:
                if len(self._live) >= self._limit:
                    raise EngineOverloaded(f"{self._limit} requests are already in flight")
                self._live.add(rid)
            self._send(("add", rid, prompt, params))

    def _abandon(self, rid: str) -> None:
        with self._send_lock:
            self._send(("cancel", rid))

    def _send(self, msg: tuple) -> None:
        """To the child, or to the backlog while there is none (hold ``_send_lock``)."""
        if self._conn is None:
            self._backlog.append(msg)
            return
        try:
            self._conn.send(msg)
        except OSError:  # the child just died: the reader fails this request with the others
            pass

    def stats(self) -> dict:
        return {**self._stats, "pid": self.pid, "restarts": self.num_restarts}

    def problem(self) -> str | None:
        """Why this engine cannot serve (no child could be restarted), or None; the replica's health check."""
        if self._broken is not None:
            return f"the engine process cannot start: {self._broken}"
        return None

    def close(self) -> None:
        """Stop the child (it finishes its step and exits), reap it, end the reader; the requests in flight fail."""
        self._closing = True
        with self._send_lock:
            conn, proc = self._conn, self._proc
            if conn is not None:
                try:
                    conn.send(("stop",))
                except OSError:
                    pass
        if proc is not None:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        self._reader.join(timeout=30)
        self._fail(EngineFailed("the engine was closed"))

    # ------------------------------------------------------------------ the child's life
    def _spawn(self):
        """A started child whose engine is ready: (process, parent's pipe end, its ``info``)."""
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_child_main, args=(child_conn, self._setup), name=self._name, daemon=True)
        proc.start()
        child_conn.close()  # only the child holds its end now, so its death closes the pipe here
        try:
            if not parent_conn.poll(self._start_timeout_s):
                raise RuntimeError(f"no engine within {self._start_timeout_s:.0f} s")
            msg = parent_conn.recv()
        except (EOFError, OSError, RuntimeError) as err:
            msg = ("error", f"{type(err).__name__}: {err}")
        if msg[0] != "ready":
            parent_conn.close()
            proc.kill()
            proc.join()
            raise RuntimeError(f"the engine process did not start (exit code {proc.exitcode}): {msg[1]}")
        log.info("engine process %d ready: %s", proc.pid, msg[1])
        return proc, parent_conn, msg[1]

    def _read(self) -> None:
        """The reader thread: each step's events to their loops; on the child's death, fail and restart."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                if self._closing or not self._restart():
                    return
                continue
            kind = msg[0]
            if kind == "step":
                self._on_step(msg)
            elif kind == "failed":
                rids = set(msg[2])
                with self._lock:
                    self._live -= rids
                self._fail(EngineFailed(f"engine step failed: {msg[1]}"), rids)
            elif kind == "rejected":
                with self._lock:
                    self._live.discard(msg[1])
                self._fail(EngineFailed(f"the engine refused the request: {msg[2]}"), {msg[1]})

    def _on_step(self, msg: tuple) -> None:
        _, encoded, running, waiting, steps = msg
        events = [decode(t) for t in encoded]
        with self._lock:
            for t in encoded:
                if t[_FINISH] is not None:
                    self._live.discard(t[0])
        self._stats = {"running": running, "waiting": waiting, "steps": steps}
        self._deliver_events(events)

    def _restart(self) -> bool:
        """The child died: fail what it held, reap it, start another (True), or give up (False)."""
        with self._send_lock:  # from here on new requests wait in the backlog
            old, self._conn = self._conn, None
            with self._lock:
                lost, self._live = self._live, set()
        old.close()
        self._proc.join(timeout=30)
        code = self._proc.exitcode
        log.error("engine process %d died (exit code %s); failing %d requests and restarting it", self._proc.pid,
                  code, len(lost))
        self._fail(EngineFailed(f"the engine process died (exit code {code})"), lost)
        self._stats = {"running": 0, "waiting": 0, "steps": 0}
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < self._restart_window_s] + [now]
        try:
            if len(self._deaths) > self._max_restarts:
                raise RuntimeError(f"it died {len(self._deaths)} times within {self._restart_window_s:g} s "
                                   f"(last exit code {code}); not restarting it again")
            proc, conn, info = self._spawn()
        except Exception as err:  # noqa: BLE001 - the backlog must hear about it
            log.exception("the engine process cannot be restarted")
            with self._send_lock:
                self._broken = str(err)
                backlog, self._backlog = self._backlog, []
                with self._lock:
                    self._live.clear()
            self._fail(EngineFailed(f"the engine process cannot start: {err}"), {m[1] for m in backlog})
            return False
        with self._send_lock:
            self._proc, self.info = proc, info
            self.num_restarts += 1
            backlog, self._backlog = self._backlog, []
            self._conn = conn
            for m in backlog:  # their requests were admitted into the new ``_live`` already
                self._send(m)
        if self._closing:  # close() ran meanwhile and saw no child to stop
            proc.kill()
            proc.join()
            return False
        return True


# ---------------------------------------------------------------------- the child process
def _child_main(conn, setup: EngineSetup) -> None:
    """Build the engine, say ready, then: take messages (blocking while there is no work), step, send events."""
    try:
        make_engine = setup()
        engine = make_engine()
    except BaseException as err:  # noqa: BLE001 - the parent must hear why
        conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        return
    from .heap import freeze_startup_objects

    freeze_startup_objects()
    conn.send(("ready", _describe(engine)))
    try:
        _child_loop(conn, engine, make_engine)
    except (EOFError, OSError):  # the parent is gone
        return


def _child_loop(conn, engine, make_engine) -> None:
    live: set[str] = set()   # request ids in the engine, for "failed"
    steps = 0
    while True:
        wait = not engine.has_work()
        while conn.poll(None if wait else 0):
            msg = conn.recv()
            wait = False
            if msg[0] == "add":
                try:
                    engine.add(msg[1], msg[2], msg[3])
                    live.add(msg[1])
                except Exception as err:  # noqa: BLE001 - the parent checked it: a bug, but not this step's
                    conn.send(("rejected", msg[1], f"{type(err).__name__}: {err}"))
            elif msg[0] == "cancel":
                engine.cancel(msg[1])
            else:  # stop
                return
        try:
            events = engine.step()
        except Exception as err:  # noqa: BLE001 - every request must hear about it
            log.exception("engine step failed; failing its requests and rebuilding the engine")
            conn.send(("failed", f"{type(err).__name__}: {err}", list(live)))
            live.clear()
            engine = make_engine()
            continue
        steps += 1
        if events:
            for ev in events:
                if ev.finish_reason is not None:
                    live.discard(ev.request_id)
            conn.send(("step", [encode(ev) for ev in events], engine.num_running(), engine.num_waiting(), steps))


def _describe(engine) -> dict:
    """What the parent needs to check requests and to report, from a built engine (or a stand-in of its API)."""
    static = getattr(engine, "static", None)
    return {"pid": os.getpid(), "context_len": engine.context_len, "vocab_size": engine.vocab_size,
            "can_decode": getattr(engine, "decode", None) is not None,
            "decode_mode": getattr(engine, "decode_mode", None), "overlap": getattr(engine, "overlap", None),
            "num_graphs": static.num_graphs if static is not None else 0}
