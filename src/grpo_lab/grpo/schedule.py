"""The learning-rate schedule of the GRPO stage (``train.scheduler``, ``train.warmup_steps``)."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, kind: str, total_steps: int) -> float:
    """The factor on ``train.lr`` at optimizer step ``step`` (0-based): linear warmup over
    ``warmup_steps``, then constant, cosine or linear decay to 0 at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress  # linear
