"""Training checkpoints in the object store: atomic, numbered, last K kept, latest found by listing.

Layout under a run's output prefix::

    <prefix>/checkpoints/step-00000050/   an atomic artefact (MANIFEST.json committed last):
        model/ optim/ trainer.pt meta.json   (sharded, see moeflow.models.train.state; older
                                              checkpoints: model.pt optimizer.pt trainer.pt meta.json)
        expert_load.npz ...                   (a stage's extra files, e.g. post-training's)

Under several ranks every rank uploads its own shard files into the artefact (``save_sharded``);
rank 0 commits the manifest once all of them are in.

A reader never sees a half-written checkpoint: ``latest()`` only considers folders whose
manifest is committed, so a worker killed mid-upload leaves the previous checkpoint as the
latest. Step numbers are zero-padded so lexicographic order is numeric order.

When a ``Catalog`` is given, every committed checkpoint is registered as a model version
(``register_model``; metrics carry the step and ``"checkpoint": 1``), so the lineage of a
final model can be walked back to the checkpoints it came from; pruned ones are marked
``"pruned": 1``.

Resume (``resume_newest_intact``) downloads no whole checkpoint: every rank gets the small files
(``meta.json``, ``trainer.pt``, the DCP ``.metadata``, a stage's extra files) and then only the shard
files its own DCP load reads (``LazyCheckpoint``), each verified against the manifest. A corrupted
newest checkpoint does not block resume: the rank that reads the bad file says so, and every rank
falls back to the previous checkpoint.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from moeflow.platform.config import config_hash

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d{8,})$")


def step_name(step: int) -> str:
    return f"step-{int(step):08d}"




@dataclass(frozen=True)
class CheckpointRef:
    step: int
    prefix: str  # store key of the artefact
    uri: str


class CheckpointManager:
    """Save / find / download / prune the checkpoints of one run in a store."""

    def __init__(self, store, output_prefix: str, *, keep_last: int = 3, catalog=None, model_name: str = "moe",
                 config: dict | None = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: must be >= 1")
        self.store = store
        self.prefix = f"{output_prefix.strip('/')}/{CHECKPOINTS_DIR}"
        self.keep_last = keep_last
        self.catalog = catalog
        self.model_name = model_name
        self.config_hash = config_hash(config or {})
        self.skipped_corrupted: list[str] = []

    # ---------------------------------------------------------------- listing
    def list(self) -> list[CheckpointRef]:
        """Committed checkpoints, oldest first."""
        steps = set()
        for key in self.store.list(self.prefix):
            folder = key[len(self.prefix) + 1:].split("/", 1)[0]
            match = _STEP_RE.match(folder)
            if match:
                steps.add(int(match.group(1)))
        refs = []
        for step in sorted(steps):
            prefix = f"{self.prefix}/{step_name(step)}"
            if self.store.artifact_exists(prefix):
                refs.append(CheckpointRef(step, prefix, self.store.uri(prefix)))
        return refs

    def latest(self) -> CheckpointRef | None:
        refs = self.list()
        return refs[-1] if refs else None

    # ---------------------------------------------------------------- writing
    def save(self, step: int, local_dir: str | Path, metadata: dict[str, Any] | None = None) -> CheckpointRef:
        """Upload every file of ``local_dir`` as one atomic artefact, then prune old ones."""
        local_dir = Path(local_dir)
        prefix = f"{self.prefix}/{step_name(step)}"
        meta = {"step": int(step), "kind": "pretrain-checkpoint", **(metadata or {})}
        # overwrite: a restarted worker may re-save the step it died at (same deterministic state)
        with self.store.write_artifact(prefix, metadata=meta, overwrite=True) as writer:
            for name, path in _files(local_dir):
                writer.put_file(name, path)
        ref = CheckpointRef(int(step), prefix, self.store.uri(prefix))
        log.info("checkpoint step %d committed at %s", step, ref.uri)
        self._registered(ref)
        return ref

    def save_sharded(self, step: int, local_dir: str | Path, metadata: dict[str, Any] | None = None) -> CheckpointRef:
        """Collective (every rank calls it): commit the union of every rank's ``local_dir`` as one artefact.

        Each rank uploads its own files (its DCP shards; rank 0 also the small files) straight into the
        staging area of rank 0's artefact writer — no file crosses to rank 0 — and sends rank 0 only
        their names, sizes and sha256; rank 0 commits the manifest after every rank's upload, then
        prunes. A failure on any rank aborts the artefact on every rank (nothing is committed).
        Single process: ``save``.
        """
        import torch.distributed as dist

        from moeflow.platform.store.artifact import stage_file

        from .distributed import broadcast

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.save(step, local_dir, metadata)
        rank, local_dir = dist.get_rank(), Path(local_dir)
        prefix = f"{self.prefix}/{step_name(step)}"
        writer, error = None, None
        if rank == 0:
            meta = {"step": int(step), "kind": "pretrain-checkpoint", **(metadata or {})}
            writer = self.store.write_artifact(prefix, metadata=meta, overwrite=True)
            try:
                writer.begin()
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it (below)
                error = f"rank 0: {exc}"
        staging = broadcast(writer.staging_prefix if rank == 0 and not error else None)
        infos: dict[str, dict] = {}
        if staging is not None and rank != 0:
            try:
                for name, path in _files(local_dir):
                    infos[name] = stage_file(self.store, staging, name, path)
            except Exception as exc:  # noqa: BLE001
                error = f"rank {rank}: {exc}"
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (infos, error))
        errors = [e for _, e in everyone if e]
        ref = None
        if rank == 0 and not errors:
            try:
                for name, path in _files(local_dir):
                    writer.put_file(name, path)
                for other, _ in everyone[1:]:
                    for name, info in other.items():
                        writer.adopt(name, info)
                writer.commit()
                ref = CheckpointRef(int(step), prefix, self.store.uri(prefix))
            except Exception as exc:  # noqa: BLE001
                errors.append(f"rank 0: {exc}")
        if rank == 0 and writer is not None and ref is None:
            writer.abort()
        outcome = broadcast((ref, errors))
        if outcome[1]:
            raise RuntimeError(f"checkpoint step {step} was not committed: " + "; ".join(outcome[1]))
        ref = outcome[0]
        if rank == 0:
            log.info("checkpoint step %d committed at %s (%d ranks' files)", step, ref.uri, len(everyone))
            self._registered(ref)
        return ref

    def _registered(self, ref: CheckpointRef) -> None:
        if self.catalog is not None:
            self.catalog.register_model(self.model_name, ref.uri, self.config_hash,
                                        metrics={"step": ref.step, "checkpoint": 1})
        self.prune()

    def prune(self) -> list[int]:
        """Delete all but the newest ``keep_last`` committed checkpoints; returns removed steps.

        With a catalog, each removed checkpoint's model version is marked ``"pruned": 1`` (merged into
        its metrics, where ``"checkpoint": 1`` already says what it is), so the catalog does not offer a
        URI that no longer exists as a loadable model; the row stays for lineage. The mark is written
        before the delete: a crash in between leaves a marked checkpoint that the next prune deletes.
        """
        refs = self.list()
        removed = []
        for ref in refs[: max(0, len(refs) - self.keep_last)]:
            if self.catalog is not None:  # merges into the row registered at save time
                self.catalog.register_model(self.model_name, ref.uri, self.config_hash,
                                            metrics={"step": ref.step, "checkpoint": 1, "pruned": 1})
            self.store.delete_prefix(ref.prefix)
            removed.append(ref.step)
        return removed

    # ---------------------------------------------------------------- reading
    def download(self, ref: CheckpointRef, local_dir: str | Path) -> Path:
        """Download and verify (sha256) a checkpoint into ``local_dir``."""
        return self.store.read_artifact(ref.prefix).download(Path(local_dir))

    def download_latest(self, local_dir: str | Path) -> tuple[CheckpointRef, Path] | None:
        ref = self.latest()
        if ref is None:
            return None
        return ref, self.download(ref, local_dir)

    def open_for_resume(self, ref: CheckpointRef, local_dir: str | Path) -> "LazyCheckpoint":
        """A checkpoint in ``local_dir`` with every file but its DCP shard files (verified); the shard
        files come when a load asks for them (``LazyCheckpoint.fetch``)."""
        return LazyCheckpoint(self.store.read_artifact(ref.prefix), Path(local_dir))

    def resume_newest_intact(self, local_root: str | Path, load: Callable[[CheckpointRef, "LazyCheckpoint"], Any]
                             ) -> tuple[CheckpointRef, "LazyCheckpoint", list[str]] | None:
        """Collective (every rank calls it): ``load(ref, checkpoint)`` the newest intact checkpoint on every
        rank, each rank fetching only the files its load reads. Returns (ref, checkpoint, skipped).

        Rank 0 lists the checkpoints and broadcasts the list, so every rank tries the same steps. A
        corrupted file (a checksum mismatch: a bad disk, a truncated object), found by whichever rank
        reads it, makes every rank skip that checkpoint with a warning and try the previous one (its
        load overwrites what the failed one loaded); ``skipped`` says which, one line each, naming the
        file. None when there are no checkpoints; when every one is corrupted, a ``ChecksumError``
        naming them (starting over silently would lose the run). Any other error on any rank is raised
        on every rank.
        """
        import torch.distributed as dist

        from moeflow.platform.store import ChecksumError

        from .distributed import broadcast

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        skipped: list[str] = []
        self.skipped_corrupted = skipped  # what the last resume skipped, for the run's result
        for ref in broadcast(list(reversed(self.list())) if rank == 0 else None):
            local = Path(local_root) / f"resume-{ref.step}"
            opened: list[LazyCheckpoint] = []
            corrupted = _on_every_rank(lambda: opened.append(self.open_for_resume(ref, local)))
            if not corrupted:
                corrupted = _on_every_rank(lambda: load(ref, opened[0]))
            if not corrupted:
                return ref, opened[0], skipped
            shutil.rmtree(local, ignore_errors=True)
            skipped.append(f"step {ref.step} at {ref.uri}: {'; '.join(corrupted)}")
            if rank == 0:
                log.warning("checkpoint step %d is corrupted (%s); trying the previous one", ref.step,
                            "; ".join(corrupted))
        if skipped:
            raise ChecksumError(f"every checkpoint under {self.store.uri(self.prefix)} is corrupted: "
                                + "; ".join(skipped), self.store.uri(self.prefix))
        return None


class LazyCheckpoint:
    """A committed checkpoint opened for resume in a local folder: the small files are there, the DCP
    shard files (``*.distcp``) are fetched on request, each verified against the manifest (size and
    sha256) before it is used: a corrupted one raises ``ChecksumError`` naming it."""

    def __init__(self, artifact, path: Path) -> None:
        from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX  # the shard files' ".distcp"

        self.artifact, self.path = artifact, path
        self.fetched: dict[str, int] = {}  # name -> bytes, every file fetched so far
        self.fetch([name for name in artifact.names() if not name.endswith(DEFAULT_SUFFIX)])

    def fetch(self, names: list[str]) -> None:
        """Download (verified) the files of ``names`` not fetched yet; the ``fetch`` of ``state.restore``."""
        new = [name for name in names if name not in self.fetched]
        self.artifact.download(self.path, names=new)
        self.fetched.update((name, self.artifact.files[name]["size"]) for name in new)

    @property
    def fetched_bytes(self) -> int:
        return sum(self.fetched.values())


def _on_every_rank(step: Callable[[], Any]) -> list[str]:
    """Run ``step`` on every rank (collective): the corruptions any rank met (the ``ChecksumError``
    messages, each naming its file); an error other than a corruption on any rank is raised on every
    rank (its own on the rank that had it)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    error: BaseException | None = None
    outcome: tuple[str | None, str | None] = (None, None)
    try:
        step()
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        corrupted = _corruption(exc)
        outcome = (corrupted, None) if corrupted else (None, f"{type(exc).__name__}: {exc}")
        error = None if corrupted else exc
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, outcome)
    else:
        everyone = [outcome]
    if error is not None:
        raise error
    others = [f"rank {r}: {e}" for r, (_, e) in enumerate(everyone) if e]
    if others:
        raise RuntimeError("resume failed on another rank: " + "; ".join(others))
    return sorted({c for c, _ in everyone if c})


def _corruption(exc: BaseException) -> str | None:
    """The message of the ``ChecksumError`` behind ``exc`` (raised by a fetch, or by a fetch inside a DCP
    load, on this rank or another: DCP gathers every rank's failure into one ``CheckpointException``)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from moeflow.platform.store import ChecksumError

    if isinstance(exc, ChecksumError):
        return str(exc)
    if isinstance(exc, CheckpointException):
        found = [str(failure) for failure, _ in exc.failures.values() if isinstance(failure, ChecksumError)]
        return "; ".join(sorted(set(found))) or None
    return None


def _files(local_dir: Path) -> list[tuple[str, Path]]:
    """(artefact name, path) of every file under ``local_dir``, sub-folders included (a sharded
    checkpoint keeps its DCP folders ``model/`` and ``optim/``)."""
    return [(path.relative_to(local_dir).as_posix(), path) for path in sorted(local_dir.rglob("*")) if path.is_file()]


def download_checkpoint(uri: str, local_dir: str | Path | None = None) -> Path:
    """A checkpoint artefact by URI into ``local_dir`` (a fresh temp dir by default)."""
    from moeflow.platform.store import read_artifact

    target = Path(local_dir) if local_dir is not None else Path(tempfile.mkdtemp(prefix="moeflow-ckpt-"))
    try:
        return read_artifact(uri).download(target)
    except BaseException:
        if local_dir is None:
            shutil.rmtree(target, ignore_errors=True)
        raise
