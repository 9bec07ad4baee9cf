"""Learning rate as a pure function of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math


def warmup_steps(total: int, ratio: float) -> int:
    """Steps of linear warm-up: `ratio` of the run, rounded."""
    return round(total * ratio)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to 0 at the end of the run.

    Step `step` (0-based) uses lr_at(step); the same shape as transformers' get_cosine_schedule_with_warmup.
    """
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
