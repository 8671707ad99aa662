"""Sharded (DCP) checkpoints resumed on the same and on a different number of gloo ranks.

One spawn of 2 ranks and the test process itself (1 rank, no process group):

* 2 ranks, straight vs checkpointed at step 3 and resumed on 2 ranks: bit-identical weights;
* the 2-rank checkpoint restored on 1 rank (2 -> 1) and a 1-rank checkpoint restored on 2 ranks
  (1 -> 2): model and optimiser equal to what was saved right after load, and the loader's pending
  rows plus the rows consumed before the checkpoint are exactly the rows of the started epoch;
* a format-1 (full ``model.pt``/``optimizer.pt``) checkpoint still restores and loads.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from moeflow.models import MoETransformer
from moeflow.models.train import state as train_state
from moeflow.models.train.loop import Trainer
from moeflow.platform.store import LocalStore
from moeflow.platform.train.checkpoint import CheckpointManager
from moeflow.platform.train.config import PretrainConfig
from moeflow.platform.train.loader import PackedLoader
from train_fakes import ArrayTokens, pattern_docs, tiny_model_overrides

STEPS, BREAK, BOS = 6, 3, 1


def _config() -> PretrainConfig:
    return PretrainConfig(model_overrides=tiny_model_overrides(), seq_len=16, micro_batch_size=2, max_steps=STEPS,
                          lr=1e-2, warmup_steps=1, log_every=2, val_every=0)


def _ds() -> ArrayTokens:
    return ArrayTokens(pattern_docs(80, seed=3), bos_id=BOS)


class Recording:
    """The loader, remembering every row it handed out (rows are identified by their tokens)."""

    def __init__(self, loader: PackedLoader) -> None:
        self.loader, self.rows = loader, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        self.rows.extend(tuple(r.tolist()) for r in batch)
        return batch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)

    def load_resharded(self, states):
        self.loader.load_resharded(states)


def _build(rank: int, world: int, perturb: bool = False, ddp: bool = True,
           fsdp: bool = False) -> tuple[Trainer, Recording]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from moeflow.platform.train.distributed import wrap_model

    cfg = _config()
    torch.manual_seed(cfg.seed)
    model = MoETransformer(cfg.build_model_config())
    if perturb:  # a resumed process starts from other weights: restore must overwrite them all
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
    loader = Recording(PackedLoader(_ds(), seq_len=cfg.seq_len, batch_size=cfg.micro_batch_size, seed=cfg.seed,
                                    rank=rank, world_size=world, bos_id=BOS, prefetch=0))
    if fsdp:
        wrapped = wrap_model(model, "fsdp", "fp32", world, torch.device("cpu"))
    else:
        wrapped = DDP(model) if world > 1 and ddp else model
    return Trainer(cfg, model, loader, wrapped=wrapped, bos_id=BOS), loader


def _snapshot(trainer: Trainer, loader: Recording) -> dict:
    """Full (unsharded) model and optimiser state, copied; collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = StateDictOptions(full_state_dict=True)  # on every rank (cpu_offload would keep it on rank 0)
    optim = copy.deepcopy(get_optimizer_state_dict(trainer.model, trainer.optimizer, options=full))
    model = {k: v.clone() for k, v in get_model_state_dict(trainer.model, options=full).items()}
    return {"model": model, "optim": optim,
            "step": trainer.step, "loader": loader.state_dict(), "rows": list(loader.rows),
            "torch_rng": torch.get_rng_state()}


def _pending_rows(loader: PackedLoader) -> list[tuple]:
    rows = []
    for epoch, world, rank, start, stop in loader.state_dict()["pending"]:
        plan = list(loader.rows(epoch, rank, world))[start:stop]
        rows.extend(tuple(loader.read_row(r).tolist()) for r in plan)
    return rows


def _epoch_rows(loader: PackedLoader, epoch: int, world: int) -> Counter:
    return Counter(tuple(loader.read_row(r).tolist()) for q in range(world) for r in loader.rows(epoch, q, world))


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = Path(out)
        straight, _ = _build(rank, world)
        straight.fit()
        broken, loader = _build(rank, world)
        broken.fit(until_step=BREAK)
        torch.save(_snapshot(broken, loader), out / f"broken{rank}.pt")
        # as the worker does it: each rank writes its shards into its own folder and uploads them into
        # the one artefact (rank 0 commits); here every rank downloads the whole checkpoint to resume
        # (the worker's per-rank fetch of only what its load reads: test_train_checkpoint_lazy.py)
        train_state.save(train_state.capture(broken, loader), out / f"local{rank}")  # collective
        manager = CheckpointManager(LocalStore(out / "store"), "runs/r")
        ref = manager.save_sharded(BREAK, out / f"local{rank}", metadata={"world_size": world})
        ckpt2 = manager.download(ref, out / f"ckpt2-{rank}")
        resumed, loader = _build(rank, world, perturb=True)
        train_state.restore(resumed, ckpt2, loader)
        resumed.fit()
        # 1 -> 2: the test process's 1-rank checkpoint, right after load
        grown, loader = _build(rank, world, perturb=True)
        train_state.restore(grown, out / "ckpt1", loader)
        after = _snapshot(grown, loader)
        after["pending"] = _pending_rows(loader.loader)
        grown.fit(until_step=BREAK + 1)  # and it trains on: its first rows are its pending share
        after["next_rows"] = list(loader.rows)
        torch.save({"straight": straight.model.state_dict(), "resumed": resumed.model.state_dict(),
                    "grown": after}, out / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # one spawn of 2 ranks: ~30 s on the shared 2-core machine (the fast test below covers restore)
def test_sharded_checkpoint_resumes_exactly_on_2_ranks_and_reshards_2_to_1_and_1_to_2():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        one, loader = _build(0, 1)  # the 1-rank checkpoint first: the spawned ranks restore it (1 -> 2)
        one.fit(until_step=BREAK)
        saved_one = _snapshot(one, loader)
        train_state.save(train_state.capture(one, loader), out / "ckpt1")
        mp.spawn(_worker, args=(2, str(out / "init"), tmp), nprocs=2, join=True)
        results = [torch.load(out / f"result{r}.pt", weights_only=False) for r in range(2)]
        broken = [torch.load(out / f"broken{r}.pt", weights_only=False) for r in range(2)]
        # rank 1 wrote only its own shards (no gather to rank 0); the committed artefact holds all
        assert sorted(p.relative_to(out / "local1").as_posix() for p in (out / "local1").rglob("*")
                      if p.is_file()) == ["model/__1_0.distcp", "optim/__1_0.distcp"]
        ckpt2 = out / "ckpt2-0"
        assert train_state.checkpoint_format(ckpt2) == 2
        assert sorted(p.name for p in (ckpt2 / "model").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

        # same world size: bit-identical to the uninterrupted run
        for r in range(2):
            _assert_same(results[r]["resumed"], results[r]["straight"], f"rank {r}")

        # 2 -> 1, in this process without a process group
        shrunk, loader = _build(0, 1, perturb=True)
        train_state.restore(shrunk, ckpt2, loader)
        now = _snapshot(shrunk, loader)
        _assert_same(now["model"], broken[0]["model"], "model")
        _assert_same(now["optim"], broken[0]["optim"], "optim")
        assert now["step"] == BREAK
        assert torch.equal(now["torch_rng"], broken[0]["torch_rng"])  # rank 0's stream goes on
        consumed = Counter(broken[0]["rows"] + broken[1]["rows"])
        pending = _pending_rows(loader.loader)
        assert consumed + Counter(pending) == _epoch_rows(loader.loader, 0, 2)  # nothing skipped or repeated
        shrunk.fit()  # and trains to the end on one rank, from the pending rows
        assert loader.rows == pending[:len(loader.rows)]

        # 1 -> 2: each rank got the saved state, and the pending rows are the rest of epoch 0
        for r in range(2):
            grown = results[r]["grown"]
            _assert_same(grown["model"], saved_one["model"], f"rank {r} model")
            _assert_same(grown["optim"], saved_one["optim"], f"rank {r} optim")
            assert grown["step"] == BREAK
        pending = results[0]["grown"]["pending"]
        assert results[1]["grown"]["pending"] == pending
        probe = PackedLoader(_ds(), seq_len=16, batch_size=2, seed=0, bos_id=BOS, prefetch=0)
        assert Counter(saved_one["rows"]) + Counter(pending) == _epoch_rows(probe, 0, 1)
        for r in range(2):  # round-robin: rank r's first rows after resume are pending rows r, r + 2, ...
            assert results[r]["grown"]["next_rows"] == pending[r::2][:2]
        assert torch.equal(results[0]["grown"]["torch_rng"], saved_one["torch_rng"])
        assert not torch.equal(results[1]["grown"]["torch_rng"], saved_one["torch_rng"])  # fresh, not a copy


def test_full_format_checkpoint_still_restores_and_loads(tmp_path):
    """A format-1 checkpoint as the code before sharding wrote it (full state dicts, rank 0)."""
    first, loader = _build(0, 1)
    first.fit(until_step=BREAK)
    saved = _snapshot(first, loader)
    old = tmp_path / "old"
    old.mkdir()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    torch.save(get_model_state_dict(first.model, options=options), old / train_state.MODEL_FILE)
    torch.save(get_optimizer_state_dict(first.model, first.optimizer, options=options), old / train_state.OPTIM_FILE)
    new = train_state.capture(first, loader)
    trainer_part = dict(new["trainer"], format_version=1)
    torch.save(trainer_part, old / train_state.TRAINER_FILE)
    (old / train_state.META_FILE).write_text(__import__("json").dumps(dict(new["meta"], format_version=1)))
    assert train_state.checkpoint_format(old) == 1
    _assert_same(train_state.load_model_weights(old), saved["model"])
    resumed, loader2 = _build(0, 1, perturb=True)
    train_state.restore(resumed, old, loader2)
    now = _snapshot(resumed, loader2)
    _assert_same(now["model"], saved["model"])
    _assert_same(now["optim"], saved["optim"])
    assert now["loader"] == saved["loader"]
    # the sharded format gives the same full weights in one process
    train_state.save(new, tmp_path / "new")
    _assert_same(train_state.load_model_weights(tmp_path / "new"), saved["model"])
    with pytest.raises(FileNotFoundError, match="neither"):
        train_state.checkpoint_format(tmp_path)


def test_restore_on_fewer_ranks_resplits_the_loader_and_averages_the_interval_sums(tmp_path):
    """Fast, one process: a checkpoint whose loop state says 2 ranks (loader positions, RNG, partial
    log sums of both) restored on 1 rank takes the restore's resharding path; DCP's own resharding of
    the model is the slow test's."""
    trainer, loader = _build(0, 2, ddp=False)  # this process plays rank 0 of 2 (no group)
    other = PackedLoader(_ds(), seq_len=16, batch_size=2, seed=0, rank=1, world_size=2, bos_id=BOS, prefetch=0)
    trainer.fit(until_step=BREAK)  # mid log-interval (log_every 2)
    rows1 = [tuple(r.tolist()) for _ in range(BREAK) for r in next(other)]
    state = train_state.capture(trainer, loader)
    saved = _snapshot(trainer, loader)
    part = state["trainer"]
    rank1_interval = {"interval": {k: v * 3 for k, v in part["intervals"][0]["interval"].items()},
                      "interval_steps": part["intervals"][0]["interval_steps"]}
    torch.manual_seed(99)
    part.update(world_size=2, loader=[loader.state_dict(), other.state_dict()],
                rng=[part["rng"][0], train_state.rng_state()], intervals=[part["intervals"][0], rank1_interval])
    train_state.save(state, tmp_path / "ckpt")

    resumed, loader1 = _build(0, 1, perturb=True)
    train_state.restore(resumed, tmp_path / "ckpt", loader1)
    now = _snapshot(resumed, loader1)
    _assert_same(now["model"], saved["model"])
    _assert_same(now["optim"], saved["optim"])
    assert torch.equal(now["torch_rng"], saved["torch_rng"])
    pending = _pending_rows(loader1.loader)
    assert Counter(saved["rows"] + rows1) + Counter(pending) == _epoch_rows(loader1.loader, 0, 2)
    assert part["intervals"][0]["interval"]
    for key, value in part["intervals"][0]["interval"].items():  # the mean of (x, 3x)
        assert torch.allclose(resumed._interval[key], value * 2), key
    resumed.fit(until_step=BREAK + 2)
    assert loader1.rows == pending[:4]
    # a loader that cannot re-split refuses with one line naming both worker counts
    with pytest.raises(ValueError, match="written by 2 worker.*this run has 1"):
        train_state.restore(resumed, tmp_path / "ckpt", iter(()))


def test_files_staged_by_other_ranks_are_committed_with_their_checksums(tmp_path):
    """The store side of ``save_sharded``: a rank uploads into rank 0's staging area (``stage_file``),
    rank 0 adopts the entry; nothing is visible before the commit and a bad entry is refused."""
    from moeflow.platform.store import ChecksumError, StoreError
    from moeflow.platform.store.artifact import stage_file

    store = LocalStore(tmp_path / "store")
    shard = tmp_path / "__1_0.distcp"
    shard.write_bytes(b"rank one's shard" * 100)
    writer = store.write_artifact("runs/x/checkpoints/step-00000003")
    writer.begin()
    info = stage_file(store, writer.staging_prefix, "model/__1_0.distcp", shard)
    with pytest.raises(StoreError, match="wrong size"):
        writer.adopt("model/__2_0.distcp", info)  # never staged
    writer.adopt("model/__1_0.distcp", info)
    writer.put_bytes("model/.metadata", b"rank zero")
    assert not store.artifact_exists("runs/x/checkpoints/step-00000003")
    writer.commit()
    art = store.read_artifact("runs/x/checkpoints/step-00000003")
    assert art.get_bytes("model/__1_0.distcp") == shard.read_bytes()
    path = store._path("runs/x/checkpoints/step-00000003/model/__1_0.distcp")
    path.write_bytes(b"x" * path.stat().st_size)  # the manifest holds the uploader's sha256
    with pytest.raises(ChecksumError):
        art.download(tmp_path / "dl")


def _fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = Path(out)
        sharded, loader = _build(rank, world, fsdp=True)
        sharded.fit(until_step=BREAK)
        snap = _snapshot(sharded, loader)  # collective (full_state_dict gathers for the comparison only)
        train_state.save(train_state.capture(sharded, loader), out / "fsdp2")
        grown, loader = _build(rank, world, perturb=True, fsdp=True)
        train_state.restore(grown, out / "ckpt1", loader)  # 1 -> 2, into FSDP2 shards
        after = _snapshot(grown, loader)
        if rank == 0:
            torch.save({"saved": snap, "grown": after}, out / "fsdp.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # one spawn of 2 ranks (~40 s on the shared machine)
def test_fsdp2_shards_reshard_to_one_plain_process_and_back():
    """FSDP2 holds each parameter sharded over the ranks: its checkpoint restores into one unsharded
    process (2 -> 1), and a 1-rank checkpoint into FSDP2 shards (1 -> 2), the same full state."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        one, loader = _build(0, 1)
        one.fit(until_step=BREAK)
        saved_one = _snapshot(one, loader)
        train_state.save(train_state.capture(one, loader), out / "ckpt1")
        mp.spawn(_fsdp_worker, args=(2, str(out / "init"), tmp), nprocs=2, join=True)
        result = torch.load(out / "fsdp.pt", weights_only=False)
        shrunk, loader = _build(0, 1, perturb=True)
        train_state.restore(shrunk, out / "fsdp2", loader)
        now = _snapshot(shrunk, loader)
        _assert_same(now["model"], result["saved"]["model"], "model")
        _assert_same(now["optim"], result["saved"]["optim"], "optim")
        _assert_same(train_state.load_model_weights(out / "fsdp2"), result["saved"]["model"], "weights")
        _assert_same(result["grown"]["model"], saved_one["model"], "grown model")
        _assert_same(result["grown"]["optim"], saved_one["optim"], "grown optim")


def _train_worker_rank(rank: int, world: int, port: int, launch: dict) -> None:
    """One rank of ``train_worker`` joined the way torchrun does it (environment variables)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from moeflow.platform.train.launcher import train_worker

    train_worker(launch)


@pytest.mark.slow  # a 2-rank run, then a 1-rank run (~60 s on the shared machine)
def test_a_two_worker_run_resumes_on_one_worker_through_the_store(tmp_path):
    """The whole pretraining path: 2 workers commit sharded checkpoints, the run goes on with 1 worker
    (more steps), which resumes from the store (resharded) and commits its own; every checkpoint's
    weights load in one process."""
    import socket

    import torch.multiprocessing as mp

    from moeflow.platform.train.launcher import train_worker
    from train_fakes import write_token_artifact

    store = LocalStore(tmp_path / "store")
    tokens_uri = write_token_artifact(store, "datasets/fake/tokens/r", pattern_docs(200, seed=0),
                                      pattern_docs(30, seed=99), shard_tokens=3000)
    cfg = PretrainConfig(model_overrides=tiny_model_overrides(), seq_len=16, micro_batch_size=2, max_steps=4, lr=1e-2,
                         warmup_steps=1, log_every=2, val_every=0, checkpoint_every=4, keep_checkpoints=3)
    launch = {"pretrain": cfg.to_dict(), "tokens_uri": tokens_uri, "output_prefix": "runs/grow",
              "store_uri": store.root_uri, "tracking": "noop", "device": "cpu"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_train_worker_rank, args=(2, port, launch), nprocs=2, join=True)
    manager = CheckpointManager(store, "runs/grow")
    first = manager.latest()
    assert first.step == 4 and store.read_artifact(first.prefix).metadata["world_size"] == 2
    names = store.read_artifact(first.prefix).names()
    assert {"model/__0_0.distcp", "model/__1_0.distcp", "optim/__1_0.distcp", "trainer.pt"} <= set(names)
    before = train_state.load_model_weights(manager.download(first, tmp_path / "c4"))

    longer = {**launch, "pretrain": {**cfg.to_dict(), "max_steps": 8}}
    result = train_worker(longer)  # one worker, this process
    assert result["steps"] == 8
    last = manager.latest()
    local = manager.download(last, tmp_path / "c8")
    t_state = torch.load(local / train_state.TRAINER_FILE, weights_only=False)
    assert t_state["world_size"] == 1 and t_state["loop"]["step"] == 8
    loader = t_state["loader"][0]
    assert loader["pending"] and loader["taken"] == 4 * 2  # 4 steps x 2 rows, all from the re-split rows
    after = train_state.load_model_weights(local)
    assert before.keys() == after.keys() and not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
