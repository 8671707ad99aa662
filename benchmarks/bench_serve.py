"""Serving benchmarks: the engine beside ``generate``, and the OpenAI HTTP API beside a transformers server.

    mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/moeflow
    # engine vs generate (CPU figures in RESULTS.md)
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_serve.py engine --preset tiny --device cpu
    # HTTP API, ours and the baseline in the same run (GPU: bench_ref, bf16)
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_serve.py http --preset bench_ref --out results/serve.jsonl
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_serve.py http --smoke          # CPU, tiny, seconds
    # the serving side's own cost (CPU): the API vs the engine alone, this tree vs an older checkout
    PYTHONPATH=/tmp/pkg python3 benchmarks/bench_serve.py http --overhead --old-pythonpath /tmp/pkg-old

``engine`` rows (greedy, random weights, ``--prompt`` token random prompts, ``--new`` new tokens each):
``generate batch B`` = one ``generate()`` call over B prompts; ``engine batch B`` = the same B requests
through ``Engine``, all added at once; ``engine staggered`` = 4·B requests arriving ``--stagger`` steps
apart into B slots. tokens/s = generated tokens ÷ wall time (prefill included).

``http``: one exported model (``export_hf`` of ``--preset`` with random weights and a byte-level BPE
tokenizer of the model's vocabulary size, so every generated id decodes to text and streams as one SSE
chunk) is served twice, one server process at a time, through the SAME gateway code
(``platform/serve/gateway.py``: FastAPI app, OpenAI protocol, SSE, metrics) under uvicorn:

- ``moeflow``: ``ModelServer`` = the continuous-batching engine (CUDA-graph decode on the GPU);
- ``transformers``: ``HFGenerateServer`` = ``AutoModelForCausalLM.from_pretrained`` of the same export
  and ``model.generate`` with request-level batching: requests that wait while a batch runs form the
  next batch (what Ray Serve's ``@serve.batch`` gives a server that wraps ``generate``); tokens stream
  per step through a ``BaseStreamer``.

Ray Serve itself is not in the loop: its wheel is too large to carry to the lent GPU machine, so both
servers run the gateway's ASGI app in one uvicorn process with the backend in process
(``LocalBackend``), which is the code path of ``tests/test_serve_gateway.py``.

``--stub-step-ms S`` replaces the engine of our server by ``StubEngine``: a step that waits S ms (the GIL
released, as while the GPU runs) and gives every running request one token, so the server's CPU is the
serving side alone (gateway, SSE, metrics, the engine thread's hand-over) and its ideal rate is slots / S.

``--process-peer`` adds the process-engine twin (``EngineConfig.process``: the engine stepped in a child
process, platform/serve/engine_proc.py; the plain rows force it off: a thread) of each bf16 ``moeflow`` server,
stub engine included (the stub then steps in the child), rows labelled ``process``, same run. Server CPU ms /
token counts the server process and its children (the engine's process); ``main_cpu_ms_per_token`` the server
process alone (the HTTP side's core).

``--engine-peer`` adds, per level C, the engine alone (no HTTP, no asyncio: ``Engine.step`` in a loop) on
the same export and settings, C requests at once, each ``--new`` tokens: the gap between it and the API
row is what the serving side costs. ``--old-pythonpath P`` serves a second ``moeflow`` server from the
package at ``P`` (an older checkout) beside this one, level by level. ``--overhead`` = CPU, the ``tiny``
preset in fp32, levels 8/32/64 with as many slots, both of these.

Load (``aiohttp`` in the parent process): C concurrent streams, each sending streaming
``/v1/completions`` requests back to back (``--prompt`` random token ids, ``max_tokens=--new``, greedy)
until ``--duration`` seconds have passed (every stream finishes at least one request). Per level:
aggregate tokens/s = completion tokens (usage chunk) ÷ wall time of the level; time to first token =
request sent → first content chunk; inter-token latency = gaps between consecutive content chunks of a
stream; p50/p99 over all requests / gaps of the level.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.generation import generate
from moeflow.models.quant import model_bytes, quantize_int8
from moeflow.models.serving import Engine, SamplingParams


def log(msg: str) -> None:
    print(msg, flush=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ============================================================================ engine vs generate
def bench_generate(model, prompts, new: int, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    out = generate(model, prompts, new)
    _sync(device)
    return sum(len(x) for x in out.tokens) / (time.perf_counter() - t)


def bench_engine(model, prompts, new: int, device: str, max_batch: int, stagger: int = 0) -> float:
    engine = Engine(model, max_batch=max_batch, prefill_chunk=512)
    pending = list(enumerate(prompts))
    made = step = 0
    _sync(device)
    t = time.perf_counter()
    while pending or engine.has_work():
        while pending and (stagger == 0 or step % stagger == 0):
            i, p = pending.pop(0)
            engine.add(str(i), p, SamplingParams(max_tokens=new, temperature=0.0))
            if stagger:
                break
        made += sum(ev.token_id is not None for ev in engine.step())
        step += 1
    _sync(device)
    return made / (time.perf_counter() - t)


def engine_main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset).replace(max_seq_len=max(256, args.prompt + args.new + 8))
    dtype = getattr(torch, args.dtype)
    model = MoETransformer(cfg).to(args.device, dtype).eval()
    models = {"bf16/fp32": model}
    if args.quantize == "int8":
        q = copy.deepcopy(model)
        quantize_int8(q)
        models["int8"] = q
    rows = []
    for label, m in models.items():
        for b in (int(x) for x in args.batches.split(",")):
            g = torch.Generator().manual_seed(b)
            prompts = [torch.randint(1, cfg.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(b)]
            bench_engine(m, prompts[:1], 4, args.device, b)  # warm-up
            row = {"weights": label, "batch": b, "weight_bytes": model_bytes(m),
                   "generate_tok_s": round(bench_generate(m, prompts, args.new, args.device), 1),
                   "engine_tok_s": round(bench_engine(m, prompts, args.new, args.device, b), 1),
                   "engine_staggered_tok_s": round(bench_engine(m, prompts * 4, args.new, args.device, b,
                                                                args.stagger), 1)}
            rows.append(row)
            log(json.dumps(row))
    _write(args.out, [{**vars(args), **row} for row in rows])


# ============================================================================ the exported model
def make_export(directory: Path, preset: str, dtype: torch.dtype, tokenizer_path: str | None, max_seq_len: int) -> Path:
    """``export_hf`` of a random ``preset`` model (routing biases too) with a tokenizer of its vocabulary."""
    from moeflow.models.hf import export_hf
    from moeflow.models.tokenizer import Tokenizer, train_bpe

    cfg = ModelConfig.preset(preset)
    if tokenizer_path:
        tok = Tokenizer.from_file(tokenizer_path)
    else:  # small: train on this interpreter's standard library (seconds)
        import sysconfig

        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        tok = train_bpe((f.read_text(errors="ignore") for f in files), vocab_size=min(cfg.vocab_size, 2048),
                        min_frequency=1, max_train_bytes=4_000_000)
    if tok.vocab_size > cfg.vocab_size:
        raise SystemExit(f"tokenizer has {tok.vocab_size} ids, the {preset} model {cfg.vocab_size}")
    cfg = cfg.replace(max_seq_len=max_seq_len)
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for r in model.routers():
            r.e_score_correction_bias.normal_(0.0, 0.02)
    export_hf(model, directory, dtype=dtype, include_mtp=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
              pad_token_id=tok.pad_id)
    tok.save(Path(directory) / "tokenizer.json")
    return Path(directory)


# ============================================================================ the baseline server
class HFGenerateServer:
    """transformers ``generate`` behind the replica protocol of ``model_server.ModelServer`` (same gateway).

    A worker thread takes every request waiting when it is free as one batch (left-padded, greedy or
    sampled with the batch's first request's temperature), runs ``generate`` for the batch's largest
    ``max_tokens`` and streams each row's tokens as they come; a row's stream ends at its own
    ``max_tokens`` or end-of-sequence token.
    """

    def __init__(self, model_dir: str, device: str, dtype: torch.dtype, max_batch: int) -> None:
        import queue

        import transformers

        from moeflow.platform.serve.model_server import load_tokenizer

        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.device, self.max_batch = device, max_batch
        self.eos = self.tokenizer.eos_id
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    async def generate(self, payload: dict):
        prompt = payload.get("prompt")
        ids = self.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
        params = payload.get("params") or {}
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        self._queue.put((ids, params, loop, q))
        yield {"kind": "accepted", "num_prompt_tokens": len(ids), "prompt_ids": ids, "prompt_text": "",
               "replica": "hf"}
        while True:
            ev = await q.get()
            if isinstance(ev, BaseException):
                yield {"kind": "error", "status": 500, "message": str(ev), "param": None, "code": None,
                       "type": "server_error"}
                return
            yield ev
            if ev["finish_reason"] is not None:
                return

    def _run(self) -> None:
        import queue

        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._generate(batch)
            except Exception as err:  # noqa: BLE001 - every waiting client must hear about it
                for _, _, loop, q in batch:
                    loop.call_soon_threadsafe(q.put_nowait, err)

    def _generate(self, batch) -> None:
        from transformers.generation.streamers import BaseStreamer

        prompts = [b[0] for b in batch]
        P = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        max_new = [int(b[1].get("max_tokens") or 16) for b in batch]
        temperature = float(batch[0][1].get("temperature") or 0.0)
        made = [0] * len(batch)
        done = [m == 0 for m in max_new]
        tok = self.tokenizer
        outer = self

        class RowStreamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate passes the prompt first
                    self.first = False
                    return
                for r, t in enumerate(value.reshape(-1).tolist()):
                    if done[r]:
                        continue
                    made[r] += 1
                    reason = "stop" if t == outer.eos else ("length" if made[r] >= max_new[r] else None)
                    done[r] = reason is not None
                    ev = {"kind": "token", "token_ids": [t], "text": tok.decode([t], skip_special=True),
                          "finish_reason": reason, "num_generated": made[r], "logprobs": None, "tokens": None,
                          "tops": None, "prompt_logprobs": None}
                    loop, q = batch[r][2], batch[r][3]
                    loop.call_soon_threadsafe(q.put_nowait, ev)

            def end(self):
                for r, (_, _, loop, q) in enumerate(batch):
                    if not done[r]:
                        done[r] = True
                        loop.call_soon_threadsafe(q.put_nowait, {
                            "kind": "token", "token_ids": [], "text": "", "finish_reason": "length",
                            "num_generated": made[r], "logprobs": None, "tokens": None, "tops": None,
                            "prompt_logprobs": None})

        sample = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(max_new), pad_token_id=0,
                                eos_token_id=self.eos, streamer=RowStreamer(), **sample)


# ============================================================================ a stand-in engine
class StubEngine:
    """The ``Engine`` interface the serving loop uses, with a step that costs ``step_ms`` of waiting and no
    compute: token ids cycle through [300, 400), each is the text " t"; ``max_tokens`` ends a request."""

    def __init__(self, max_batch: int, step_ms: float) -> None:
        from collections import deque

        self.max_batch, self.step_s = max_batch, step_ms / 1e3
        self.lock = threading.Lock()
        self.inbox: deque = deque()
        self.cancelled: set[str] = set()
        self.running: dict[str, list] = {}  # id -> [max_tokens, made]
        self.context_len, self.vocab_size, self.decode = 1 << 20, 1 << 30, None
        self.decode_mode, self.static = "stub", None

    def add(self, request_id, prompt_ids, params) -> None:
        with self.lock:
            self.inbox.append((request_id, params.max_tokens))

    def cancel(self, request_id) -> None:
        with self.lock:
            self.cancelled.add(request_id)

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.inbox or self.running or self.cancelled)

    def num_running(self) -> int:
        return len(self.running)

    def num_waiting(self) -> int:
        return len(self.inbox)

    def step(self):
        from moeflow.models.serving import TokenOutput

        out = []
        with self.lock:
            while self.inbox and len(self.running) < self.max_batch:
                rid, n = self.inbox.popleft()
                self.running[rid] = [n, 0]
            cancelled, self.cancelled = self.cancelled, set()
        for rid in cancelled & set(self.running):
            del self.running[rid]
            out.append(TokenOutput(rid, None, finish_reason="cancelled"))
        time.sleep(self.step_s)
        for rid, st in list(self.running.items()):
            st[1] += 1
            done = st[1] >= st[0]
            out.append(TokenOutput(rid, 300 + st[1] % 100, text=" t", finish_reason="length" if done else None,
                                   num_generated=st[1]))
            if done:
                del self.running[rid]
        return out


def stub_engine_setup(max_batch: int, step_ms: float):
    """``ProcessEngine``'s setup of a ``StubEngine`` in the child (module level: it is pickled into the child)."""
    import functools

    return functools.partial(StubEngine, max_batch, step_ms)


# ============================================================================ one server process
def server_main(args) -> None:
    import uvicorn

    from moeflow.platform.serve.config import GatewayConfig, ServedModel
    from moeflow.platform.serve.gateway import Gateway, LocalBackend, create_app
    from moeflow.platform.serve.routing import LocalRouteStore, RouteTable

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.backend == "moeflow":
        from moeflow.platform.serve.model_server import ModelServer

        spec = ServedModel(name="bench", version="1", model_dir=args.model_dir,
                           engine={"max_batch": args.max_batch, "prefill_chunk": args.prefill_chunk,
                                   "context_len": args.context, "dtype": args.dtype, "device": args.device,
                                   "quantize": args.quantize, "max_waiting": 4096,
                                   "overlap": args.overlap, "gil_switch_ms": args.gil_switch_ms,
                                   "process": "on" if args.process else "off",
                                   **({"compile": "inductor"} if args.compile else {})})
        server = ModelServer(spec)
        if args.stub_step_ms and args.process:
            import functools

            from moeflow.platform.serve.engine_proc import ProcessEngine

            server.loop.close()
            server.loop = ProcessEngine(functools.partial(stub_engine_setup, args.max_batch, args.stub_step_ms),
                                        max_batch=args.max_batch, max_waiting=4096)
        elif args.stub_step_ms:
            server.loop.engine = StubEngine(args.max_batch, args.stub_step_ms)
        if args.process:
            i = server.loop.info
            info = {"stub_step_ms": args.stub_step_ms, "decode_mode": i["decode_mode"], "overlap": i["overlap"],
                    "graphs": i["num_graphs"], "engine_pid": i["pid"]}
        else:
            info = {"stub_step_ms": args.stub_step_ms, "decode_mode": server.loop.engine.decode_mode,
                    "overlap": getattr(server.loop.engine, "overlap", None),
                    "graphs": server.loop.engine.static.num_graphs if server.loop.engine.static else 0}
    else:
        server = HFGenerateServer(args.model_dir, args.device, dtype, args.max_batch)
        info = {}
    table = RouteTable(versions={"bench": ["1"]}, aliases={"bench": {"champion": "1"}})
    gw = Gateway(GatewayConfig(port=args.port, max_inflight=4096, max_tokens_cap=args.context), LocalRouteStore(table),
                 LocalBackend({"bench@1": server}))
    log(json.dumps({"server": args.backend, "load_s": round(time.perf_counter() - t0, 1), **info}))
    uvicorn.run(create_app(gw), host="127.0.0.1", port=args.port, log_level="warning", lifespan="off")


# ============================================================================ the load
async def one_stream(session, url: str, body: dict, results: list) -> None:
    t0 = time.perf_counter()
    first = last = None
    gaps, chunks, tokens, error = [], 0, 0, None
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            error = f"{resp.status}: {(await resp.text())[:200]}"
        else:
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    error = str(data["error"])[:200]
                    continue
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if any(c.get("text") for c in data.get("choices", [])):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
                    chunks += 1
    results.append({"ttft": None if first is None else first - t0, "gaps": gaps, "tokens": tokens,
                    "chunks": chunks, "e2e": time.perf_counter() - t0, "error": error})


async def run_level(base: str, concurrency: int, duration: float, prompt_len: int, new: int, vocab: int,
                    seed: int) -> dict:
    import aiohttp
    import random

    rng = random.Random(seed)
    url = f"{base}/v1/completions"
    results: list = []
    deadline = time.perf_counter() + duration

    async def stream_loop(session):
        while True:
            body = {"model": "bench", "prompt": [rng.randrange(300, vocab) for _ in range(prompt_len)],
                    "max_tokens": new, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}}
            await one_stream(session, url, body, results)
            if time.perf_counter() > deadline:
                return

    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(stream_loop(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    gaps = sorted(g for r in ok for g in r["gaps"])
    tokens = sum(r["tokens"] for r in ok)

    def pct(xs, q):
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else None

    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "first_error": next((r["error"] for r in results if r["error"]), None),
            "wall_s": round(wall, 2), "completion_tokens": tokens, "tok_s": round(tokens / wall, 1),
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "itl_p50_ms": pct(gaps, 0.5), "itl_p99_ms": pct(gaps, 0.99),
            "tokens_per_chunk": round(tokens / max(1, sum(r["chunks"] for r in ok)), 3),
            "e2e_p50_s": round(statistics.median(r["e2e"] for r in ok), 3) if ok else None}


def engine_peer(model_dir: Path, args, concurrency: int, vocab: int) -> dict:
    """The engine alone on the served export: ``concurrency`` requests at once, greedy, ``--new`` tokens each."""
    import random

    from moeflow.models.hf import import_hf

    model = import_hf(model_dir, dtype=getattr(torch, args.dtype), device=args.device, include_mtp=False).eval()
    rng = random.Random(concurrency)
    prompts = [[rng.randrange(300, vocab) for _ in range(args.prompt)] for _ in range(concurrency)]
    mode = "graph" if args.device.startswith("cuda") else "eager"
    engine = Engine(model, max_batch=args.max_batch, context_len=args.context, prefill_chunk=args.prefill_chunk,
                    decode_mode=mode)
    engine.warmup()
    for warm in (True, False):
        for i, p in enumerate(prompts[:4] if warm else prompts):
            engine.add(f"{warm}{i}", p, SamplingParams(max_tokens=4 if warm else args.new, temperature=0.0))
        made = 0
        _sync(args.device)
        t, cpu0 = time.perf_counter(), time.process_time()
        while engine.has_work():
            made += sum(ev.token_id is not None for ev in engine.step())
        _sync(args.device)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu0
    return {"concurrency": concurrency, "requests": concurrency, "errors": 0, "wall_s": round(wall, 2),
            "completion_tokens": made, "tok_s": round(made / wall, 1),
            "server_cpu_ms_per_token": round(1000 * cpu / max(1, made), 3)}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``): what the server spent, whatever
    else the machine runs, so the API's cost per token can be compared with the engine's on a loaded machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (``/proc/<pid>/task/<tid>/children``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _tree_cpu_s(pid: int) -> tuple[float, float]:
    """(CPU seconds of ``pid`` and its descendants — a process engine's child too —, of ``pid`` alone)."""
    own = _cpu_s(pid)
    return own + sum(_cpu_s(k) for k in _descendants(pid)), own


def wait_healthy(base: str, proc, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"no /health from {base} within {timeout:.0f} s")


def http_main(args) -> None:
    if args.smoke:
        args.preset, args.levels, args.duration, args.new, args.prompt = "tiny", "1,4", 1.0, 8, 8
        args.device, args.dtype, args.max_batch, args.context = "cpu", "float32", 8, 64
    if args.overhead:
        args.preset, args.levels, args.new, args.prompt, args.backends = "tiny", "8,32,64", 64, 16, "moeflow"
        args.device, args.dtype, args.max_batch, args.context, args.engine_peer = "cpu", "float32", 64, 128, True
    cuda = args.device.startswith("cuda")
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model_dir = make_export(work / "model", args.preset, getattr(torch, args.dtype), args.tokenizer, args.context)
    vocab = ModelConfig.preset(args.preset).vocab_size
    levels = [int(x) for x in args.levels.split(",")]
    compiled = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    servers = [(b, q, None, c, "auto", None, False) for b in args.backends.split(",") if b
               for q in (["none", "int8"] if (b == "moeflow" and args.int8) else ["none"])
               for c in (compiled if (b == "moeflow" and q == "none") else [False])]
    bf16_ours = [s for s in servers if s[0] == "moeflow" and s[1] == "none"]
    if args.overlap_peer:  # the same bf16 servers with the overlap off, in the same run
        servers += [(b, q, p, c, "off", None, False) for b, q, p, c, _, _, _ in bf16_ours]
    if args.gil_switch_peer:  # ... and with a shorter GIL switch interval
        servers += [(b, q, p, c, o, args.gil_switch_peer, False) for b, q, p, c, o, _, _ in bf16_ours]
    if args.process_peer:  # ... and with the engine in its own process
        servers += [(b, q, p, c, o, None, True) for b, q, p, c, o, _, _ in bf16_ours]
    if args.old_pythonpath:
        servers.append(("moeflow", "none", args.old_pythonpath, False, "auto", None, False))
    procs = {}
    rows = []
    try:
        # every server loads at once (one GPU holds them all); the load then runs on one at a time,
        # level by level, so each level's rows of every server come from the same minutes of the run
        for backend, quantize, pythonpath, compile_, overlap, switch_ms, process in servers:
            port = _free_port()
            cmd = [sys.executable, __file__, "server", "--backend", backend, "--model-dir", str(model_dir),
                   "--port", str(port), "--device", args.device, "--dtype", args.dtype, "--max-batch",
                   str(args.max_batch), "--prefill-chunk", str(args.prefill_chunk), "--context", str(args.context),
                   "--quantize", quantize, "--stub-step-ms", str(args.stub_step_ms)] + (["--compile"] if compile_ else [])
            cmd += ["--overlap", overlap] if not pythonpath else []
            cmd += ["--gil-switch-ms", str(switch_ms)] if switch_ms else []
            cmd += ["--process"] if process else []
            label = (backend + ("" if quantize == "none" else f" {quantize}") + (" compiled" if compile_ else "")
                     + (" no-overlap" if overlap == "off" else "") + (f" switch {switch_ms} ms" if switch_ms else "")
                     + (" process" if process else "")
                     + (" (old)" if pythonpath else ""))
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"PYTHONPATH": pythonpath} if pythonpath else {})}
            procs[label] = (subprocess.Popen(cmd, env=env), f"http://127.0.0.1:{port}")
        for label, (proc, base) in procs.items():
            wait_healthy(base, proc, args.start_timeout)
            asyncio.run(run_level(base, min(4, levels[-1]), 0.0, args.prompt, 4, vocab, 0))  # warm-up
        for c in levels:
            for label, (proc, base) in procs.items():
                duration = args.duration if label.startswith("moeflow") else args.baseline_duration
                cpu0, main0 = _tree_cpu_s(proc.pid)
                row = {"bench": "http", "server": label, "preset": args.preset, "prompt_len": args.prompt,
                       "max_tokens": args.new, "stub_step_ms": args.stub_step_ms,
                       **asyncio.run(run_level(base, c, duration, args.prompt, args.new, vocab, c))}
                cpu1, main1 = _tree_cpu_s(proc.pid)
                row["server_cpu_ms_per_token"] = round(1000 * (cpu1 - cpu0) / max(1, row["completion_tokens"]), 3)
                row["main_cpu_ms_per_token"] = round(1000 * (main1 - main0) / max(1, row["completion_tokens"]), 3)
                log(json.dumps(row))
                _write(args.out, [row])
                rows.append(row)
            if args.engine_peer:
                row = {"bench": "http", "server": "engine alone", "preset": args.preset, "prompt_len": args.prompt,
                       "max_tokens": args.new, **engine_peer(model_dir, args, c, vocab)}
                log(json.dumps(row))
                _write(args.out, [row])
                rows.append(row)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    log("\n| server | streams | tok/s | server CPU ms / token (all / main process) | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | tokens per chunk | requests | errors |")
    log("| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        log(f"| {r['server']} | {r['concurrency']} | {r['tok_s']:,.0f} | {r.get('server_cpu_ms_per_token')} / "
            f"{r.get('main_cpu_ms_per_token')} | "
            f"{r.get('ttft_p50_ms')} / {r.get('ttft_p99_ms')} | "
            f"{r.get('itl_p50_ms')} / {r.get('itl_p99_ms')} | {r.get('tokens_per_chunk')} | {r['requests']} | "
            f"{r['errors']} |")
    if cuda:
        log(f"# device: {torch.cuda.get_device_name()}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("engine", help="engine vs generate, no HTTP")
    e.add_argument("--preset", default="tiny")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.add_argument("--batches", default="1,8")
    e.add_argument("--prompt", type=int, default=32)
    e.add_argument("--new", type=int, default=64)
    e.add_argument("--stagger", type=int, default=4)
    e.add_argument("--quantize", default="none", choices=["none", "int8"])
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--out", default=None)
    for name in ("http", "server"):
        h = sub.add_parser(name, help="HTTP API, ours vs transformers" if name == "http" else "(internal) one server")
        h.add_argument("--preset", default="bench_ref")
        h.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        h.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
        h.add_argument("--max-batch", type=int, default=128, help="decode slots (ours) / largest batch (baseline)")
        h.add_argument("--prefill-chunk", type=int, default=2048)
        h.add_argument("--context", type=int, default=256)
        h.add_argument("--quantize", default="none", choices=["none", "int8"])
        if name == "server":
            h.add_argument("--compile", action="store_true", help="the engine's decode step compiled (inductor)")
            h.add_argument("--overlap", default="auto", choices=["auto", "on", "off"], help="EngineConfig.overlap")
            h.add_argument("--gil-switch-ms", type=float, default=None, help="EngineConfig.gil_switch_ms")
            h.add_argument("--process", action="store_true",
                           help="EngineConfig.process=on: the engine in a child process (without it: off, a thread)")
            h.add_argument("--stub-step-ms", type=float, default=0.0)
            h.add_argument("--backend", required=True, choices=["moeflow", "transformers"])
            h.add_argument("--model-dir", required=True)
            h.add_argument("--port", type=int, required=True)
        else:
            h.add_argument("--levels", default="1,8,32,128")
            h.add_argument("--prompt", type=int, default=64)
            h.add_argument("--new", type=int, default=128)
            h.add_argument("--duration", type=float, default=8.0, help="seconds per level (ours)")
            h.add_argument("--baseline-duration", type=float, default=0.0,
                           help="seconds per level (transformers; 0 = one request per stream)")
            h.add_argument("--backends", default="moeflow,transformers")
            h.add_argument("--int8", action="store_true", help="also serve the INT8 model (ours)")
            h.add_argument("--gil-switch-peer", type=float, default=None, metavar="MS",
                           help="also each bf16 moeflow server with EngineConfig.gil_switch_ms = MS (same run)")
            h.add_argument("--overlap-peer", action="store_true",
                           help="also each bf16 moeflow server with EngineConfig.overlap off (same run)")
            h.add_argument("--process-peer", action="store_true",
                           help="also each bf16 moeflow server with the engine in its own process (same run)")
            h.add_argument("--tokenizer", default=None, help="tokenizer.json of the model's vocabulary")
            h.add_argument("--start-timeout", type=float, default=300)
            h.add_argument("--smoke", action="store_true")
            h.add_argument("--compile", default="no", choices=["no", "yes", "both"],
                           help="ours with the engine's decode step compiled (inductor), or both ours")
            h.add_argument("--overhead", action="store_true", help="CPU: the API vs the engine alone (see above)")
            h.add_argument("--engine-peer", action="store_true", help="also the engine alone at each level")
            h.add_argument("--old-pythonpath", default=None, help="also serve moeflow from this package root")
            h.add_argument("--stub-step-ms", type=float, default=0.0, help="ours: StubEngine steps (see above)")
            h.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    {"engine": engine_main, "http": http_main, "server": server_main}[args.cmd](args)


if __name__ == "__main__":
    main()
