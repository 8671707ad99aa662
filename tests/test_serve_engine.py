"""Continuous-batching engine: every request computes what generate() computes for it alone.

Requests of different prompt lengths join mid-way (more requests than slots), prompts are
prefilled in chunks, the slot cache is small enough to be compacted several times; greedy and
seeded sampling must still equal ``generate`` on each prompt alone, token for token. Plus stop
rules, cancellation, log-probabilities and the text stream (UTF-8 and stop strings).
"""

from __future__ import annotations

import pytest
import torch

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models.generation import generate
from moeflow.models.serving import Engine, EngineOverloaded, RequestError, SamplingParams, TextStream
from moeflow.models.serving.detok import OneTokenMemo

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def model() -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=128, init_std=0.08, max_seq_len=64)  # peaky: no near-ties
    m = MoETransformer(cfg).eval()
    with torch.no_grad():
        for router in m.routers():
            router.e_score_correction_bias.normal_(0.0, 0.05)
    return m


def _prompts(lengths, seed=3, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def _drain(engine: Engine, max_steps: int = 500) -> dict[str, list]:
    events: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return events
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    raise AssertionError("engine did not finish")


def _tokens(evs) -> list[int]:
    return [e.token_id for e in evs if e.token_id is not None]


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_int8_engine_decodes_per_slot_and_equals_whole_stack_generate(model, mode):
    """INT8 weights: the engine's decode steps (≤ 3 rows × K = 2 < E = 8 slots) take the per-slot expert
    gather, its prefill chunks (8 tokens) the whole (grouped, as on the GPU) stack; the tokens equal
    generate() forced onto the whole stack (the path before the per-slot gather existed)."""
    import copy

    from moeflow.models.quant import Int8RoutedExperts, quantize_int8

    q = copy.deepcopy(model)
    quantize_int8(q)
    for m in q.modules():
        if isinstance(m, Int8RoutedExperts):
            m.use_grouped_mm = True  # the GPU's whole-stack path, beside which auto takes the per-slot gather
    prompts = _prompts((3, 17, 1, 9))
    engine = Engine(q, max_batch=3, prefill_chunk=8, decode_mode=mode)
    for i, prompt in enumerate(prompts):
        engine.add(f"r{i}", prompt, SamplingParams(max_tokens=16, **GREEDY))
    calls = []
    layer = next(m for m in q.modules() if isinstance(m, Int8RoutedExperts))
    slot_path = layer._slot_path
    layer._slot_path = lambda x, idx: calls.append(slot_path(x, idx)) or calls[-1]
    with torch.inference_mode():
        events = _drain(engine)
    assert True in calls and False in calls  # both paths ran
    Int8RoutedExperts.use_slot_gather = False
    try:
        for i, prompt in enumerate(prompts):
            assert _tokens(events[f"r{i}"]) == generate(q, [prompt], 16).tokens[0], f"request {i}"
    finally:
        Int8RoutedExperts.use_slot_gather = None


@pytest.mark.parametrize("mode,overlap", [("eager", False), ("static", False), ("eager", True), ("static", True)])
def test_greedy_equals_generate_with_joins_chunks_and_compaction(model, mode, overlap):
    lengths = (3, 17, 1, 30, 9, 24)
    prompts = _prompts(lengths)
    n_new = 30
    # 3 slots for 6 requests, 8-token prefill chunks, a 65-column cache for a 64-token context:
    # requests wait, join mid-way, and the cursor is rebased several times. "static" runs the
    # bucketed steps that CUDA graphs capture (graphs.py), eagerly: 3 rows -> bucket 4 > 3 slots is
    # not allowed, so buckets 1, 2, 3; widths 8, 16, 32, 64, 65.
    engine = Engine(model, max_batch=3, prefill_chunk=8, cache_len=65, decode_mode=mode, overlap=overlap)
    if mode == "static":
        engine.static.width_buckets = [8, 16, 32, 64, 65]
    events: dict[str, list] = {}
    for i in range(3):
        engine.add(f"r{i}", prompts[i], SamplingParams(max_tokens=n_new, **GREEDY))
    for step in range(400):
        if step == 4:  # the rest join while the first ones decode
            for i in range(3, 6):
                engine.add(f"r{i}", prompts[i], SamplingParams(max_tokens=n_new, **GREEDY))
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
        if step > 4 and not engine.has_work():
            break
    assert engine.slots.num_compactions >= 1 and engine.slots.num_rebases >= 2, "the test should exercise cache compaction"
    for i, prompt in enumerate(prompts):
        ref = generate(model, [prompt], n_new).tokens[0]
        assert _tokens(events[f"r{i}"]) == ref, f"request {i} (prompt length {len(prompt)})"
        assert events[f"r{i}"][-1].finish_reason == "length"
    assert engine.slots.num_live() == 0


@pytest.mark.parametrize("mode,overlap", [("eager", False), ("static", False), ("static", True)])
def test_seeded_sampling_equals_generate_alone_whatever_the_neighbours(model, mode, overlap):
    prompts = _prompts((5, 11, 2))
    params = dict(temperature=0.9, top_k=20, top_p=0.9)
    engine = Engine(model, max_batch=4, prefill_chunk=4, decode_mode=mode, overlap=overlap)
    for i, p in enumerate(prompts):
        engine.add(f"s{i}", p, SamplingParams(max_tokens=10, seed=100 + i, **params))
    engine.add("noise", prompts[0], SamplingParams(max_tokens=10, temperature=1.5))
    events = _drain(engine)
    for i, p in enumerate(prompts):
        ref = generate(model, [p], 10, seed=100 + i, **params).tokens[0]
        assert _tokens(events[f"s{i}"]) == ref


def test_short_prompts_prefill_in_one_batched_call_and_still_equal_generate(model):
    prompts = _prompts((3, 12, 7, 1, 9))
    engine = Engine(model, max_batch=8, prefill_chunk=64)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    try:
        for i, p in enumerate(prompts):
            engine.add(f"r{i}", p, SamplingParams(max_tokens=12, **GREEDY))
        first = engine.step()
    finally:
        hook.remove()
    assert calls == [(5, 12)], "five whole prompts: one left-padded call of 5 rows x the longest prompt"
    assert {e.request_id for e in first} == {f"r{i}" for i in range(5)}, "each gets its first token at once"
    events = _drain(engine)
    for i, p in enumerate(prompts):
        assert _tokens([e for e in first if e.request_id == f"r{i}"] + events[f"r{i}"]) == generate(
            model, [p], 12).tokens[0]


def test_static_decode_buckets_rows_and_columns(model):
    from moeflow.models.serving.graphs import bucket_for, buckets_up_to

    assert buckets_up_to(32) == [1, 2, 4, 8, 16, 32] and buckets_up_to(48, 16) == [16, 32, 48]
    assert bucket_for(5, [1, 2, 4, 8]) == 8 and bucket_for(1, [1, 2]) == 1
    with pytest.raises(ValueError):
        bucket_for(9, [1, 2, 4, 8])
    engine = Engine(model, max_batch=6, decode_mode="static", cache_len=100)
    assert engine.static.batch_buckets == [1, 2, 4, 6] and engine.static.width_buckets == [64, 100]
    assert engine.static.bucket(5, 63) == (6, 64) and engine.static.bucket(1, 64) == (1, 100)
    with pytest.raises(ValueError, match="decode_mode"):
        Engine(model, decode_mode="fast")
    with pytest.raises(ValueError, match="CUDA"):
        Engine(model, decode_mode="graph")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_equals_generate_on_the_gpu(model):
    """The captured decode (bf16, grouped experts) against generate() on the same GPU model, token for token."""
    gpu = MoETransformer(model.cfg).to("cuda", torch.bfloat16).eval()
    gpu.load_state_dict(model.state_dict())
    lengths = (3, 17, 1, 30, 9, 24)
    prompts = _prompts(lengths)
    engine = Engine(gpu, max_batch=3, prefill_chunk=8, cache_len=65)
    assert engine.decode_mode == "graph"
    for i, p in enumerate(prompts):
        engine.add(f"r{i}", p, SamplingParams(max_tokens=30, **GREEDY))
    events = _drain(engine)
    assert engine.static.num_graphs >= 2 and engine.static.num_replays > 30 and engine.slots.num_compactions >= 1
    for i, p in enumerate(prompts):
        assert _tokens(events[f"r{i}"]) == generate(gpu, [p], 30).tokens[0], f"request {i}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_cuda_graph_engine_equals_generate_on_the_gpu(model):
    """The INT8 model (bf16 activations) on the GPU: the captured decode steps (≤ 3 rows × K = 2 < E = 8 slots:
    the per-slot expert gather inside the graphs) against generate() on the same model, token for token."""
    from moeflow.models.quant import Int8RoutedExperts, quantize_int8

    gpu = MoETransformer(model.cfg).to("cuda", torch.bfloat16).eval()
    gpu.load_state_dict(model.state_dict())
    quantize_int8(gpu)
    layer = next(m for m in gpu.modules() if isinstance(m, Int8RoutedExperts))
    prompts = _prompts((3, 17, 1, 30, 9, 24))
    engine = Engine(gpu, max_batch=3, prefill_chunk=8, cache_len=65)
    assert engine.decode_mode == "graph"
    x = torch.zeros(3, model.cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    assert layer._slot_path(x, torch.zeros(3, model.cfg.num_experts_per_tok, dtype=torch.long, device="cuda"))
    for i, p in enumerate(prompts):
        engine.add(f"r{i}", p, SamplingParams(max_tokens=30, **GREEDY))
    events = _drain(engine)
    assert engine.static.num_graphs >= 2 and engine.static.num_replays > 30
    for i, p in enumerate(prompts):
        assert _tokens(events[f"r{i}"]) == generate(gpu, [p], 30).tokens[0], f"request {i}"


def _compiled_vs_eager_static(model, backend: str) -> None:
    """The engine's static step compiled by ``backend`` against the eager static step ON THE SAME INPUTS at
    every decode step of a run with joins, several (rows, columns) buckets and compaction: each step runs
    the compiled step first (its cache writes and counters undone by the eager step that follows and
    drives the run), and the two logits must agree to bf16 rounding, with the same argmax on (nearly) every
    row (a router near-tie may flip a rare row's expert choice). Teacher-forced, because in bf16 a whole greedy trajectory flips at the first near-tie (rounding,
    not a bug: the eager static step and ``generate`` disagree the same way in bf16).
    The model is the GPU's (bf16, grouped-GEMM experts; ``torch._grouped_mm`` also runs on the CPU, in bf16):
    the CPU's fp32 per-expert loop syncs on the host, a graph break the GPU path does not have."""
    import copy

    from moeflow.models.serving.graphs import StaticDecoder

    model = copy.deepcopy(model).to(torch.bfloat16)
    for m in model.modules():
        if hasattr(m, "use_grouped_mm"):
            m.use_grouped_mm = True
    engine = Engine(model, max_batch=3, prefill_chunk=8, cache_len=65, decode_mode="static")
    engine.static.width_buckets = [16, 32, 65]
    compiled = StaticDecoder(model, engine.slots, capture=False, compile=backend, tokens_B=engine.next_tok_B,
                             batch_buckets=engine.static.batch_buckets, width_buckets=engine.static.width_buckets)
    eager_run, cache = engine.static.run, engine.slots.cache
    diffs, same, rows, buckets = [], 0, 0, set()

    def both(real, cursor):
        before = cache.num_real_B.clone()
        logits_c = compiled.run(real, cursor)[: len(real)].float()
        cache.num_real_B.copy_(before)
        logits_e = eager_run(real, cursor)
        live = torch.tensor(real)
        e = logits_e[: len(real)].float()[live]
        scale = e.abs().amax(-1)
        diff = (logits_c[live] - e).abs().amax(-1) / scale
        diffs.extend(diff.tolist())  # per row
        top2 = e.topk(2, -1).values
        clear = ((top2[:, 0] - top2[:, 1]) / scale > 0.03) & (diff < 0.03)  # no near-tie, no expert flip
        nonlocal same, rows
        same += int((logits_c[live].argmax(-1) == e.argmax(-1))[clear].sum())
        rows += int(clear.sum())
        buckets.add(engine.static.bucket(len(real), cursor))
        return logits_e

    engine.static.run = both
    for i, p in enumerate(_prompts((3, 17, 1, 30, 9, 24))):
        engine.add(f"r{i}", p, SamplingParams(max_tokens=30, **GREEDY))
    _drain(engine)
    assert engine.slots.num_compactions >= 1 and len(buckets) >= 4 and rows > 50
    # a row whose router top-k sits on a near-tie may pick another expert (rounding): rare, large; the rest
    # agree to bf16 rounding (~1 % of the logits' scale)
    close = sum(d < 0.03 for d in diffs)
    assert close >= 0.95 * len(diffs), f"only {close} of {len(diffs)} rows' logits agree to 3 % (worst {max(diffs):.3f})"
    assert same == rows, f"the argmax differs on {rows - same} of {rows} rows without a near-tie"


@pytest.mark.slow
def test_inductor_compiled_engine_step_equals_the_eager_step_on_the_cpu(model):
    """The real compiler (inductor, C++ on the CPU) on the engine's bucketed decode step."""
    torch._dynamo.reset()
    _compiled_vs_eager_static(model, "inductor")


@pytest.mark.slow
def test_compiled_engine_step_equals_the_eager_step(model):
    """The same wiring with dynamo's aot_eager backend (traced and functionalized, no code generation)."""
    torch._dynamo.reset()
    _compiled_vs_eager_static(model, "aot_eager")


def test_compile_option_wires_the_compiled_step_into_the_static_decoder(model):
    """Fast: which step the engine runs (the compiled wrapper of ``compile_decode_step``, or the model), and the
    refusal of compile with the eager step; the slow tests above run the compiled step."""
    engine = Engine(model, max_batch=2, decode_mode="static", compile="aot_eager")
    assert isinstance(engine.static._fn, torch._dynamo.eval_frame.OptimizedModule)
    assert engine.static._fn._orig_mod is model and engine.static.compile == "aot_eager"
    assert Engine(model, max_batch=2, decode_mode="static").static._fn is model
    with pytest.raises(ValueError, match="compile needs"):
        Engine(model, decode_mode="eager", compile="inductor")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_graph_engine_equals_generate_on_the_gpu(model):
    """The compiled step captured in CUDA graphs (the fast serving path) against generate(), token for token.

    Every expert is routed to every token (k = E): inductor's bf16 rounding differs from the eager model's, and
    with k < E a router near-tie can then pick another expert and part the outputs far from any output near-tie,
    which says nothing about the engine (on an H100 the fixture's k = 2 of 8 parted at a logit gap of 0.445; not
    checked whether a routing flip did it). With k = E the routing cannot flip, so only output near-ties may."""
    torch.manual_seed(0)
    cfg = model.cfg.replace(num_experts_per_tok=model.cfg.num_routed_experts)
    gpu = MoETransformer(cfg).to("cuda", torch.bfloat16).eval()
    prompts = _prompts((3, 17, 1, 30, 9, 24))
    engine = Engine(gpu, max_batch=3, prefill_chunk=8, cache_len=65, compile="inductor")
    assert engine.decode_mode == "graph" and engine.warmup() == engine.static.num_graphs >= 4
    for i, p in enumerate(prompts):
        engine.add(f"r{i}", p, SamplingParams(max_tokens=30, **GREEDY))
    events = _drain(engine)
    assert engine.static.num_replays > 30 and engine.slots.num_compactions >= 1
    # inductor fuses the step's bf16 arithmetic differently from the eager model, so greedy decoding may
    # part ways where two logits tie within bf16 rounding; anywhere else the tokens must be equal
    for i, p in enumerate(prompts):
        got, want = _tokens(events[f"r{i}"]), generate(gpu, [p], 30).tokens[0]
        j = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if j is None:
            assert len(got) == len(want), f"request {i}"
            continue
        with torch.no_grad():
            logits_V = gpu(torch.tensor([list(p) + want[:j]], device="cuda")).logits[0, -1].float()
        gap = float(logits_V[want[j]] - logits_V[got[j]])
        assert gap <= 0.03 * float(logits_V.abs().max()), f"request {i} parts at token {j} without a near-tie ({gap:.3f})"


def test_long_prompt_prefills_in_chunks_without_stalling_a_running_stream(model):
    engine = Engine(model, max_batch=2, prefill_chunk=8)
    engine.add("stream", _prompts((4,))[0], SamplingParams(max_tokens=20, **GREEDY))
    engine.step()  # the stream is prefilled and has its first token
    engine.add("long", _prompts((40,), seed=9)[0], SamplingParams(max_tokens=2, **GREEDY))
    per_step = []
    for _ in range(6):
        per_step.append({ev.request_id for ev in engine.step()})
    assert all("stream" in ids for ids in per_step), "the running stream must get a token every step"
    first_long = next(i for i, ids in enumerate(per_step) if "long" in ids)
    assert first_long == 4, "40 prompt tokens at 8 per step: the first token comes with the 5th chunk"


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_token_and_max_tokens_free_the_slot(model, overlap):
    prompt = _prompts((6,))[0]
    ref = generate(model, [prompt], 8).tokens[0]
    stop = ref[3]
    engine = Engine(model, max_batch=1, overlap=overlap)
    engine.add("a", prompt, SamplingParams(max_tokens=8, stop_token_ids=(stop,), **GREEDY))
    engine.add("b", prompt, SamplingParams(max_tokens=2, **GREEDY))
    events = _drain(engine)
    cut = ref.index(stop) + 1
    assert _tokens(events["a"]) == ref[:cut] and events["a"][-1].finish_reason == "stop"
    assert _tokens(events["b"]) == ref[:2] and events["b"][-1].finish_reason == "length"


def test_cancel_frees_the_slot_at_the_next_step(model):
    engine = Engine(model, max_batch=1)
    prompt = _prompts((5,))[0]
    engine.add("a", prompt, SamplingParams(max_tokens=30, **GREEDY))
    engine.add("b", prompt, SamplingParams(max_tokens=3, **GREEDY))
    engine.step()
    engine.step()
    assert engine.num_running() == 1 and engine.num_waiting() == 1
    engine.cancel("a")
    events = engine.step()
    by_id = {e.request_id: e for e in events}
    assert by_id["a"].finish_reason == "cancelled"
    assert "b" in by_id and by_id["b"].token_id is not None, "b takes the freed slot in the same step"
    rest = _drain(engine)
    assert len(_tokens([by_id["b"]] + rest["b"])) == 3


@pytest.mark.parametrize("overlap", [False, True])
def test_logprobs_match_a_full_forward(model, overlap):
    prompt = _prompts((7,))[0]
    engine = Engine(model, max_batch=2, prefill_chunk=3, overlap=overlap)
    engine.add("x", prompt, SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=2, **GREEDY))
    evs = _drain(engine)["x"]
    toks = _tokens(evs)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + toks])).logits[0].float(), -1)
    plp = evs[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(prompt)
    for i in range(1, len(prompt)):
        assert plp[i][0] == pytest.approx(float(lp[i - 1, prompt[i]]), abs=1e-4)
        assert [t for t, _ in plp[i][1]] == lp[i - 1].topk(2).indices.tolist()
    for j, ev in enumerate(evs):
        pos = len(prompt) - 1 + j
        assert ev.logprob == pytest.approx(float(lp[pos, toks[j]]), abs=1e-4)
        assert ev.top_logprobs[0][0] == toks[j]  # greedy: the chosen token is the most likely
        assert len(ev.top_logprobs) == 3


def test_echo_only_request_with_zero_max_tokens(model):
    engine = Engine(model)
    engine.add("e", [1, 2, 3, 4], SamplingParams(max_tokens=0, prompt_logprobs=0))
    (ev,) = _drain(engine)["e"]
    assert ev.token_id is None and ev.finish_reason == "length" and len(ev.prompt_logprobs) == 4


def test_bad_requests_are_refused_at_add(model):
    engine = Engine(model, max_waiting=1)
    with pytest.raises(RequestError, match="maximum context length is 64"):
        engine.add("long", [1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="outside"):
        engine.add("vocab", [1, 999], SamplingParams())
    with pytest.raises(RequestError, match="empty"):
        engine.add("empty", [], SamplingParams())
    with pytest.raises(RequestError, match="logprobs"):
        engine.add("lp", [1], SamplingParams(logprobs=21))
    engine.add("ok", [1], SamplingParams())
    with pytest.raises(EngineOverloaded):
        engine.add("too-many", [1], SamplingParams())


def test_stop_strings_end_the_request_and_are_not_returned(model):
    prompt = _prompts((4,))[0]
    ref = generate(model, [prompt], 10).tokens[0]
    decode = lambda ids: "".join(chr(ord("a") + t % 26) for t in ids)  # one letter per token
    full = decode(ref)
    stop = full[4:6]
    engine = Engine(model, decode=decode)
    engine.add("s", prompt, SamplingParams(max_tokens=10, stop=(stop,), **GREEDY))
    evs = _drain(engine)["s"]
    text = "".join(e.text for e in evs)
    assert text == full[: full.index(stop)] and evs[-1].finish_reason == "stop"
    assert len(_tokens(evs)) == full.index(stop) + len(stop), "the slot is freed as soon as the stop appears"


# ---------------------------------------------------------------- TextStream
def _byte_decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_a_split_utf8_character():
    ts = TextStream(_byte_decode)
    out = [ts.push(b) for b in "aé€b".encode()]
    assert "".join(out) == "aé€b"
    assert out[1] == "" and out[3] == "" and out[4] == ""  # mid-character bytes release nothing


def test_text_stream_stop_string_across_tokens_and_flush():
    ts = TextStream(_byte_decode, stop=("STOP", "xyz"))
    out = "".join(ts.push(b) for b in b"hello ST")
    assert out == "hello " and not ts.stopped  # "ST" could start "STOP": held back
    out += "".join(ts.push(b) for b in b"OP more")
    assert out == "hello " and ts.stopped and ts.text == "hello "
    ts2 = TextStream(_byte_decode, stop=("STOP",))
    got = "".join(ts2.push(b) for b in b"a ST") + ts2.finish()
    assert got == "a ST"  # never completed: released at the end


@pytest.mark.parametrize("mode,overlap", [("eager", False), ("static", False), ("eager", True)])
def test_mixed_batch_each_request_equals_generate_alone_and_its_logprobs_a_full_forward(model, mode, overlap):
    # one decode batch mixing greedy, seeded samplers with different filters, log-probs of different n and a
    # stop token; "b" and "d" end early, so later steps sample rows with free slots between them
    prompts = _prompts((4, 9, 2, 6, 13, 3), seed=21)
    reqs = {
        "a": dict(max_tokens=12, **GREEDY),
        "b": dict(max_tokens=3, temperature=0.8, top_p=0.9, seed=7),
        "c": dict(max_tokens=12, temperature=1.2, top_k=5, seed=8, logprobs=2),
        "d": dict(max_tokens=2, temperature=0.6, seed=9, logprobs=0),
        "e": dict(max_tokens=12, logprobs=4, **GREEDY),
        "f": dict(max_tokens=8, temperature=1.0),  # unseeded
    }
    engine = Engine(model, max_batch=8, prefill_chunk=64, decode_mode=mode, overlap=overlap)
    for (rid, kw), p in zip(reqs.items(), prompts):
        engine.add(rid, p, SamplingParams(**kw))
    events = _drain(engine)
    for (rid, kw), p in zip(reqs.items(), prompts):
        if rid == "f":
            continue
        gen_kw = {k: v for k, v in kw.items() if k in ("temperature", "top_k", "top_p", "seed")}
        assert _tokens(events[rid]) == generate(model, [p], kw["max_tokens"], **gen_kw).tokens[0], rid
        if "logprobs" not in kw:
            continue
        toks = _tokens(events[rid])
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + toks])).logits[0].float(), -1)
        for j, ev in enumerate(events[rid]):
            row = lp[len(p) - 1 + j]
            assert ev.logprob == pytest.approx(float(row[toks[j]]), abs=1e-4)
            assert [t for t, _ in ev.top_logprobs] == row.topk(kw["logprobs"]).indices.tolist()


def test_one_token_memo_decodes_once_per_token_and_changes_no_text():
    calls = []

    def counting(ids):
        calls.append(list(ids))
        return _byte_decode(ids)

    data = "héllo STOP wörld".encode()
    plain = TextStream(_byte_decode, stop=("STOP",))
    memo = TextStream(OneTokenMemo(counting), stop=("STOP",))
    assert [memo.push(b) for b in data] == [plain.push(b) for b in data]
    assert memo.text == plain.text == "héllo " and memo.stopped
    calls.clear()
    ascii_stream = TextStream(OneTokenMemo(counting))
    out = "".join(ascii_stream.push(b) for b in b"abcabcabc") + ascii_stream.finish()
    assert out == "abcabcabc" and ascii_stream.text == out
    # one real decode per token after the first (the window "previous token + new one"); the single-token
    # windows before them are decoded once per distinct id ([], a, b, c) and then remembered
    assert len([c for c in calls if len(c) > 1]) == 8 and len([c for c in calls if len(c) <= 1]) == 4


# ------------------------------------------------------------------ overlap (launch step t+1 before reading step t)
def _count_reads(engine: Engine, monkeypatch) -> tuple[list, list]:
    """Record, at every read-back, how many decode steps had been launched; and the rows of every decode step."""
    from moeflow.models.serving import engine as engine_mod

    launched, reads, rows = [0], [], []
    original_decode, original_lists = engine._decode, engine_mod._Readback.lists

    def decode():
        before = len(engine._pending)
        original_decode()
        if len(engine._pending) > before:
            launched[0] += 1
            rows.append([s.request_id for s in engine._pending[-1].seqs])

    def lists(self):
        reads.append(launched[0])
        return original_lists(self)

    monkeypatch.setattr(engine, "_decode", decode)
    monkeypatch.setattr(engine_mod._Readback, "lists", lists)
    return reads, rows


def test_overlap_launches_the_next_decode_step_before_reading_the_last_one(model, monkeypatch):
    prompt = _prompts((5,))[0]
    engine = Engine(model, max_batch=2, decode_mode="static", overlap=True)
    reads, rows = _count_reads(engine, monkeypatch)
    engine.add("a", prompt, SamplingParams(max_tokens=6, **GREEDY))
    events = _drain(engine)
    assert _tokens(events["a"]) == generate(model, [prompt], 6).tokens[0]
    # read 0: the prefill's first token, after decode step 1 was launched; read k: decode step k, after step k+1
    # was launched; the 5th decode step's token is the 6th and last: nothing is launched after it
    assert reads == [1, 2, 3, 4, 5, 5], reads
    assert rows == [["a"]] * 5, "max_tokens is known ahead: no decode row past it"


def test_without_overlap_every_token_is_read_in_the_step_that_made_it(model, monkeypatch):
    engine = Engine(model, max_batch=2, decode_mode="static", overlap=False)
    reads, _ = _count_reads(engine, monkeypatch)
    engine.add("a", _prompts((5,))[0], SamplingParams(max_tokens=6, **GREEDY))
    _drain(engine)
    assert reads == [0, 1, 2, 3, 4, 5], reads


def test_overlap_wastes_at_most_one_row_after_a_stop_and_frees_the_slot(model, monkeypatch):
    prompt = _prompts((6,))[0]
    ref = generate(model, [prompt], 8).tokens[0]
    stop = ref[2]
    engine = Engine(model, max_batch=1, decode_mode="static", overlap=True)
    _, rows = _count_reads(engine, monkeypatch)
    engine.add("a", prompt, SamplingParams(max_tokens=8, stop_token_ids=(stop,), **GREEDY))
    engine.add("b", prompt, SamplingParams(max_tokens=3, **GREEDY))
    events = _drain(engine)
    cut = ref.index(stop) + 1
    assert _tokens(events["a"]) == ref[:cut] and events["a"][-1].finish_reason == "stop"
    assert _tokens(events["b"]) == ref[:3] and events["b"][-1].finish_reason == "length"
    # "a" gets cut - 1 decode rows for its tokens after the first, plus one launched before its stop was read
    assert sum(r == ["a"] for r in rows) == cut, rows
    assert engine.slots.num_live() == 0 and not engine.has_work()


def test_overlap_cancel_drops_the_token_in_flight_and_frees_the_slot(model):
    engine = Engine(model, max_batch=1, decode_mode="static", overlap=True)
    prompt = _prompts((5,))[0]
    engine.add("a", prompt, SamplingParams(max_tokens=30, **GREEDY))
    engine.add("b", prompt, SamplingParams(max_tokens=3, **GREEDY))
    first = [engine.step(), engine.step(), engine.step()]
    assert [len(evs) for evs in first] == [0, 1, 1], "a's first token is read one step after its prefill"
    engine.cancel("a")
    events = engine.step()
    assert [(e.request_id, e.finish_reason) for e in events] == [("a", "cancelled")], "a's token in flight is dropped"
    rest = _drain(engine)
    assert _tokens(rest["b"]) == generate(model, [prompt], 3).tokens[0]
    assert engine.slots.num_live() == 0
