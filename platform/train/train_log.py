"""A run's training history and expert-load log as appended segments, not re-pickled into checkpoints.

Before, every checkpoint carried the whole metrics history (in ``trainer.pt``) and the whole
expert-load log (``expert_load.npz``): checkpoint k re-wrote everything of checkpoints 1..k-1, so the
bytes written grew quadratically with the run. Now each checkpoint at step S is preceded by one
segment holding only what was logged since the previous checkpoint P::

    <prefix>/train_log/segment-00000050/   an atomic artefact (MANIFEST.json committed last)
        history.jsonl      one JSON object per log step with P < step <= S
        expert_load.npz    the expert-load windows closed in (P, S] (``ExpertLoadRecorder`` layout)
        metadata: {"step": S, "from_step": P}

Reading the log up to a checkpoint's step S follows the chain S → P → ... → 0 through
``from_step``, so segments left by an abandoned branch (a crash after a segment but before its
checkpoint committed, or a resume that fell back past a corrupted checkpoint) are never mixed in;
re-saving a step overwrites its segment. The segment is written before its checkpoint, so every
committed checkpoint has its chain.
"""

from __future__ import annotations

import json

from moeflow.platform.store import NotFoundError

from .expert_load import NPZ_NAME, ExpertLoadRecorder

TRAIN_LOG_DIR = "train_log"
HISTORY_NAME = "history.jsonl"


class TrainLog:
    """Append / read the history + expert-load segments of one run in a store."""

    def __init__(self, store, output_prefix: str) -> None:
        self.store = store
        self.prefix = f"{output_prefix.strip('/')}/{TRAIN_LOG_DIR}"

    def segment_prefix(self, step: int) -> str:
        return f"{self.prefix}/segment-{int(step):08d}"

    def append(self, step: int, from_step: int, history: list[dict], recorder: ExpertLoadRecorder) -> str:
        """Write the segment (from_step, step]: the rows of ``history`` and windows of ``recorder`` in it."""
        if not 0 <= from_step < step:
            raise ValueError(f"train log segment ({from_step}, {step}]: need 0 <= from_step < step")
        rows = [row for row in history if from_step < int(row["step"]) <= step]
        window = ExpertLoadRecorder()
        for s, counts, bias in zip(recorder.steps, recorder.counts, recorder.biases):
            if from_step < s <= step:
                window.record(s, counts, bias)
        prefix = self.segment_prefix(step)
        body = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        with self.store.write_artifact(prefix, metadata={"kind": "train-log", "step": int(step),
                                                         "from_step": int(from_step)}, overwrite=True) as writer:
            writer.put_bytes(HISTORY_NAME, body.encode())
            writer.put_bytes(NPZ_NAME, window.to_npz_bytes())
        return self.store.uri(prefix)

    def read(self, step: int) -> tuple[list[dict], ExpertLoadRecorder]:
        """History rows and expert-load windows up to ``step`` (a checkpoint's), oldest first."""
        chain = []
        while step > 0:
            prefix = self.segment_prefix(step)
            if not self.store.artifact_exists(prefix):
                raise NotFoundError(f"train log segment for step {step} is missing ({self.store.uri(prefix)})",
                                    self.store.uri(prefix))
            artifact = self.store.read_artifact(prefix)
            chain.append(artifact)
            step = int(artifact.metadata["from_step"])
        history: list[dict] = []
        recorder = ExpertLoadRecorder()
        for artifact in reversed(chain):
            history += [json.loads(line) for line in artifact.get_bytes(HISTORY_NAME).decode().splitlines() if line]
            part = ExpertLoadRecorder.from_npz_bytes(artifact.get_bytes(NPZ_NAME))
            for s, counts, bias in zip(part.steps, part.counts, part.biases):
                recorder.record(s, counts, bias)
        return history, recorder

    def has(self, step: int) -> bool:
        return self.store.artifact_exists(self.segment_prefix(step))


def checkpoint_log(local_dir, trainer_state: dict, train_log: TrainLog, step: int) -> tuple[list[dict], ExpertLoadRecorder, bool]:
    """(history, expert-load log, from the checkpoint itself?) of a downloaded checkpoint at ``step``.

    Checkpoints written before the train log existed carry both inside (``trainer.pt``'s loop history
    and ``expert_load.npz``): those are used as they are (True); newer ones read the segment chain.
    """
    from pathlib import Path

    npz = Path(local_dir) / NPZ_NAME
    loop = trainer_state.get("loop", {})
    if "history" in loop or npz.is_file():
        recorder = ExpertLoadRecorder.from_npz_bytes(npz.read_bytes()) if npz.is_file() else ExpertLoadRecorder()
        recorder.truncate(step)
        return [row for row in loop.get("history", []) if int(row["step"]) <= step], recorder, True
    history, recorder = train_log.read(step)
    return history, recorder, False
