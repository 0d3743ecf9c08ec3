"""Weighted combination of reward functions, each also reported on its own."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from grpo_lab.tasks.base import Example

RewardFn = Callable[..., list]


class RewardError(RuntimeError):
    """A reward function failed or returned something other than one finite score per sample."""


@dataclass
class RewardOutput:
    """total: (N,) weighted sum; per_fn: name -> (N,) with NaN where the function gave None."""

    total: torch.Tensor
    per_fn: dict[str, torch.Tensor]


class RewardSet:
    """Named reward functions with weights.

    functions: name -> callable; weights: name -> float (default 1.0 each).
    """

    def __init__(
        self, functions: Mapping[str, RewardFn], weights: Mapping[str, float] | None = None
    ) -> None:
        if not functions:
            raise ValueError("reward: at least one reward function is needed (reward.functions)")
        weights = dict(weights or {})
        unknown = set(weights) - set(functions)
        if unknown:
            raise ValueError(
                f"reward.weights names {sorted(unknown)}, which are not reward functions; "
                f"allowed: {sorted(functions)}"
            )
        self.functions = dict(functions)
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.functions}

    def __call__(self, completions: list[str], examples: list[Example], **ctx: Any) -> RewardOutput:
        n = len(completions)
        per_fn: dict[str, torch.Tensor] = {}
        for name, fn in self.functions.items():
            try:
                scores = fn(completions, examples, **ctx)
            except Exception as err:  # the user's code: say whose it was and keep the cause
                raise RewardError(
                    f"reward function {name!r} raised {type(err).__name__}: {err}"
                ) from err
            per_fn[name] = self._check(name, scores, n)
        total = torch.zeros(n, dtype=torch.float32)
        for name, scores in per_fn.items():
            total += self.weights[name] * torch.nan_to_num(scores, nan=0.0)
        return RewardOutput(total=total, per_fn=per_fn)

    @staticmethod
    def _check(name: str, scores: Any, n: int) -> torch.Tensor:
        if scores is None or len(scores) != n:
            got = "None" if scores is None else f"{len(scores)} scores"
            raise RewardError(f"reward function {name!r} returned {got}; expected a list of {n}")
        values = []
        for i, s in enumerate(scores):
            if s is None:
                values.append(math.nan)
                continue
            try:
                v = float(s)
            except (TypeError, ValueError):
                raise RewardError(
                    f"reward function {name!r} returned {s!r} for sample {i}; expected a number or None"
                ) from None
            if not math.isfinite(v):
                raise RewardError(
                    f"reward function {name!r} returned {v} for sample {i}; rewards must be finite "
                    "(return None to leave a sample out)"
                )
            values.append(v)
        return torch.tensor(values, dtype=torch.float32)
