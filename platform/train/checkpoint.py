"""Training checkpoints in the object store: atomic, numbered, last K kept, latest found by listing.

Layout under a run's output prefix::

    <prefix>/checkpoints/step-00000050/   an atomic artefact (MANIFEST.json committed last):
        model.pt optimizer.pt trainer.pt meta.json   (see moeflow.models.train.state)
        expert_load.npz                             (the expert-load history up to this step)

A reader never sees a half-written checkpoint: ``latest()`` only considers folders whose
manifest is committed, so a worker killed mid-upload leaves the previous checkpoint as the
latest. Step numbers are zero-padded so lexicographic order is numeric order.

When a ``Catalog`` is given, every committed checkpoint is registered as a model version
(``register_model``; metrics carry the step and ``"checkpoint": 1``), so the lineage of a
final model can be walked back to the checkpoints it came from; pruned ones are marked
``"pruned": 1``. A corrupted newest checkpoint does not block resume (``download_newest_intact``).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
            for path in sorted(local_dir.iterdir()):
                if path.is_file():
                    writer.put_file(path.name, path)
        ref = CheckpointRef(int(step), prefix, self.store.uri(prefix))
        log.info("checkpoint step %d committed at %s", step, ref.uri)
        if self.catalog is not None:
            self.catalog.register_model(self.model_name, ref.uri, self.config_hash,
                                        metrics={"step": int(step), "checkpoint": 1})
        self.prune()
        return ref

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

    def download_newest_intact(self, local_root: str | Path) -> tuple[CheckpointRef, Path, list[str]] | None:
        """The newest checkpoint whose files match their manifest, downloaded under ``local_root``.

        A corrupted newest checkpoint (a checksum mismatch: a bad disk, a truncated object) must not
        block resume while an older one is intact: each corrupted one is skipped with a warning, and
        the returned list says which (one line each). None when there are no checkpoints; when every
        one is corrupted, a ``ChecksumError`` naming them (starting over silently would lose the run).
        """
        from moeflow.platform.store import ChecksumError

        skipped: list[str] = []
        self.skipped_corrupted = skipped  # what the last resume skipped, for the run's result
        for ref in reversed(self.list()):
            local = Path(local_root) / f"resume-{ref.step}"
            try:
                return ref, self.download(ref, local), skipped
            except ChecksumError as exc:
                shutil.rmtree(local, ignore_errors=True)
                skipped.append(f"step {ref.step} at {ref.uri}: {exc}")
                log.warning("checkpoint step %d is corrupted (%s); trying the previous one", ref.step, exc)
        if skipped:
            raise ChecksumError(f"every checkpoint under {self.store.uri(self.prefix)} is corrupted: "
                                + "; ".join(skipped), self.store.uri(self.prefix))
        return None


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
