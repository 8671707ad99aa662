"""Resume of a 2-rank (gloo) run inside a log interval: every rank gets back its OWN partial sums.

Each rank sums its own losses over a log interval until the log step's all-reduce. A checkpoint taken
mid-interval must give each rank its own sums back; rank 0's sums on every rank change the logged
means (the interval's loss, grad norm, ...). Reference: the same two ranks trained without a break.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from moeflow.models import MoETransformer
from moeflow.models.train import state as train_state
from moeflow.models.train.loop import Trainer
from moeflow.platform.train.config import PretrainConfig
from train_fakes import tiny_model_overrides

STEPS, BREAK_AT = 6, 2


def _config() -> PretrainConfig:
    return PretrainConfig(model_overrides=tiny_model_overrides(), seq_len=16, micro_batch_size=2,
                          grad_accum_steps=1, max_steps=STEPS, warmup_steps=1, log_every=4, val_every=0)


def _batches(rank: int, start: int):
    """This rank's batches from step ``start`` on (ranks see very different data: different losses)."""
    gen = torch.Generator().manual_seed(100 + rank)
    rows = [torch.randint(2, 8 if rank == 0 else 64, (2, 17), generator=gen) for _ in range(STEPS)]
    return iter(rows[start:])


def _trainer(rank: int, start: int) -> Trainer:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = MoETransformer(_config().build_model_config())
    return Trainer(_config(), model, _batches(rank, start), wrapped=DDP(model))


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        straight = _trainer(rank, 0)
        straight.fit()
        broken = _trainer(rank, 0)
        broken.fit(until_step=BREAK_AT)  # mid log-interval (log_every 4)
        captured = train_state.capture(broken)
        ckpt = os.path.join(out_dir, "ckpt")
        train_state.save(captured, ckpt)  # collective: each rank writes its shards
        resumed = _trainer(rank, BREAK_AT)
        train_state.restore(resumed, ckpt)
        resumed.fit()
        strip = lambda hs: [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in hs]  # noqa: E731
        torch.save({"straight": strip(straight.history), "resumed": strip(resumed.history)},
                   os.path.join(out_dir, f"history{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: 17 s alone, ~50 s on the shared 2-core machine
def test_two_rank_resume_mid_interval_logs_what_an_unbroken_run_logs():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        histories = [torch.load(os.path.join(tmp, f"history{r}.pt")) for r in range(2)]
    for h in histories:
        assert [m["step"] for m in h["straight"]] == [4, 6]
        assert h["resumed"] == h["straight"], (h["resumed"][0]["loss"], h["straight"][0]["loss"])


def test_restore_takes_this_ranks_interval_sums_not_rank0s(tmp_path):
    """Fast, one process: the per-rank entry of ``intervals`` wins over the (rank 0) copy in ``loop``."""
    cfg = _config()
    torch.manual_seed(0)
    model = MoETransformer(cfg.build_model_config())
    trainer = Trainer(cfg, model, _batches(0, 0))
    trainer.fit(until_step=BREAK_AT)
    state = train_state.capture(trainer)
    assert len(state["trainer"]["intervals"]) == 1 and state["trainer"]["intervals"][0]["interval_steps"] == BREAK_AT
    own = {"interval": {"loss": torch.tensor(7.0)}, "interval_steps": 1}
    state["trainer"]["intervals"] = [own]  # what this rank had (differs from rank 0's copy in "loop")
    train_state.save(state, tmp_path / "ckpt")
    resumed = Trainer(cfg, MoETransformer(cfg.build_model_config()), _batches(0, BREAK_AT))
    train_state.restore(resumed, tmp_path / "ckpt")
    assert resumed._interval_steps == 1 and float(resumed._interval["loss"]) == 7.0
    # a checkpoint without per-rank sums (older format) still restores the loop's copy
    del state["trainer"]["intervals"]
    train_state.save(state, tmp_path / "old")
    train_state.restore(resumed, tmp_path / "old")
    assert resumed._interval_steps == BREAK_AT
