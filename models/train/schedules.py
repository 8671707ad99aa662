"""Learning-rate schedules as pure functions of the optimiser step.

Two shapes, both starting with a linear warmup:

* ``warmup_cosine``: half-cosine from ``max_lr`` down to ``min_lr_ratio * max_lr`` at
  ``total_steps``; flat at the minimum afterwards.
* ``warmup_stable_decay`` (WSD, as in MiniCPM / nanochat): flat at ``max_lr`` until the last
  ``decay_fraction`` of the run, then a linear ramp down to ``min_lr_ratio * max_lr``. The stable
  phase makes intermediate checkpoints usable as branch points for a later decay.

Warmup is ``max_lr * (step + 1) / warmup_steps`` so step 0 already trains (a zero first step
would waste a step and, under Adam, pollute the second-moment estimate with nothing).
Steps are 0-based optimiser steps (not micro-batches).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def _check(step: int, max_lr: float, warmup_steps: int, total_steps: int) -> None:
    if step < 0:
        raise ValueError(f"step={step}: must be >= 0")
    if max_lr < 0:
        raise ValueError(f"max_lr={max_lr}: must be >= 0")
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"warmup_steps={warmup_steps}, total_steps={total_steps}: need warmup >= 0, total > 0")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} exceeds total_steps={total_steps}")


def warmup_cosine(step: int, *, max_lr: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> float:
    _check(step, max_lr, warmup_steps, total_steps)
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = (step - warmup_steps) / decay_steps  # in [0, 1)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, *, max_lr: float, warmup_steps: int, total_steps: int,
                        decay_fraction: float = 0.2, min_lr_ratio: float = 0.0) -> float:
    _check(step, max_lr, warmup_steps, total_steps)
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction={decay_fraction}: must be in [0, 1]")
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    decay_steps = round(decay_fraction * total_steps)
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return max_lr
    progress = (step - decay_start) / max(1, total_steps - decay_start)  # in [0, 1)
    return max_lr + (min_lr - max_lr) * progress


def constant_with_warmup(step: int, *, max_lr: float, warmup_steps: int, total_steps: int) -> float:
    _check(step, max_lr, warmup_steps, total_steps)
    return max_lr * (step + 1) / warmup_steps if step < warmup_steps else max_lr


def lr_at(step: int, *, schedule: str, max_lr: float, warmup_steps: int, total_steps: int,
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Dispatch by schedule name (the one call site the training loop uses)."""
    if schedule == "cosine":
        return warmup_cosine(step, max_lr=max_lr, warmup_steps=warmup_steps, total_steps=total_steps,
                             min_lr_ratio=min_lr_ratio)
    if schedule == "wsd":
        return warmup_stable_decay(step, max_lr=max_lr, warmup_steps=warmup_steps, total_steps=total_steps,
                                   decay_fraction=decay_fraction, min_lr_ratio=min_lr_ratio)
    if schedule == "constant":
        return constant_with_warmup(step, max_lr=max_lr, warmup_steps=warmup_steps, total_steps=total_steps)
    raise ValueError(f"unknown schedule {schedule!r}; known: {SCHEDULES}")
