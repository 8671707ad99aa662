"""Continuous-batching decode engine over the latent MLA cache (iteration-level scheduling).

One ``Engine.step()`` is one scheduling iteration:

1. requests added (``add``) or cancelled (``cancel``) since the last step are taken in; a cancelled
   request leaves at once and its slot is free for this very step;
2. **decode**: every running request advances by one token in ONE batched model call over the
   ``SlotCache`` (rows = slots, right-aligned at a shared cursor, see slots.py). ``decode_mode``
   "graph" (the default on CUDA) replays a CUDA graph captured per (rows, cache columns) bucket
   (graphs.py); "static" runs those bucketed steps uncaptured; "eager" (the default on CPU) calls the
   model on the dynamic cache. Every row's next token comes from ONE batched sampling call
   (``sampling.sample_rows``: per-row temperature, top-k, top-p and seeded generator) and ONE
   device-to-host copy per step; so do the log-probabilities of the rows that ask for them;
3. **prefill**: waiting requests take free slots and their prompts are prefilled, at most
   ``prefill_chunk`` prompt tokens per step in total. Prompts that fit whole are prefilled together
   in one left-padded call (as ``generate`` pads a batch); a longer one is prefilled a chunk per step
   in its own batch-1 staging cache, so it costs the running streams one chunk of latency per step
   instead of a stall. When a prompt is done, its first token is sampled and its latents are copied
   into its slot, so it joins the decode batch on the next step.

**Overlap** (``overlap``, on by default on CUDA): step t+1's decode is launched BEFORE step t's tokens
are read back to the host, so the host's per-token work (the read-back wait, stop rules, text, events,
and the serving side that runs while the engine thread waits) overlaps the GPU's next step instead of
alternating with it (vLLM's "async scheduling"). The price is one step of lookahead: a request that
stops on a token (a stop id or string, unknown until read back) has already been given one more
decode row, whose token is thrown away; a request's first token is read, and emitted, one step after
its prefill. ``max_tokens`` and the context are known ahead, so no row is launched past them.
Outputs are unchanged (tested: the same tokens as without overlap and as ``generate``). On the CPU
nothing runs asynchronously, so overlap only adds that step of latency: off by default there.

Each request samples with its own parameters (temperature, top-k, top-p, its own seeded
``torch.Generator``; per row what ``generation.sample_next`` does, see sampling.py), stops on its own stop
token ids, stop strings (``TextStream``, when a ``decode`` function is given), ``max_tokens`` or the
context length, and reports log-probabilities (of the model's distribution before temperature)
for generated and, when asked, prompt tokens. Per request the computation is the one ``generate``
does for that prompt alone, so greedy output matches it token for token (tested).

``add`` and ``cancel`` may be called from another thread than ``step`` (the serving loop runs
``step`` in a worker thread); they only touch a lock-guarded inbox.

Shape suffixes: B slots in a decode call, T tokens, V vocab.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..generation import left_pad
from .detok import OneTokenMemo, TextStream
from .graphs import StaticDecoder
from .sampling import host_to_device, sample_rows
from .slots import SlotCache

MAX_LOGPROBS = 20


class RequestError(ValueError):
    """A request the engine refuses (bad prompt, too long for the context, bad sampling values)."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the caller should answer 429 / retry later."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None           # None (or <= 0) = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None        # per generated token: its log-prob + this many alternatives
    prompt_logprobs: int | None = None  # the same for prompt tokens (echo + logprobs)

    def check(self) -> None:
        if self.max_tokens < 0:
            raise RequestError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                raise RequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {v}")


def check_request(prompt_ids: Sequence[int], params: SamplingParams, *, vocab_size: int, context_len: int,
                  can_decode: bool) -> list[int]:
    """The prompt as a list of ints if an engine of these limits takes the request, else RequestError.

    ``Engine.add`` runs it; so does the process engine's parent (platform/serve/engine_proc.py), so a bad
    request is refused at once there without a round trip to the engine's process."""
    prompt = [int(t) for t in prompt_ids]
    params.check()
    if not prompt:
        raise RequestError("the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt token ids outside [0, {vocab_size}): {bad[:5]}")
    if len(prompt) + params.max_tokens > context_len:
        raise RequestError(f"this model's maximum context length is {context_len} tokens, but "
                           f"{len(prompt) + params.max_tokens} were requested ({len(prompt)} in the prompt, "
                           f"{params.max_tokens} for the completion)")
    if params.stop and not can_decode:
        raise RequestError("stop strings need an engine built with a decode function")
    return prompt


@dataclass
class TokenOutput:
    """What one step produced for one request (one per request per step it took part in)."""

    request_id: str
    token_id: int | None               # None: no token this event (max_tokens=0, cancelled)
    text: str = ""                     # text released by this token (stop strings never included)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None   # None while running; "stop" | "length" | "cancelled"
    prompt_logprobs: list | None = None  # first event only: per prompt token None | (logprob, top list)
    num_prompt_tokens: int = 0
    num_generated: int = 0


@dataclass
class _Seq:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    stream: TextStream | None
    stops: frozenset[int]              # stop token ids
    limit: int                         # tokens to generate at most (max_tokens, the context)
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    stage: object | None = None        # staging MLACache while prefilling
    num_prefilled: int = 0
    prompt_lp: list | None = None
    num_sampled: int = 0               # tokens sampled on the device, read back or not
    finished: bool = False             # left the engine; tokens still in flight for it are dropped


@dataclass
class _Sampled:
    """Tokens sampled for ``seqs`` (row r for seqs[r]) in one call, on their way to the host."""

    seqs: list[_Seq]
    readback: "_Readback"              # [tokens, then the log-prob tensors of ``logprob_layout``]
    logprob_layout: tuple | None


class _Readback:
    """Device tensors copied to pinned host memory without waiting; ``lists`` waits for them.

    On CUDA the copies are queued behind the work that produced the tensors and an event marks their end:
    ``lists`` waits for that event only, not for anything queued after it (the next decode step). On the
    CPU the tensors are already there."""

    __slots__ = ("host", "event")

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        if tensors[0].device.type != "cuda":
            self.host, self.event = tensors, None
            return
        self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(self.host, tensors):
            h.copy_(t, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def lists(self) -> list[list]:
        if self.event is not None:
            self.event.synchronize()  # releases the GIL while it waits
        return [h.tolist() for h in self.host]


class Engine:
    def __init__(self, model, *, max_batch: int = 8, context_len: int | None = None, prefill_chunk: int = 256,
                 max_waiting: int = 256, decode: Callable[[list[int]], str] | None = None,
                 default_stop_token_ids: Sequence[int] = (), cache_len: int | None = None,
                 decode_mode: str = "auto", compile: str | None = None, overlap: bool | None = None) -> None:
        """cache_len: columns of the slot cache (default 2 x context; more = rarer compaction).
        decode_mode: "eager" (dynamic cache), "static" (bucketed static steps, run eagerly) or "graph"
        (the same steps captured as CUDA graphs, see graphs.py); "auto" = graph on CUDA, else eager.
        compile: None, or a ``torch.compile`` backend ("inductor") for the static / graph steps (graphs.py).
        overlap: launch each decode step before reading the previous one back (module docstring);
        None = on CUDA only."""
        self.model = model.eval()
        self.device = model.lm_head.weight.device
        self.vocab_size = model.cfg.vocab_size
        self.context_len = context_len or model.cfg.max_seq_len
        self.prefill_chunk, self.max_waiting, self.decode = prefill_chunk, max_waiting, decode
        self._stream_decode = OneTokenMemo(decode) if decode is not None else None
        self.default_stop_token_ids = tuple(default_stop_token_ids)
        self.slots = SlotCache(model, max_batch, self.context_len, cache_len, device=self.device)
        self.overlap = self.device.type == "cuda" if overlap is None else bool(overlap)
        # the input token of every slot's next decode step, written on the device by the sampler
        self.next_tok_B = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        if decode_mode == "auto":
            decode_mode = "graph" if self.device.type == "cuda" else "eager"
        if decode_mode not in ("eager", "static", "graph"):
            raise ValueError(f"decode_mode must be auto, eager, static or graph, got {decode_mode!r}")
        if compile is not None and decode_mode == "eager":
            raise ValueError("compile needs decode_mode static or graph (the eager step's shapes change every step)")
        self.decode_mode = decode_mode
        self.static = (StaticDecoder(model, self.slots, capture=decode_mode == "graph", compile=compile,
                                     tokens_B=self.next_tok_B) if decode_mode != "eager" else None)
        self._lock = threading.Lock()
        self._inbox: deque[_Seq] = deque()
        self._cancel: set[str] = set()
        self._waiting: deque[_Seq] = deque()   # not started
        self._prefilling: list[_Seq] = []      # slot reserved, prompt partly prefilled
        self._running: dict[int, _Seq] = {}    # slot -> sequence in the decode batch
        self._stages: list = []                # spare staging caches
        self._pending: list[_Sampled] = []     # sampled on the device, not yet read back (overlap)

    # ------------------------------------------------------------------ thread-safe entry points
    def add(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Queue a request; raises RequestError / EngineOverloaded at once instead of failing later."""
        prompt = check_request(prompt_ids, params, vocab_size=self.vocab_size, context_len=self.context_len,
                               can_decode=self.decode is not None)
        gen = torch.Generator(device=self.device).manual_seed(params.seed) if params.seed is not None else None
        stream = TextStream(self._stream_decode, params.stop) if self.decode is not None else None
        with self._lock:
            if len(self._inbox) + len(self._waiting) >= self.max_waiting:
                raise EngineOverloaded(f"{self.max_waiting} requests are already waiting")
            stops = frozenset(params.stop_token_ids or self.default_stop_token_ids)
            limit = min(params.max_tokens, self.context_len - len(prompt))
            self._inbox.append(_Seq(request_id, prompt, params, gen, stream, stops, limit))

    def cancel(self, request_id: str) -> None:
        """The request leaves at the next step (its slot is freed then); unknown ids are ignored."""
        with self._lock:
            self._cancel.add(request_id)

    @torch.inference_mode()  # as ``step``: a graph captured (a step compiled) with autograd on would record for it
    def warmup(self) -> int:
        """Capture (and compile) every decode bucket now (graph mode, or a compiled static step) so no request
        waits for it; the number of buckets prepared."""
        if self.decode_mode == "graph" or (self.static is not None and self.static.compile):
            return self.static.capture_all()
        return 0

    # ------------------------------------------------------------------ state
    def num_running(self) -> int:
        return len(self._running)

    def num_waiting(self) -> int:
        with self._lock:
            return len(self._inbox) + len(self._waiting) + len(self._prefilling)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._cancel or self._waiting or self._prefilling or self._running
                        or self._pending)

    # ------------------------------------------------------------------ one iteration
    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        out: list[TokenOutput] = []
        self._take_inbox(out)
        previous, self._pending = self._pending, []
        if self._running:
            self._decode()              # queued on the device; its tokens join self._pending
        if self.overlap:
            self._read(previous, out)   # the previous step's tokens, while this step runs
        else:
            self._read(self._take_pending(), out)
        self._prefill(out)
        if not self.overlap:
            self._read(self._take_pending(), out)
        return out

    def _take_pending(self) -> list[_Sampled]:
        taken, self._pending = self._pending, []
        return taken

    def _take_inbox(self, out: list[TokenOutput]) -> None:
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            cancel, self._cancel = self._cancel, set()
        if not cancel:
            return
        for seq in [s for s in self._waiting if s.request_id in cancel]:
            self._waiting.remove(seq)
            out.append(self._finished(seq, "cancelled"))
        for seq in [s for s in self._prefilling if s.request_id in cancel]:
            self._prefilling.remove(seq)
            self._free(seq)
            out.append(self._finished(seq, "cancelled"))
        for b, seq in list(self._running.items()):
            if seq.request_id in cancel:
                self._free(seq)
                out.append(self._finished(seq, "cancelled"))

    def _decode(self) -> None:
        # a request whose last allowed token is in flight gets no row: it ends when that token is read
        rows = sorted(b for b, s in self._running.items() if s.num_sampled < s.limit)
        if not rows:
            return
        seqs = [self._running[b] for b in rows]
        num_rows = rows[-1] + 1
        real = [False] * num_rows
        for b in rows:
            real[b] = True
        self.slots.prepare_step()
        if self.static is not None:
            logits_BV = self.static.run(real, self.slots.cursor)
        else:
            real_B1 = host_to_device(real, torch.bool, self.device)[:, None]
            view = self.slots.rows_view(num_rows)
            logits_BV = self.model(self.next_tok_B[:num_rows, None], cache=view, attention_mask_BS=real_B1,
                                   last_logits_only=True, router_stats=False, decode=True).logits[:, -1]
        self.slots.advance(rows)
        self._sample(seqs, _take_rows(logits_BV, rows))  # free slots below the last live one are left out

    def _prefill(self, out: list[TokenOutput]) -> None:
        while self._waiting and self._free_slots() > 0:
            self._prefilling.append(self._waiting.popleft())
        # Plan this step's prefill budget in arrival order: a prompt that fits whole joins one
        # left-padded batch call (many short prompts cost one call, not one each); a longer one, or
        # one asking for prompt log-probs, is prefilled a chunk at a time in its own staging cache.
        budget, whole, chunked = self.prefill_chunk, [], []
        for seq in self._prefilling:
            if budget <= 0:
                break
            rest = len(seq.prompt) - seq.num_prefilled
            if seq.num_prefilled == 0 and rest <= budget and seq.params.prompt_logprobs is None:
                whole.append(seq)
            else:
                chunked.append((seq, min(rest, budget)))
            budget -= min(rest, budget)
        for seq, n in chunked:
            self._prefill_chunk(seq, n, out)
        if whole:
            self._prefill_whole(whole, out)

    def _prefill_chunk(self, seq: _Seq, n: int, out: list[TokenOutput]) -> None:
        if seq.stage is None:
            seq.stage = self._stages.pop() if self._stages else self.model.new_cache(1, self.context_len)
            seq.stage.reset()
        chunk = seq.prompt[seq.num_prefilled: seq.num_prefilled + n]
        want_lp = seq.params.prompt_logprobs is not None
        ids_1T = torch.tensor([chunk], dtype=torch.long, device=self.device)
        logits_TV = self.model(ids_1T, cache=seq.stage, last_logits_only=not want_lp,
                               router_stats=False).logits[0]
        if want_lp:
            self._collect_prompt_logprobs(seq, logits_TV)
        seq.num_prefilled += len(chunk)
        if seq.num_prefilled < len(seq.prompt):
            return
        if self._start_decoding(seq, seq.stage, 0, 0, out):
            self._sample([seq], logits_TV[-1:])

    def _prefill_whole(self, seqs: list[_Seq], out: list[TokenOutput]) -> None:
        """Prefill whole prompts in one call, left-padded like ``generate`` (each row computes what it would alone)."""
        ids_kP, mask_kP = left_pad([s.prompt for s in seqs], 0, self.device)
        k, P = ids_kP.shape
        stage = self.model.new_cache(k, P)
        logits_kV = self.model(ids_kP, cache=stage, attention_mask_BS=mask_kP, last_logits_only=True,
                               router_stats=False).logits[:, -1]
        started = []
        for r, seq in enumerate(seqs):
            seq.num_prefilled = len(seq.prompt)
            if self._start_decoding(seq, stage, r, P - len(seq.prompt), out):
                started.append(r)
        if started:
            self._sample([seqs[r] for r in started], _take_rows(logits_kV, started))

    def _start_decoding(self, seq: _Seq, stage, row: int, start: int, out: list[TokenOutput]) -> bool:
        """Prefill done: copy its latents into a free slot (True; its first token is for the caller to sample),
        or finish it now if it asks for no token."""
        self._prefilling.remove(seq)
        if seq.params.max_tokens == 0:
            self._free(seq)
            out.append(self._finished(seq, "length"))
            return False
        seq.slot = self.slots.free_slot()
        self.slots.insert(seq.slot, stage, len(seq.prompt), row, start)
        if seq.stage is not None:
            self._stages.append(seq.stage)
            seq.stage = None
        self._running[seq.slot] = seq
        return True

    # ------------------------------------------------------------------ per-request bookkeeping
    def _free_slots(self) -> int:
        return self.slots.num_slots - len(self._running) - len(self._prefilling)

    def _free(self, seq: _Seq) -> None:
        """``seq`` leaves the engine (finished or cancelled): its slot and staging cache go back."""
        seq.finished = True
        if seq.stage is not None:
            self._stages.append(seq.stage)
            seq.stage = None
        if seq.slot is not None and self._running.get(seq.slot) is seq:
            del self._running[seq.slot]
            self.slots.release(seq.slot)
        seq.slot = None

    def _sample(self, seqs: list[_Seq], logits_RV: torch.Tensor) -> None:
        """Sample the next token of every ``seqs[r]`` from row r of the logits (one batched call), write it into
        the slot's next input token, and queue the tokens (and log-probs) for reading back, all on the device."""
        tok_R = sample_rows(logits_RV, [s.params.temperature for s in seqs],
                            [s.params.top_k if s.params.top_k and s.params.top_k > 0 else None for s in seqs],
                            [s.params.top_p for s in seqs], [s.generator for s in seqs])
        slots = [s.slot for s in seqs]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            self.next_tok_B[slots[0]: slots[0] + len(slots)].copy_(tok_R)
        else:
            self.next_tok_B.index_copy_(0, host_to_device(slots, torch.long, self.device), tok_R)
        layout, lp_tensors = self._logprob_tensors(seqs, logits_RV, tok_R)
        for seq in seqs:
            seq.num_sampled += 1
        self._pending.append(_Sampled(seqs, _Readback([tok_R] + lp_tensors), layout))

    def _read(self, sampled_calls: list[_Sampled], out: list[TokenOutput]) -> None:
        """Take sampled tokens on the host (waiting for them if need be): stop rules, text, events."""
        for sampled in sampled_calls:
            values = sampled.readback.lists()
            logprobs = _logprob_lists(len(sampled.seqs), sampled.logprob_layout, values[1:])
            for seq, tok, lp in zip(sampled.seqs, values[0], logprobs):
                if not seq.finished:  # else stopped or cancelled while this token was in flight
                    out.append(self._emit(seq, tok, lp))

    def _logprob_tensors(self, seqs: list[_Seq], logits_RV: torch.Tensor,
                         tok_R: torch.Tensor) -> tuple[tuple | None, list[torch.Tensor]]:
        """The log-probs the rows ask for, under the model's distribution before temperature, as device tensors:
        one log-softmax over the rows that ask, one ``topk`` per distinct n. Layout for ``_logprob_lists``."""
        want = [r for r, s in enumerate(seqs) if s.params.logprobs is not None]
        if not want:
            return None, []
        idx_L = host_to_device(want, torch.long, self.device)
        lp_LV = torch.log_softmax(logits_RV.index_select(0, idx_L).float(), dim=-1)
        tensors = [lp_LV.gather(1, tok_R.index_select(0, idx_L)[:, None])[:, 0]]
        groups = []
        for n in sorted({seqs[r].params.logprobs for r in want}):
            group = [i for i, r in enumerate(want) if seqs[r].params.logprobs == n]
            if n > 0:
                vals_Gn, idx_Gn = lp_LV.index_select(0, host_to_device(group, torch.long, self.device)).topk(n, dim=-1)
                tensors += [idx_Gn, vals_Gn]
            groups.append((n, group))
        return (want, groups), tensors

    def _emit(self, seq: _Seq, tok: int, logprob: tuple[float, list] | None) -> TokenOutput:
        """Take ``tok`` as the next token of ``seq``: the event, and the end of the request on a stop rule."""
        seq.generated.append(tok)
        num = len(seq.generated)
        ev = TokenOutput(seq.request_id, tok, num_prompt_tokens=len(seq.prompt), num_generated=num)
        if logprob is not None:
            ev.logprob, ev.top_logprobs = logprob
        if num == 1 and seq.prompt_lp is not None:
            ev.prompt_logprobs = seq.prompt_lp
        stream = seq.stream
        if stream is not None:
            ev.text = stream.push(tok)
        if tok in seq.stops or (stream is not None and stream.stopped):
            reason = "stop"
        elif num >= seq.limit:
            reason = "length"
        else:
            return ev
        if stream is not None:
            ev.text += stream.finish()
        ev.finish_reason = reason
        self._free(seq)
        return ev

    def _finished(self, seq: _Seq, reason: str) -> TokenOutput:
        text = seq.stream.finish() if (seq.stream is not None and reason != "cancelled") else ""
        return TokenOutput(seq.request_id, None, text, finish_reason=reason, prompt_logprobs=seq.prompt_lp,
                           num_prompt_tokens=len(seq.prompt), num_generated=len(seq.generated))

    def _collect_prompt_logprobs(self, seq: _Seq, logits_TV: torch.Tensor) -> None:
        """Row j of this chunk predicts prompt token num_prefilled + j + 1."""
        n = seq.params.prompt_logprobs
        if seq.prompt_lp is None:
            seq.prompt_lp = [None]
        # row j predicts prompt token i = num_prefilled + j + 1; the last row of the prompt predicts none
        num = min(logits_TV.shape[0], len(seq.prompt) - seq.num_prefilled - 1)
        if num <= 0:
            return
        lp_TV = torch.log_softmax(logits_TV[:num].float(), dim=-1)
        ids_T1 = torch.tensor(seq.prompt[seq.num_prefilled + 1: seq.num_prefilled + 1 + num]).to(lp_TV.device)[:, None]
        seq.prompt_lp.extend(zip(lp_TV.gather(1, ids_T1)[:, 0].tolist(), _top_rows(lp_TV, n)))


def _take_rows(x_NV: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows ``rows`` (ascending) of ``x_NV``: a view when they are 0, 1, ..., else one gather."""
    if rows[-1] == len(rows) - 1:
        return x_NV[: len(rows)]
    return x_NV.index_select(0, host_to_device(rows, torch.long, x_NV.device))


def _logprob_lists(num_rows: int, layout: tuple | None, values: list[list]) -> list:
    """Per row, None or (log-prob of its token, its top-n list as (token id, log-prob), largest first), from the
    host lists of ``Engine._logprob_tensors``."""
    out: list = [None] * num_rows
    if layout is None:
        return out
    want, groups = layout
    chosen, k, tops = values[0], 1, {}
    for n, group in groups:
        if n > 0:
            idx_Gn, vals_Gn = values[k], values[k + 1]
            k += 2
            tops.update(zip(group, (list(zip(i, v)) for i, v in zip(idx_Gn, vals_Gn))))
        else:
            tops.update((i, []) for i in group)
    for i, r in enumerate(want):
        out[r] = (chosen[i], tops[i])
    return out


def _top_rows(lp_RV: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    """Per row, its n largest log-probs as (token id, log-prob), largest first."""
    if n <= 0:
        return [[] for _ in range(lp_RV.shape[0])]
    vals_Rn, idx_Rn = lp_RV.topk(n, dim=-1)
    return [list(zip(i, v)) for i, v in zip(idx_Rn.tolist(), vals_Rn.tolist())]
