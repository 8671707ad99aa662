"""The sft stage: chat data + a model version -> a supervised fine-tuned model version (full, last-k or LoRA).

Loss on assistant tokens only (every turn, each turn's ``<|end|>`` included), token-weighted over the
global batch (``Trainer``), on rows packed with document masking (``models/align/sft.py``). Methods:

* ``full``: every parameter trains; ``last_k_layers`` restricts it to the last k decoder layers + head;
* ``lora``: the base is frozen, adapters on attention, dense projections and the routed experts'
  stacked weights (``models/align/lora.py``); the export is the merged model (an ordinary HF export)
  and, with ``export_adapter``, also a PEFT adapter folder ``adapter/`` inside it that ``peft`` loads
  onto the *input* model's HF export.

Headline figures (before = the input model, after = the fine-tuned one), on the held-out split:
``assistant_loss`` (nats per assistant token) and ``exact_match`` (greedy replies to the held-out
prompts with exact answers, e.g. arithmetic, equal to the answer).

``run_sft(config, store, *, model_uri, data_uri, output_prefix, tracker, ...)`` is the entry the task calls.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator

from moeflow.models.align import lora as L
from moeflow.models.align.sft import PackedRowLoader, answer_exact_match, assistant_token_loss, pack_conversations

from .data import CHAT, PROMPT, PostTrainDataError, load_data, write_quarantine
from .engine import PostTrainConfig, PostTrainJob, StageParts, StageResult, run_posttrain

log = logging.getLogger(__name__)

BUILDER = "moeflow.platform.posttrain.sft:build_sft"
ADAPTER_DIR = "adapter"


class SFTConfig(PostTrainConfig):
    """Supervised fine-tuning: the loop (``PostTrainConfig``) plus the method and the held-out figures."""

    method: Literal["full", "lora"] = Field("full", description="full fine-tuning or LoRA adapters")
    last_k_layers: Optional[int] = Field(None, ge=1, le=1024, description="train (or adapt) only the last k decoder layers")
    lora_rank: int = Field(8, ge=1, le=1024, description="LoRA rank r")
    lora_alpha: float = Field(16.0, gt=0, le=10_000, description="LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input of linear targets")
    lora_targets: list[str] = Field(default_factory=lambda: ["all"],
                                    description="LoRA targets: attention, dense, experts, all, or module names "
                                                "(q_proj, kv_b_proj, o_proj, gate_proj, experts.gate_up_proj, ...)")
    export_adapter: bool = Field(True, description="lora: also write a PEFT adapter folder in the export")
    heldout_max_examples: int = Field(256, ge=1, le=1_000_000, description="held-out conversations for the loss")
    exact_match_max_prompts: int = Field(128, ge=0, le=100_000, description="held-out prompts answered (0: skip)")
    max_new_tokens: int = Field(12, ge=1, le=4096, description="tokens generated per exact-match prompt")

    @model_validator(mode="after")
    def _check_lora(self):
        if self.method == "lora":
            L.LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                         targets=tuple(self.lora_targets))  # names the bad target
        return self

    def bias_update_enabled(self) -> bool:
        """LoRA keeps the router biases frozen by default: a PEFT adapter carries no buffers, so the adapter on
        the input export would route differently from the merged model if the biases had moved."""
        if self.router_bias_update is None:
            return self.method != "lora"
        return self.router_bias_update

    def lora_config(self) -> L.LoRAConfig:
        return L.LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                            targets=tuple(self.lora_targets), last_k_layers=self.last_k_layers, init_seed=self.seed)


class SFTResult(StageResult):
    pass


# ------------------------------------------------------------------ the builder (runs on every rank and the driver)
def _merged_copy(model):
    return L.merged_copy(model) if L.has_lora(model) else model


def build_sft(job: PostTrainJob, base, tokenizer, ctx) -> StageParts:
    cfg = SFTConfig.model_validate(job.config)
    model = base
    if cfg.method == "lora":
        adapted = L.apply_lora(model, cfg.lora_config())
        log.info("sft lora: %d adapted tensors, %s trainable parameters", len(adapted),
                 f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    elif cfg.last_k_layers:
        L.freeze_except_last_layers(model, cfg.last_k_layers)
    lora_cfg = cfg.lora_config() if cfg.method == "lora" else None
    if lora_cfg is not None and cfg.export_adapter and cfg.bias_update_enabled():
        log.warning("sft lora with router_bias_update=true: the PEFT adapter does not carry the updated routing "
                    "biases, so only the merged export reproduces the fine-tuned model")

    def export_model(m):
        return _merged_copy(m)

    def extra_files(m, hf_dir: Path) -> None:
        if lora_cfg is not None and cfg.export_adapter:
            L.export_peft_adapter(m, hf_dir / ADAPTER_DIR, lora_cfg, base_model_name_or_path=job.model_uri)

    parts = StageParts(model, cfg, export_model=export_model, extra_export_files=extra_files)
    if ctx is None:  # the driver: export only
        return parts
    chat_uri = job.data_uris["chat"]
    train = load_data(chat_uri, CHAT, "train")
    heldout = _optional(chat_uri, CHAT, "heldout")
    prompts = _optional(job.data_uris.get("prompts") or "", PROMPT, "heldout")
    rows = pack_conversations(tokenizer, [r.messages for r in train.records], cfg.seq_len)
    if ctx.rank == 0:
        _write_data_report(job, rows.stats, train, heldout)
    parts.loader = PackedRowLoader(rows, batch_size=cfg.micro_batch_size, seed=cfg.seed, rank=ctx.rank,
                                   world_size=ctx.world_size)
    held_rows = (pack_conversations(tokenizer, [r.messages for r in heldout.records[: cfg.heldout_max_examples]],
                                    cfg.seq_len) if heldout is not None else None)
    exact = [r for r in (prompts.records if prompts is not None else []) if r.answer is not None]
    exact = exact[: cfg.exact_match_max_prompts]

    def evaluate(m) -> dict[str, float]:
        device = next(m.parameters()).device
        out = {}
        if held_rows is not None and len(held_rows):
            out["assistant_loss"] = assistant_token_loss(m, held_rows, batch_size=cfg.micro_batch_size, device=device)
        if exact:
            out["exact_match"] = answer_exact_match(_merged_copy(m), tokenizer, [r.prompt for r in exact],
                                                    [r.answer for r in exact], max_new_tokens=cfg.max_new_tokens)
        return out

    parts.evaluate = evaluate
    return parts


def _optional(uri: str, kind: str, split: str):
    if not uri:
        return None
    try:
        return load_data(uri, kind, split)
    except PostTrainDataError as err:
        log.warning("no held-out %s data: %s", kind, err)
        return None


def _write_data_report(job: PostTrainJob, pack_stats: dict, *loaded) -> None:
    """``<output_prefix>/data``: packing statistics and the quarantined records of the inputs."""
    from moeflow.platform.train.distributed import open_store

    store = open_store(job.store_uri)
    stats = {"packing": pack_stats, **{f"{d.kind}:{d.location}": d.stats for d in loaded if d is not None}}
    with store.write_artifact(f"{job.output_prefix.strip('/')}/data", metadata={"kind": "sft-data-report"},
                              overwrite=True) as w:
        w.put_json("stats.json", stats)
        write_quarantine(w, *[d for d in loaded if d is not None])


# ------------------------------------------------------------------ the library entry
def run_sft(config: SFTConfig | dict, store, *, model_uri: str, data_uri: str, output_prefix: str, tracker=None,
            catalog=None, prompts_uri: str | None = None, parent_model_id: str | None = None,
            model_name: str = "moe-sft", run_name: str = "sft", num_workers: int = 1, use_gpu: bool = False,
            extra_job: dict | None = None) -> SFTResult:
    """Fine-tune ``model_uri`` (an HF export artefact) on the chat data at ``data_uri``; see the module docstring."""
    cfg = config if isinstance(config, SFTConfig) else SFTConfig.model_validate(config)
    job = PostTrainJob(stage="sft", builder=BUILDER, config=cfg.to_dict(), model_uri=model_uri,
                       output_prefix=output_prefix, data_uris={"chat": data_uri, "prompts": prompts_uri or ""},
                       parent_model_id=parent_model_id, model_name=model_name, run_name=run_name,
                       **(extra_job or {}))
    result = run_posttrain(job, store, tracker=tracker, catalog=catalog, num_workers=num_workers, use_gpu=use_gpu)
    return SFTResult.from_posttrain(result)
