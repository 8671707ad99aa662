"""What to serve and with which limits: pydantic configs of the serving engine and the gateway.

A ``ServedModel`` is one model version (one Ray Serve application of its own, so versions are
deployed, scaled and removed independently). The gateway's limits bound everything a request can
ask for, so a client can never make the server allocate without bound or wait forever.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from ..config import StageConfig


def _on_off_from_bool(value):
    """True/False -> 'on'/'off': older configs wrote ``process: true``, and YAML 1.1 (``--engine process=on``, a
    serve YAML's ``overlap: off``) reads on/off as booleans."""
    return ("on" if value else "off") if isinstance(value, bool) else value


# A setting the device decides unless forced: ``process``'s 'auto' by ``EngineConfig.runs_in_child``, ``overlap``'s by
# the engine (models/serving, from its model's device).
AutoOnOff = Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off_from_bool)]


class EngineConfig(StageConfig):
    max_batch: int = Field(8, ge=1, le=1024, description="decode slots per replica (continuous batching)")
    prefill_chunk: int = Field(256, ge=1, le=65536, description="prompt tokens prefilled per engine step")
    max_waiting: int = Field(256, ge=1, le=100_000, description="requests queued per replica before 429")
    context_len: int | None = Field(None, ge=2, description="context length (default: the model's max_seq_len)")
    quantize: Literal["none", "int8"] = Field("none", description="int8 = weight-only INT8 (models/quant.py)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="activation / weight dtype")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu' or 'cuda[:i]'")
    decode_mode: Literal["auto", "eager", "static", "graph"] = Field(
        "auto", description="decode step: 'graph' = CUDA graphs per batch/width bucket (captured at start), "
                            "'eager', 'static' = the bucketed steps uncaptured; 'auto' = graph on CUDA, else eager")
    compile: Literal["none", "inductor"] = Field(
        "none", description="'inductor' = torch.compile the static/graph decode step (compiled at start; needs "
                            "decode_mode graph, static, or auto on CUDA). Experimental: 2.2x faster decode on an "
                            "H100; its rounding differs from the eager step's, so a router near-tie can pick another "
                            "expert and greedy output can part from generate() (its GPU test routes every expert)")
    overlap: AutoOnOff = Field(
        "auto", description="launch each decode step before reading the previous one's tokens back, so the host's "
                            "per-token work overlaps the GPU's next step (one wasted row after a stop); "
                            "'auto' = on for CUDA, off on the CPU (nothing runs asynchronously there)")
    fused_moe: Literal["off", "auto", "on"] = Field(
        "auto", description="the routed experts of decode steps as fused Triton kernels (models/kernels/moe_decode.py) "
                           "instead of a sort and two grouped GEMMs: slot-major up to 3 routed slots an expert "
                           "(bench_ref: batch <= 32), expert-major up to 6 (batch <= 64); on an H100 5.5x the grouped "
                           "layer at batch 1, 1.4x at 32 and 64 (CUDA graphs). 'auto' = where it applies (CUDA, bf16, "
                           "Triton importable, those sizes); 'on' forces the fused kernels for every inference call. "
                           "'off' keeps the grouped GEMM. Auto by default: it rounds as inductor does (no farther from "
                           "float64), and generate() on the served model takes it alike; INT8 keeps its own path")
    gil_switch_ms: float | None = Field(
        None, ge=0.05, le=100.0,
        description="the process's GIL switch interval in ms (sys.setswitchinterval; Python's default is 5): the "
                    "engine thread, back from waiting on the GPU, waits up to this long for the GIL while the "
                    "HTTP event loop runs Python, and the GPU idles meanwhile; None = leave it")
    process: AutoOnOff = Field(
        "auto", description="step the engine in a child process that loads the model (vLLM's engine core), so the "
                            "engine's Python and the HTTP side do not share one GIL; the server process then holds "
                            "no model. Requests in flight are bounded at max_batch + max_waiting; a dead child fails "
                            "its requests and is restarted (platform/serve/engine_proc.py). 'auto' = on for CUDA "
                            "(H100, bench_ref compiled, one run: 28.5 k vs 15.3 k tok/s at 128 streams, TTFT p50 "
                            "90 vs 155 ms; 12.0 k vs 11.1 k at 32), off on the CPU (the thread engine serves there, "
                            "and a child costs a second model load and a process start); true/false are read as on/off")

    def resolved_device(self) -> str:
        """The device the engine runs on: 'auto' = cuda when available, else cpu."""
        if self.device != "auto":
            return self.device
        import torch  # here: the CLI validates configs without loading torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def runs_in_child(self) -> bool:
        """Whether the engine steps in a child process (``process``; 'auto' = on CUDA, see its description)."""
        if self.process != "auto":
            return self.process == "on"
        return self.resolved_device().startswith("cuda")


class ServedModel(StageConfig):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="registered model name")
    version: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="model version")
    model_dir: str = Field(..., description="local HF export directory with tokenizer.json")
    num_replicas: int | Literal["auto"] = Field(1, description="replicas, or 'auto' for the autoscaling range")
    min_replicas: int = Field(1, ge=0, le=64, description="autoscaling lower bound (num_replicas='auto')")
    max_replicas: int = Field(2, ge=1, le=64, description="autoscaling upper bound (num_replicas='auto')")
    num_cpus: float = Field(1.0, ge=0, le=128, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, le=8, description="GPUs reserved per replica")
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def app_name(self) -> str:
        return f"moeflow-model-{self.name}-{self.version}"


class GatewayConfig(StageConfig):
    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    default_alias: str = Field("champion", description="alias a bare model name resolves to")
    max_tokens_cap: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    n_cap: int = Field(8, ge=1, le=128, description="largest n")
    max_prompts: int = Field(32, ge=1, description="largest batch of prompts in one completions request")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="request bodies above this get 413")
    max_inflight: int = Field(512, ge=1, description="concurrent generations per gateway replica before 429")
    first_token_timeout_s: float = Field(60.0, gt=0, description="queueing bound: no first token by then = 503")
    request_timeout_s: float = Field(600.0, gt=0, description="end-to-end bound of one request")
    stall_timeout_s: float = Field(30.0, gt=0, description="no event from the replica for this long = 503 "
                                                           "(a replica that died without closing its stream)")
    num_replicas: int = Field(1, ge=1, le=64, description="gateway replicas")


class ServeConfig(StageConfig):
    """A whole serving set-up: the versions, their aliases and A/B splits, and the gateway."""

    models: list[ServedModel] = Field(..., min_length=1, description="model versions to serve")
    aliases: dict[str, dict[str, str]] = Field(default_factory=dict, description="name -> alias -> version")
    splits: dict[str, list[dict]] = Field(default_factory=dict,
                                          description="name -> [{'target': alias|version, 'weight': w}]")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
