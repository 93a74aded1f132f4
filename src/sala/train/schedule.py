"""Learning-rate schedules as pure functions of the step, so resuming needs only the step number.

``constant`` (after warmup), ``wsd`` (warmup-stable-decay: constant, then a decay over the last
``decay_fraction`` of the steps to ``final_lr``), ``exp`` (exponential from ``lr`` to ``final_lr`` over the
stage, the release's short-decay stage) and ``cosine``. Warmup is linear from lr/warmup to lr.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "wsd", "exp", "cosine")


def lr_at(step: int, total: int, lr: float, schedule: str = "constant", warmup: int = 0,
          final_lr: float | None = None, decay_fraction: float = 0.1, decay_shape: str = "exp") -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    final = lr if final_lr is None else final_lr
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        n_decay = max(1, round(decay_fraction * total))
        start = total - n_decay
        if step < start:
            return lr
        t = (step - start + 1) / n_decay
    else:
        span = max(1, total - warmup)
        t = min(1.0, (step - warmup + 1) / span)
    if schedule == "cosine":
        return final + 0.5 * (lr - final) * (1 + math.cos(math.pi * t))
    if schedule == "wsd" and decay_shape == "linear":
        return lr + (final - lr) * t
    if final <= 0:
        raise ValueError("exponential decay needs final_lr > 0")
    return lr * (final / lr) ** t
