"""Training schedules as pure functions of the samples consumed over the planned total.

- Learning rate: linear warm-up from `warmup_start` to `base`, then half-cosine to `final`
  (DINO / MAE recipes; SPEC 2: warm-up 5 epochs (DINO) or 5% of the run (MAE), then cosine).
- Weight decay: cosine from 0.04 to 0.4 over training (DINO practice).
- Teacher temperature: linear warm-up 0.04 -> 0.07, then constant (DINO / DINOv2).
- Teacher EMA momentum: cosine from 0.994 to 1.0 over the run (FM-CT, BYOL / DINO).

Every length (run, warm-ups, last-layer freeze) is a sample count, so the schedules do not bend
when the number of workers, hence the global batch, changes during a run (elastic training, a
resume on another cluster). A restored trainer only needs the samples consumed (`Progress`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """Where a run is: `samples` consumed (once the current step completes) of `total` planned."""

    samples: int
    total: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.samples / max(1, self.total))


def cosine_schedule(
    now: int, total: int, base: float, final: float, warmup: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up over `warmup` (warmup_start -> base), then cosine base -> final at `total`.

    `now`, `total` and `warmup` count samples (any common unit works); `now >= total` is `final`.
    """
    if now >= total:
        return final
    if now < warmup:
        return warmup_start + (base - warmup_start) * now / warmup
    progress = (now - warmup) / max(1, total - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def lr_at(now: int, total: int, base_lr: float, min_lr: float = 1e-6, warmup: int = 0) -> float:
    """Learning rate: warm-up from 0 to `base_lr`, cosine decay to `min_lr`."""
    return cosine_schedule(now, total, base_lr, min_lr, warmup, 0.0)


def weight_decay_at(now: int, total: int, start: float = 0.04, end: float = 0.4) -> float:
    """Weight decay: cosine from `start` to `end` (DINO)."""
    return cosine_schedule(now, total, start, end)


def teacher_temp_at(now: int, warmup: int, start: float = 0.04, end: float = 0.07) -> float:
    """Teacher temperature: linear `start` -> `end` over `warmup`, then `end`."""
    if warmup <= 0 or now >= warmup:
        return end
    return start + (end - start) * now / warmup


def momentum_at(now: int, total: int, base: float = 0.994, final: float = 1.0) -> float:
    """Teacher EMA momentum: cosine from `base` to `final` at `total`."""
    return cosine_schedule(now, total, base, final)


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule: lr = base_lr * global_batch / reference_batch (SPEC 2)."""
    return base_lr * global_batch / reference_batch
