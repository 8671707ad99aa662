"""One served model version: load it, tokenize requests, stream protocol-neutral events.

``ModelServer`` is plain Python (the gateway's in-process backend and tests use it directly); the
Ray Serve application wraps the same class as a deployment (``app.py``), one replica per process.

``generate(payload)`` is an async generator of dicts, the replica's whole wire protocol:

- ``{"kind": "error", "status", "message", "param", "code"}`` — the request is refused (bad prompt,
  too long for the context, queue full); nothing else follows;
- ``{"kind": "accepted", "num_prompt_tokens", "prompt_ids", "prompt_text", "replica"}`` — queued;
- ``{"kind": "token", "token_ids", "text", "tokens", "logprobs", "tops", "finish_reason",
  "num_generated", "prompt_logprobs"}`` — the tokens generated since the previous such event (one
  when the consumer keeps up, several when it fell behind: what is already queued goes out together
  instead of one event per late token; never fewer than one unless it only finishes); ``text`` is
  their text, ``tokens`` / ``logprobs`` / ``tops`` one entry per token (``None`` unless log-probs
  were asked for); the last event has ``finish_reason``.

Token strings (for log-probabilities) are single-token decodes, special markers included.
Completions stop at ``<|eos|>`` by default; chat requests at the template's end-of-turn ids.

With ``EngineConfig.process`` (default: on CUDA, ``EngineConfig.runs_in_child``) the engine is stepped in a child
process that loads the model itself (``ProcessEngine``); this process then holds the tokenizer only, and ``model``
is None.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import torch

from ...models.chat import ChatFormatError, prompt_ids as chat_prompt_ids, stop_ids as chat_stop_ids
from ...models.serving import Engine, EngineOverloaded, RequestError, SamplingParams
from ...models.tokenizer import Tokenizer
from .config import ServedModel
from .engine_loop import AsyncEngine, EngineFailed
from .engine_proc import ProcessEngine
from .heap import freeze_startup_objects

log = logging.getLogger(__name__)
TOKENIZER_FILE = "tokenizer.json"


def load_model(spec: ServedModel):
    """The model of ``spec.model_dir`` (HF export) on its device, in its dtype, quantized if asked."""
    from ...models.hf import import_hf
    from ...models.quant import quantize_int8

    e = spec.engine
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[e.dtype]
    model = import_hf(spec.model_dir, dtype=dtype, device=e.resolved_device(), include_mtp=False).eval()
    if e.quantize == "int8":
        report = quantize_int8(model)
        log.info("%s: int8 weights, %d -> %d bytes", spec.key, report.bytes_before, report.bytes_after)
    set_fused_moe(model, e.fused_moe)
    return model


def set_fused_moe(model, setting: str) -> int:
    """``EngineConfig.fused_moe`` onto the model's bf16/fp32 routed experts (INT8 stacks keep their own path);
    returns how many layers it set."""
    from ...models.moe import RoutedExperts
    from ...models.quant import Int8RoutedExperts

    value = {"off": False, "auto": None, "on": True}[setting]
    layers = [m for m in model.modules() if isinstance(m, RoutedExperts) and not isinstance(m, Int8RoutedExperts)]
    for m in layers:
        m.fused_decode = value
    return len(layers)


def load_tokenizer(model_dir: str) -> Tokenizer:
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {TOKENIZER_FILE} beside the model (export it with the tokenizer)")
    return Tokenizer.from_file(path)


def make_engine(spec: ServedModel, model, tokenizer: Tokenizer, *, max_waiting: int | None = None) -> Engine:
    """A fresh engine; in graph mode every decode bucket is captured here, before any request waits on it."""
    e = spec.engine
    engine = Engine(model, max_batch=e.max_batch, context_len=e.context_len, prefill_chunk=e.prefill_chunk,
                    max_waiting=max_waiting or e.max_waiting, decode=functools.partial(tokenizer.decode,
                                                                                      skip_special=True),
                    default_stop_token_ids=(tokenizer.eos_id,), decode_mode=e.decode_mode,
                    compile=None if e.compile == "none" else e.compile,
                    overlap={"auto": None, "on": True, "off": False}[e.overlap])
    num_graphs = engine.warmup()
    if num_graphs:
        log.info("%s: %d decode graphs captured", spec.key, num_graphs)
    return engine


def process_engine_setup(spec: ServedModel):
    """In the engine's child process: load the model and tokenizer once, return the factory of its engines.

    The child's engine queues up to max_batch + max_waiting requests: the parent bounds what is in flight at
    that, so the child never refuses what the parent admitted (engine_proc.py)."""
    model, tokenizer = load_model(spec), load_tokenizer(spec.model_dir)
    room = spec.engine.max_batch + spec.engine.max_waiting
    return functools.partial(make_engine, spec, model, tokenizer, max_waiting=room)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not inside a Ray Serve replica
        return "local"


class ModelServer:
    def __init__(self, spec: ServedModel | dict) -> None:
        self.spec = ServedModel.model_validate(spec)
        if not Path(self.spec.model_dir).is_dir():  # a model reference (a RayService's config): fetch it here
            from .resolve import resolve_served

            self.spec = self.spec.model_copy(update={"model_dir": resolve_served(self.spec.model_dir).model_dir})
        self.tokenizer = load_tokenizer(self.spec.model_dir)
        e = self.spec.engine
        if e.gil_switch_ms is not None:  # process-wide: the last server built in a process sets it
            sys.setswitchinterval(e.gil_switch_ms / 1000)
            log.info("%s: GIL switch interval %.2f ms", self.spec.key, e.gil_switch_ms)
        if e.runs_in_child():  # the child loads the model; this process keeps none
            self.model = None
            self.loop = ProcessEngine(functools.partial(process_engine_setup, self.spec), max_batch=e.max_batch,
                                      max_waiting=e.max_waiting, name=f"moeflow-engine-{self.spec.key}")
            self.vocab_size, self.context_len = self.loop.info["vocab_size"], self.loop.info["context_len"]
        else:
            self.model = load_model(self.spec)
            self.loop = AsyncEngine(functools.partial(make_engine, self.spec, self.model, self.tokenizer))
            self.vocab_size, self.context_len = self.model.cfg.vocab_size, self.loop.engine.context_len
        if self.tokenizer.vocab_size > self.vocab_size:
            self.loop.close()
            raise ValueError(f"{self.spec.model_dir}: tokenizer has {self.tokenizer.vocab_size} ids, "
                             f"the model {self.vocab_size}")
        self.chat_stops = tuple(chat_stop_ids(self.tokenizer))
        self.replica = _replica_id()
        self.started = time.time()
        freeze_startup_objects()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special=False)

    def check_health(self) -> None:
        """Ray Serve calls this every ``health_check_period_s``; raising marks the replica unhealthy and Serve replaces
        it (an engine that could not be rebuilt after a failure would otherwise answer every request with 500)."""
        problem = self.loop.problem()
        if problem is not None:
            raise RuntimeError(f"{self.spec.key}: {problem}")

    def info(self) -> dict:
        return {"name": self.spec.name, "version": self.spec.version, "replica": self.replica,
                "context_len": self.context_len, "quantize": self.spec.engine.quantize,
                "created": int(self.started), **self.loop.stats()}

    # ------------------------------------------------------------------ the replica protocol
    async def generate(self, payload: dict) -> AsyncIterator[dict]:
        try:
            ids, prompt_text, params = self._prepare(payload)
            events = self.loop.open(ids, params, payload.get("request_id"))
        except (RequestError, ChatFormatError, ValueError) as err:
            yield _error(400, str(err), param=getattr(err, "param", None))
            return
        except EngineOverloaded as err:
            yield _error(429, f"the model is overloaded: {err}; retry later", code="overloaded")
            return
        except EngineFailed as err:  # the process engine has no child to queue it in
            yield _error(500, str(err), code="engine_failed", type_="server_error")
            return
        want_strings = params.logprobs is not None or params.prompt_logprobs is not None
        try:
            yield {"kind": "accepted", "num_prompt_tokens": len(ids), "prompt_ids": ids, "prompt_text": prompt_text,
                   "replica": self.replica}
            async for batch in events:
                cancelled = batch[-1].token_id is None and batch[-1].finish_reason == "cancelled"
                if cancelled:
                    batch = batch[:-1]
                if batch:
                    yield self._token_event(batch, ids, want_strings)
                if cancelled:
                    return
        except EngineFailed as err:
            yield _error(500, str(err), code="engine_failed", type_="server_error")
        finally:  # closed early (the client left, even at "accepted"): the request leaves the engine now
            events.close()

    def _prepare(self, payload: dict) -> tuple[list[int], str, SamplingParams]:
        p = dict(payload.get("params") or {})
        messages = payload.get("messages")
        if messages is not None:
            ids = chat_prompt_ids(self.tokenizer, messages)
            p.setdefault("stop_token_ids", self.chat_stops)
            prompt_text = ""
        else:
            prompt = payload.get("prompt")
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt, add_bos=True)
                prompt_text = prompt
            elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                ids = list(prompt)
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise RequestError(f"prompt token ids outside [0, {self.vocab_size}): {bad[:5]}")
                prompt_text = self._decode(ids) if payload.get("echo") else ""
            else:
                raise RequestError("prompt must be a string or a list of token ids")
        if p.get("max_tokens") is None:  # chat without max_tokens: up to the context (and the gateway's cap)
            p["max_tokens"] = max(0, min(int(payload.get("max_tokens_cap") or self.context_len),
                                         self.context_len - len(ids)))
        stop_ids = tuple(p.pop("stop_token_ids", ()) or ())
        if stop_ids and messages is None:
            stop_ids = stop_ids + (self.tokenizer.eos_id,)
        params = SamplingParams(stop_token_ids=stop_ids, **{k: (tuple(v) if k == "stop" else v) for k, v in p.items()})
        return ids, prompt_text, params

    def _token_event(self, batch: list, prompt: list[int], want_strings: bool) -> dict:
        """One protocol event for the engine events ``batch`` of one request (see the module docstring)."""
        last = batch[-1]
        made = [ev for ev in batch if ev.token_id is not None]
        out = {"kind": "token", "token_ids": [ev.token_id for ev in made],
               "text": last.text if len(batch) == 1 else "".join(ev.text for ev in batch),
               "finish_reason": last.finish_reason, "num_generated": last.num_generated,
               "tokens": None, "logprobs": None, "tops": None, "prompt_logprobs": None}
        if want_strings:
            out["tokens"] = [self._token_str(ev.token_id) for ev in made]
            out["logprobs"] = [ev.logprob for ev in made]
            out["tops"] = [None if ev.top_logprobs is None else [[self._token_str(t), lp] for t, lp in ev.top_logprobs]
                           for ev in made]
        prompt_lps = next((ev.prompt_logprobs for ev in batch if ev.prompt_logprobs is not None), None)
        if prompt_lps is not None:
            out["prompt_logprobs"] = [
                {"token": self._token_str(t), "logprob": None if e is None else e[0],
                 "top": None if e is None else [[self._token_str(a), lp] for a, lp in e[1]]}
                for t, e in zip(prompt, prompt_lps)]
        return out

    def close(self) -> None:
        self.loop.close()


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           type_: str = "invalid_request_error") -> dict:
    return {"kind": "error", "status": status, "message": message, "param": param, "code": code, "type": type_}
