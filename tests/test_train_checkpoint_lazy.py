"""Resume fetches per rank only the checkpoint files its DCP load reads, each verified.

* the store side (``LazyCheckpoint``, ``resume_newest_intact``) on a local directory and on a real S3
  server (moto): the small files up front, a shard file when asked for, a corrupted one refused by name
  and the checkpoint skipped for the previous one;
* two FSDP2 ranks (gloo) through the worker's ``save_checkpoint``/``resume_from_latest``: bit-identical
  resume, each rank's local folder holds its own shards and the small files only (never the other
  rank's shards), and a shard that only rank 1 reads, corrupted in the store, makes BOTH ranks fall
  back to the previous checkpoint (and still resume exactly); then the same checkpoints resumed by one
  process (2 -> 1), which fetches every shard.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import moto_s3_server, settings_s3_store  # noqa: E402
from train_fakes import ArrayTokens, pattern_docs, tiny_model_overrides  # noqa: E402

from moeflow.platform.store import ChecksumError, LocalStore  # noqa: E402
from moeflow.platform.train.checkpoint import CheckpointManager  # noqa: E402

SMALL = {"meta.json": b"{}", "trainer.pt": b"t" * 50, "model/.metadata": b"m" * 20, "optim/.metadata": b"o" * 20}
SHARDS = {"model/__0_0.distcp": b"a" * 300, "model/__0_1.distcp": b"b" * 3000, "model/__1_1.distcp": b"c" * 3000}


@pytest.fixture(scope="module")
def moto():
    with moto_s3_server() as server:
        yield server


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.service)])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return settings_s3_store(request.getfixturevalue("moto"), tmp_path / "home", monkeypatch, "lazy-ckpt")


def _commit(store, tmp_path: Path, manager: CheckpointManager, step: int) -> None:
    local = tmp_path / f"c{step}"
    for name, data in {**SMALL, **SHARDS}.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data + bytes([step]))
    manager.save(step, local)


def _corrupt(store, manager: CheckpointManager, step: int, name: str) -> None:
    """Same size, one flipped byte, behind the manifest's back (a bad disk, a broken upload)."""
    key = f"{next(r for r in manager.list() if r.step == step).prefix}/{name}"
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(key, bytes(data))


def _local_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_a_checkpoint_opened_for_resume_fetches_the_small_files_then_only_what_is_asked_for(store, tmp_path):
    manager = CheckpointManager(store, "runs/lazy")
    _commit(store, tmp_path, manager, 4)
    checkpoint = manager.open_for_resume(manager.latest(), tmp_path / "dl")
    assert _local_files(checkpoint.path) == sorted(SMALL)
    checkpoint.fetch(["model/__0_0.distcp", "model/__0_1.distcp"])
    checkpoint.fetch(["model/__0_1.distcp"])  # fetched once
    assert _local_files(checkpoint.path) == sorted([*SMALL, "model/__0_0.distcp", "model/__0_1.distcp"])
    assert checkpoint.fetched_bytes == sum(len(d) + 1 for d in SMALL.values()) + 301 + 3001
    assert (checkpoint.path / "model/__0_1.distcp").read_bytes() == b"b" * 3000 + bytes([4])

    _corrupt(store, manager, 4, "model/__1_1.distcp")
    with pytest.raises(ChecksumError, match=r"corrupted\): \S+/step-00000004/model/__1_1\.distcp"):
        checkpoint.fetch(["model/__1_1.distcp"])
    assert not (checkpoint.path / "model/__1_1.distcp").exists()  # nothing unverified left to read


def test_resume_skips_a_checkpoint_whose_load_meets_a_corrupted_shard(store, tmp_path, caplog):
    manager = CheckpointManager(store, "runs/lazy", keep_last=3)
    for step in (4, 8, 12):
        _commit(store, tmp_path, manager, step)
    _corrupt(store, manager, 12, "model/__0_1.distcp")  # read by the load: found lazily
    _corrupt(store, manager, 8, "trainer.pt")  # a small file: found on opening
    loaded = []

    def load(ref, checkpoint):
        checkpoint.fetch(["model/__0_1.distcp"])
        loaded.append((ref.step, (checkpoint.path / "model/__0_1.distcp").read_bytes()))

    caplog.set_level(logging.WARNING, logger="moeflow")
    ref, checkpoint, skipped = manager.resume_newest_intact(tmp_path / "dl", load)
    assert ref.step == 4 and loaded == [(4, b"b" * 3000 + bytes([4]))]
    assert [s.split(" at ")[0] for s in skipped] == ["step 12", "step 8"]
    assert "step-00000012/model/__0_1.distcp" in skipped[0] and "step-00000008/trainer.pt" in skipped[1]
    assert manager.skipped_corrupted == skipped
    assert any("checkpoint step 12 is corrupted" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["resume-4"]  # no half-verified copies left
    assert "model/__0_1.distcp" in checkpoint.fetched and "model/__1_1.distcp" not in checkpoint.fetched

    def fail(ref, checkpoint):
        raise ValueError("not a corruption")

    with pytest.raises(ValueError, match="not a corruption"):  # any other error is not skipped over
        manager.resume_newest_intact(tmp_path / "dl2", fail)
    _corrupt(store, manager, 4, "model/__0_1.distcp")
    with pytest.raises(ChecksumError, match="every checkpoint .* is corrupted: step 12 .*; step 8 .*; step 4 "):
        manager.resume_newest_intact(tmp_path / "dl3", load)
    assert CheckpointManager(store, "runs/empty").resume_newest_intact(tmp_path / "dl4", load) is None


# ---------------------------------------------------------------- two FSDP2 ranks through the worker's functions
STEPS, BOS = 5, 1


def _build(rank: int, world: int, perturb: bool = False):
    from moeflow.models import MoETransformer
    from moeflow.models.train.loop import Trainer
    from moeflow.platform.train.config import PretrainConfig
    from moeflow.platform.train.distributed import wrap_model
    from moeflow.platform.train.loader import PackedLoader

    cfg = PretrainConfig(model_overrides=tiny_model_overrides(), seq_len=16, micro_batch_size=2, max_steps=STEPS,
                         lr=1e-2, warmup_steps=1, log_every=2, val_every=0)
    torch.manual_seed(cfg.seed)
    model = MoETransformer(cfg.build_model_config())
    if perturb:  # a resumed process starts from other weights: restore must overwrite them all
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
    loader = PackedLoader(ArrayTokens(pattern_docs(80, seed=3), bos_id=BOS), seq_len=cfg.seq_len,
                          batch_size=cfg.micro_batch_size, seed=cfg.seed, rank=rank, world_size=world, bos_id=BOS,
                          prefetch=0)
    wrapped = wrap_model(model, "fsdp", "fp32", world, torch.device("cpu"))
    return Trainer(cfg, model, loader, wrapped=wrapped, bos_id=BOS), loader


def _local_shards(trainer) -> dict[str, torch.Tensor]:
    """This rank's own part of every weight (FSDP2: its DTensor shards)."""
    return {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
            for k, v in trainer.model.state_dict().items()}


def _worker(rank: int, world: int, init_file: str, out: str, store_uri: str) -> None:
    import torch.distributed as dist

    from moeflow.platform.train.distributed import WorkerContext, barrier, open_store
    from moeflow.platform.train.worker import resume_from_latest, save_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = Path(out)
        manager = CheckpointManager(open_store(store_uri), "runs/fsdp", keep_last=3)

        def ctx(name: str) -> WorkerContext:
            return WorkerContext(rank, world, rank, torch.device("cpu"), None, out / f"{name}{rank}")

        straight, _ = _build(rank, world)
        straight.fit()
        broken, loader = _build(rank, world)
        for step in (2, 3):
            broken.fit(until_step=step)
            save_checkpoint(broken, loader, manager, ctx("save"))
        result = {"straight": _local_shards(straight)}
        for attempt in ("clean", "corrupted"):
            if attempt == "corrupted":  # a shard that only rank 1 reads: rank 0 must fall back as well
                barrier()
                if rank == 0:
                    _corrupt(manager.store, manager, 3, "model/__1_1.distcp")
                barrier()
            resumed, loader = _build(rank, world, perturb=True)
            ref, local = resume_from_latest(manager, resumed, loader, ctx(attempt))
            result[attempt] = {"step": ref.step, "files": {name: (local / name).stat().st_size
                                                           for name in _local_files(local)},
                               "skipped": list(manager.skipped_corrupted)}
            resumed.fit()
            result[attempt]["final"] = _local_shards(resumed)
        try:  # an error other than a corruption on rank 1 alone: raised on rank 0 too (no hang, no skip)
            manager.resume_newest_intact(out / f"odd{rank}", lambda ref, c: _fail_on_rank_1(rank))
        except (RuntimeError, ValueError) as exc:
            result["odd"] = f"{type(exc).__name__}: {exc}"
        torch.save(result, out / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def _fail_on_rank_1(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 cannot load")


def _whole_entries_only(metadata, name: str) -> bool:
    """Whether every entry of DCP file ``name`` is a whole tensor or an object (no rank's shard)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for index, info in metadata.storage_data.items():
        if info.relative_path == name:
            entry = metadata.state_dict_metadata[index.fqn]
            if isinstance(entry, TensorStorageMetadata):
                chunk = next(c for c in entry.chunks if tuple(c.offsets) == tuple(index.offset))
                if tuple(chunk.sizes) != tuple(entry.size):
                    return False
    return True


def test_fsdp2_ranks_fetch_only_their_own_shards_and_a_corrupted_shard_falls_back_on_every_rank(store):
    """One spawn of 2 ranks, 4 short runs and 2 resumes (~10 s on the shared machine)."""
    import torch.distributed.checkpoint as dcp
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        mp.spawn(_worker, args=(2, str(out / "init"), tmp, store.root_uri), nprocs=2, join=True)
        results = [torch.load(out / f"result{r}.pt", weights_only=False) for r in range(2)]
        manager = CheckpointManager(store, "runs/fsdp")
        full = store.read_artifact(manager.latest().prefix)
        metadata = {folder: dcp.FileSystemReader(out / "clean0" / "resume-3" / folder).read_metadata()
                    for folder in ("model", "optim")}
        for r in range(2):
            clean = results[r]["clean"]
            assert clean["step"] == 3 and clean["skipped"] == []
            for name, tensor in results[r]["straight"].items():  # bit-identical to the uninterrupted run
                assert torch.equal(clean["final"][name], tensor), (r, name)
                assert torch.equal(results[r]["corrupted"]["final"][name], tensor), (r, name)
            fetched = clean["files"]
            other = 1 - r
            assert f"model/__{other}_1.distcp" not in fetched and f"optim/__{other}_1.distcp" not in fetched
            assert {f"model/__{r}_1.distcp", f"optim/__{r}_1.distcp", "meta.json", "trainer.pt",
                    "model/.metadata", "optim/.metadata"} <= set(fetched)
            assert all(fetched[name] == full.files[name]["size"] for name in fetched)
            for name in fetched:  # the other rank's files it read hold replicated entries only (a bias, ...)
                folder, _, file = name.partition("/")
                if file.startswith(f"__{other}_"):
                    assert _whole_entries_only(metadata[folder], file), (r, name)
            others_shards = sum(full.files[f"{folder}/__{other}_1.distcp"]["size"] for folder in ("model", "optim"))
            print(f"rank {r} fetched {len(fetched)} of {len(full.files)} files, "
                  f"{sum(fetched.values())} of {full.total_size} bytes (the other rank's shards: {others_shards})")
            assert sum(fetched.values()) <= full.total_size - others_shards
            # both ranks skipped step 3 although only rank 1 read the bad file, and said which file
            corrupted = results[r]["corrupted"]
            assert corrupted["step"] == 2 and len(corrupted["skipped"]) == 1
            assert corrupted["skipped"][0].startswith("step 3 at ")
            assert "step-00000003/model/__1_1.distcp" in corrupted["skipped"][0]
        # 2 -> 1 through the store, lazily: one process needs (and fetches) every shard; step 3 is still corrupted
        from moeflow.models.train.state import load_model_weights
        from moeflow.platform.train.distributed import WorkerContext
        from moeflow.platform.train.worker import resume_from_latest

        one, loader = _build(0, 1, perturb=True)
        ref, local = resume_from_latest(manager, one, loader, WorkerContext(0, 1, 0, torch.device("cpu"), None,
                                                                            out / "one"))
        assert ref.step == 2 and "step-00000003/model/__1_1.distcp" in manager.skipped_corrupted[0]
        step2 = store.read_artifact(ref.prefix)
        assert _local_files(local) == step2.names()
        expected = load_model_weights(manager.download(ref, out / "full-2"))
        for name, tensor in one.model.state_dict().items():
            assert torch.equal(tensor, expected[name]), name
        assert results[1]["odd"] == "ValueError: rank 1 cannot load"
        assert results[0]["odd"] == ("RuntimeError: resume failed on another rank: "
                                     "rank 1: ValueError: rank 1 cannot load")
