"""Batched autoregressive generation over the latent (MLA) KV cache, with optional routing capture.

``generate(model, prompts, max_new_tokens, ...)`` takes prompts of different lengths, LEFT-pads them
to one length (so every row writes the same cache slot each step and one decode step is one
fixed-shape call), and passes ``attention_mask_BS`` so pads are never attended to and RoPE
positions count only real tokens: each row computes exactly what it would compute alone.

Decoding modes:
- cached (default): one prefill call with the whole padded prompt, then one call per new token on
  the model's absorbed-MLA path (``MLACache``: kv_lora_rank + rope_dim values per token per layer).
- ``use_cache=False``: a full forward over the whole sequence every step (the reference the tests
  compare the cache against; also what a model without a cache path would do).
- ``cuda_graph=True`` (CUDA, bf16 grouped-GEMM experts): the cache runs in its static mode
  (``cache_position`` on the device, attention over all slots under the mask) and one decode step
  is captured in a CUDA graph and replayed, which removes the per-kernel launch overhead that
  dominates batch-1 decode. Pass a ``CudaGraphPool`` instead of True to keep captured graphs (and
  optionally a ``torch.compile``d step) across calls. The host reads the stop flags back only every
  ``sync_every`` steps.

Sampling: temperature 0 = greedy (argmax); otherwise logits / temperature, then top-k, then top-p
(nucleus), then a multinomial draw from a ``torch.Generator`` seeded by ``seed``. The filters are
pure functions (``top_k_filter``, ``top_p_filter``) tested on hand-made logits.

Routing capture (``record_routing=True``): the expert ids each MoE layer chose for every token of
prompt + completion, per row a (P_b + N_b, num_moe_layers, K) int64 tensor — what an RL update needs
to replay the rollout's routing (``model(..., forced_routing=...)``). Capturing the last generated
token's routing costs one extra decode step.

Shape suffixes: B batch, P padded prompt length, T tokens in a call, V vocab, L MoE layers, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class GenerationResult:
    tokens: list[list[int]]                      # generated ids per prompt (the stop token included when hit)
    finish_reasons: list[str]                    # "stop" (a stop token was produced) | "length"
    num_prompt_tokens: list[int] = field(default_factory=list)
    routing: list[torch.Tensor] | None = None    # per prompt (P_b + N_b, L, K) int64 expert ids, on CPU
    logprobs: list[list[float]] | None = None    # per prompt, log-prob of each generated token (return_logprobs)


# ============================================================================ sampling (pure functions)

def top_k_filter(logits_BV: torch.Tensor, k: int | None) -> torch.Tensor:
    """Logits outside each row's k largest set to -inf (ties with the k-th value are kept)."""
    if k is None or k >= logits_BV.shape[-1]:
        return logits_BV
    if k <= 0:
        raise ValueError(f"top_k must be >= 1, got {k}")
    kth_B1 = torch.topk(logits_BV, k, dim=-1).values[..., -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))


def top_p_filter(logits_BV: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to >= p.

    A token is kept when the probability mass of the tokens ranked before it is < p, so the most
    likely token always survives.
    """
    if p is None or p >= 1.0:
        return logits_BV
    if not 0.0 < p:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
    probs_BV = torch.softmax(sorted_BV.float(), dim=-1)
    mass_before_BV = torch.cumsum(probs_BV, dim=-1) - probs_BV
    drop_sorted_BV = mass_before_BV >= p
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits_BV.argmax(dim=-1)
    filtered_BV = top_p_filter(top_k_filter(logits_BV.float() / temperature, top_k), top_p)
    probs_BV = torch.softmax(filtered_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


# ============================================================================ batching helpers

def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P), mask (B, P) bool, True = real token) with every prompt right-aligned."""
    P = max(len(p) for p in prompts)
    ids_BP = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(prompts), P), dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids_BP[b, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask_BP[b, P - len(p):] = True
    return ids_BP.to(device), mask_BP.to(device)


def _validate(prompts, max_new_tokens: int, vocab_size: int, pad_id: int) -> None:
    if not prompts:
        raise ValueError("generate: prompts is empty")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"generate: pad_id {pad_id} outside the vocabulary [0, {vocab_size})")
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {b} is empty (start it with a BOS token)")
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {b} has token ids outside [0, {vocab_size}): {bad[:5]}")


# ============================================================================ generate

@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_token_ids: Sequence[int] = (),
             seed: int | None = None, record_routing: bool = False, pad_id: int = 0, use_cache: bool = True,
             cuda_graph: bool | CudaGraphPool = False, sync_every: int = 16,
             return_logprobs: bool = False) -> GenerationResult:
    """Continue each prompt by up to ``max_new_tokens`` tokens; rows stop independently at a stop token.

    ``return_logprobs``: the fp32 log-prob of every generated token under the distribution it was drawn
    from before the top-k/top-p filters, softmax(logits / temperature) (raw logits when greedy) — what an
    RL update's importance ratio compares with (``models.align.rl.token_logprobs``).
    """
    cfg = model.cfg
    _validate(prompts, max_new_tokens, cfg.vocab_size, pad_id)
    device = model.lm_head.weight.device
    ids_BP, mask_BP = left_pad(prompts, pad_id, device)
    B, P = ids_BP.shape
    if record_routing and cfg.num_moe_layers == 0:
        raise ValueError("generate: record_routing needs a model with MoE layers")
    if cuda_graph and not (use_cache and device.type == "cuda"):
        raise ValueError("generate: cuda_graph=True needs use_cache=True and a CUDA model")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(sorted(set(int(s) for s in stop_token_ids)), dtype=torch.long, device=device)

    def pick(logits_BV: torch.Tensor) -> torch.Tensor:
        return sample_next(logits_BV, temperature, top_k, top_p, generator)

    if cuda_graph:
        pool = cuda_graph if isinstance(cuda_graph, CudaGraphPool) else None
        runner = _GraphDecoder(model, ids_BP, mask_BP, max_new_tokens + 1, record_routing, pool)
    else:
        runner = (_CachedDecoder if use_cache else _FullDecoder)(model, ids_BP, mask_BP, max_new_tokens + 1,
                                                                 record_routing)
    out_BN = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    length_B = torch.zeros(B, dtype=torch.long, device=device)  # tokens generated per row (stop included)
    logp_BN = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device) if return_logprobs else None
    logits_BV = runner.prefill()
    for step in range(max_new_tokens):
        was_done_B = done_B.clone()
        next_B = torch.where(was_done_B, out_BN[:, step], pick(logits_BV))  # out_BN holds pad_id
        out_BN[:, step] = next_B
        if logp_BN is not None:
            scaled_BV = logits_BV.float() / temperature if temperature > 0 else logits_BV.float()
            logp_BN[:, step] = torch.log_softmax(scaled_BV, dim=-1).gather(1, next_B[:, None]).squeeze(1)
        length_B += (~was_done_B).long()
        if stops.numel():
            done_B |= torch.isin(next_B, stops)
        # the host looks at the stop flags only every sync_every steps (each look is a device sync)
        finish = step == max_new_tokens - 1 or ((step + 1) % sync_every == 0 and bool(done_B.all()))
        if not finish or record_routing:  # a step after the last token only serves to record its routing
            logits_BV = runner.step(next_B, ~was_done_B)
        if finish:
            break
    lengths = length_B.tolist()
    tokens = [row[:n] for row, n in zip(out_BN.tolist(), lengths)]
    reasons = ["stop" if (n and stops.numel() and row[-1] in set(stops.tolist())) else "length"
               for row, n in zip(tokens, lengths)]
    routing = runner.routing_per_row(mask_BP, lengths) if record_routing else None
    logprobs = [row[:n] for row, n in zip(logp_BN.tolist(), lengths)] if logp_BN is not None else None
    return GenerationResult(tokens, reasons, [len(p) for p in prompts], routing, logprobs)


class _CachedDecoder:
    """Prefill + one absorbed-MLA step per token over a dynamic MLACache."""

    def __init__(self, model, ids_BP, mask_BP, max_steps: int, record: bool) -> None:
        self.model, self.ids_BP, self.record = model, ids_BP, record
        B, P = ids_BP.shape
        self.cache = model.new_cache(B, P + max_steps)
        self.mask_BS = torch.zeros(B, P + max_steps, dtype=torch.bool, device=ids_BP.device)
        self.mask_BS[:, :P] = mask_BP
        self.len = P
        self.routes: list[torch.Tensor] = []  # each (L, B, T, K)

    def _call(self, ids_BT: torch.Tensor, **kw) -> torch.Tensor:
        out = self.model(ids_BT, last_logits_only=True, return_router_choices=self.record, router_stats=False, **kw)
        if self.record:
            self.routes.append(out.aux["router_choices"])
        return out.logits[:, -1]

    def prefill(self) -> torch.Tensor:
        return self._call(self.ids_BP, cache=self.cache, attention_mask_BS=self.mask_BS[:, : self.len])

    def step(self, next_B: torch.Tensor, real_B: torch.Tensor) -> torch.Tensor:
        self.mask_BS[:, self.len] = real_B
        self.len += 1
        return self._call(next_B[:, None], cache=self.cache, attention_mask_BS=self.mask_BS[:, : self.len],
                          decode=True)

    def routing_per_row(self, mask_BP: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
        all_LBSK = torch.cat(self.routes, dim=2).cpu()  # (L, B, P + steps, K)
        P = mask_BP.shape[1]
        rows = []
        for b, n in enumerate(lengths):
            real = mask_BP[b].cpu()
            prompt_SLK = all_LBSK[:, b, :P][:, real].permute(1, 0, 2)
            gen_SLK = all_LBSK[:, b, P: P + n].permute(1, 0, 2)
            rows.append(torch.cat([prompt_SLK, gen_SLK], dim=0).contiguous())
        return rows


class _FullDecoder(_CachedDecoder):
    """No cache: every step re-runs the whole (left-padded) sequence."""

    def __init__(self, model, ids_BP, mask_BP, max_steps: int, record: bool) -> None:
        self.model, self.record, self.cache = model, record, None
        B, P = ids_BP.shape
        self.seq_BS = torch.zeros(B, P + max_steps, dtype=torch.long, device=ids_BP.device)
        self.seq_BS[:, :P] = ids_BP
        self.mask_BS = torch.zeros(B, P + max_steps, dtype=torch.bool, device=ids_BP.device)
        self.mask_BS[:, :P] = mask_BP
        self.len = P
        self.routes: list[torch.Tensor] = []

    def prefill(self) -> torch.Tensor:
        return self._full()

    def _full(self) -> torch.Tensor:
        out = self.model(self.seq_BS[:, : self.len], attention_mask_BS=self.mask_BS[:, : self.len],
                         last_logits_only=True, return_router_choices=self.record, router_stats=False)
        if self.record:
            self.routes = [out.aux["router_choices"]]  # the last full pass covers every token
        return out.logits[:, -1]

    def step(self, next_B: torch.Tensor, real_B: torch.Tensor) -> torch.Tensor:
        self.seq_BS[:, self.len] = next_B
        self.mask_BS[:, self.len] = real_B
        self.len += 1
        return self._full()


def compile_decode_step(model, *, dynamic: bool | None = False, backend: str = "inductor"):
    """``torch.compile`` of ``model``'s forward for a decode step that a CUDA graph then captures: the compiled
    step fuses the step's many small element-wise kernels (at small batch kernel count, not bytes, bounds the
    step time), the graph removes the launches. Used by ``CudaGraphPool`` (``generate``) and by the serving
    engine's bucketed steps (``serving/graphs.py``). ``dynamic=False`` specializes every shape (a few shapes:
    ``generate``); ``None`` lets a second size of a dimension recompile it as symbolic, which bounds the
    compilations of many buckets (the engine's (rows, columns) buckets: about three compilations, not one
    per bucket). ``backend``: "inductor" (the real one; C++ on the CPU, Triton on the GPU) or a lighter
    dynamo backend for tests ("aot_eager")."""
    return torch.compile(model, dynamic=dynamic, backend=backend)


class CudaGraphPool:
    """Captured decode steps kept across ``generate`` calls, so a graph is captured once per shape.

    Key: (model, batch size, cache length rounded up to ``length_multiple``, routing capture). Each
    entry owns its static cache and input/output buffers (a graph replays fixed addresses); a new
    call resets the cache's masks and counters, and stale latents stay masked until overwritten.
    ``compile_step=True`` wraps the decode step in ``torch.compile`` before capture, fusing its many
    small element-wise kernels (at batch 1 kernel count, not bytes, bounds the step time); the first
    capture then includes compilation.
    """

    def __init__(self, compile_step: bool = False, length_multiple: int = 64) -> None:
        self.compile_step, self.length_multiple = compile_step, length_multiple
        self._entries: dict[tuple, dict] = {}
        self._compiled: dict[int, object] = {}

    def entry(self, model, batch_size: int, min_len: int, record: bool) -> dict:
        m = self.length_multiple
        max_len = (min_len + m - 1) // m * m
        key = (id(model), batch_size, max_len, record)
        if key not in self._entries:
            dev = model.lm_head.weight.device
            self._entries[key] = {
                "cache": model.new_cache(batch_size, max_len),
                "tok_B1": torch.zeros(batch_size, 1, dtype=torch.long, device=dev),
                "real_B1": torch.ones(batch_size, 1, dtype=torch.bool, device=dev),
                "slot_1": torch.zeros(1, dtype=torch.long, device=dev),
                "graph": None, "logits_BV": None, "route_LB1K": None, "model": model,
            }
        e = self._entries[key]
        e["cache"].reset()
        return e

    def step_fn(self, model):
        if not self.compile_step:
            return model
        if id(model) not in self._compiled:
            self._compiled[id(model)] = compile_decode_step(model)
        return self._compiled[id(model)]


class _GraphDecoder(_CachedDecoder):
    """Static cache + one decode step captured in a CUDA graph (inputs/outputs in fixed buffers)."""

    def __init__(self, model, ids_BP, mask_BP, max_steps: int, record: bool,
                 pool: CudaGraphPool | None = None) -> None:
        self.model, self.ids_BP, self.record = model, ids_BP, record
        B, P = ids_BP.shape
        self.pool = pool or CudaGraphPool()
        self.e = self.pool.entry(model, B, P + max_steps, record)
        self.cache = self.e["cache"]
        self.mask_BP = mask_BP
        self.len = P
        self.routes: list[torch.Tensor] = []

    def prefill(self) -> torch.Tensor:
        P = self.ids_BP.shape[1]
        slots = torch.arange(P, device=self.ids_BP.device)
        return self._call(self.ids_BP, cache=self.cache, cache_position=slots, attention_mask_BS=self.mask_BP)

    def _static_step(self, fn) -> torch.Tensor:
        e = self.e
        out = fn(e["tok_B1"], cache=self.cache, cache_position=e["slot_1"], attention_mask_BS=e["real_B1"],
                 last_logits_only=True, return_router_choices=self.record, router_stats=False, decode=True)
        if self.record:
            e["route_LB1K"] = out.aux["router_choices"]
        return out.logits[:, -1]

    def _capture(self) -> None:
        # Warm up on a side stream (compilation, allocator pools, cuBLAS handles), then capture one
        # step. The warm-up really runs: it writes the slot the replay rewrites, and advances
        # num_real_B, which is undone before the replay.
        fn = self.pool.step_fn(self.model)
        real_before = self.cache.num_real_B.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._static_step(fn)
                self.cache.num_real_B.copy_(real_before)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.e["logits_BV"] = self._static_step(fn)
        self.e["graph"] = graph

    def step(self, next_B: torch.Tensor, real_B: torch.Tensor) -> torch.Tensor:
        e = self.e
        e["tok_B1"].copy_(next_B[:, None])
        e["real_B1"].copy_(real_B[:, None])
        e["slot_1"].fill_(self.len)
        if e["graph"] is None:
            self._capture()
        e["graph"].replay()
        self.len += 1
        if self.record:
            self.routes.append(e["route_LB1K"].clone())
        return e["logits_BV"]
