"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier at optimizer ``step`` (0-based): 1 at the end of warm-up, ``min_ratio`` at the end.

    1) warm-up: (step + 1) / warmup_steps, so the first step already moves the weights;
    2) cosine from 1 down to min_ratio over the remaining steps;
    3) min_ratio after total_steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
