"""Weighted combination of reward functions, each also reported on its own.

``on_error`` says what a failing function costs. ``raise`` (default): the run stops with a
``RewardError`` naming the function. ``zero``: a function that raises scores 0 for every
completion of that batch (it is not called again per sample: a function may depend on the whole
batch, and a second call could fail the same way or cost a model forward per sample); a NaN or
inf score is 0 for that sample only. Either way the zeroed samples are marked in
``RewardOutput.errors`` (logged as ``rewards/<fn>/errors``) and the first failure of each function
is logged as a warning. The wrong number of scores, or a score that is not a number, is a bug in
the function rather than a bad sample, and stays an error under ``zero`` too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from grpo_lab.schema import RewardOnError
from grpo_lab.tasks.base import Example

RewardFn = Callable[..., list]
ON_ERROR = tuple(option.value for option in RewardOnError)

log = logging.getLogger(__name__)


class RewardFunction(Protocol):
    """A reward function: any callable of this shape, a function or an instance (built once),
    named in the config by ``reward.functions.<name>._target_``."""

    def __call__(
        self, completions: list[str], examples: list[Example], **ctx: Any
    ) -> list[float | None]:
        """One score per completion. None means "not applicable": it is left out of that
        function's mean (as in TRL) and counts as 0 in the weighted sum.

        ``ctx`` always holds ``task`` (the Task), ``truncated`` (list[bool], no EOS within
        ``max_new_tokens``), ``lengths`` (list[int], completion tokens including EOS) and
        ``max_new_tokens`` (int); take what you need and accept ``**_`` for the rest. A function
        may also have a ``pop_counts() -> dict[str, float]`` method: what it counted in the call
        (logged as ``rewards/<name>/<key>``).
        """
        ...


class RewardError(RuntimeError):
    """A reward function failed or returned something other than one finite score per sample."""


@dataclass
class RewardOutput:
    """total:  (N,) weighted sum
    per_fn: name -> (N,) scores, NaN where the function gave None (0 where it failed)
    errors: name -> (N,) bool, True where ``on_error=zero`` scored a failure 0 (empty with raise)
    counts: "<name>/<key>" -> what a function counted in this call (its ``pop_counts()``, e.g.
            math_verify's timeouts), logged as ``rewards/<name>/<key>``
    """

    total: torch.Tensor
    per_fn: dict[str, torch.Tensor]
    errors: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)


class RewardSet:
    """Named reward functions with weights.

    functions: name -> callable; weights: name -> float (default 1.0 each);
    on_error: ``raise`` or ``zero`` (see the module docstring).
    """

    def __init__(
        self,
        functions: Mapping[str, RewardFn],
        weights: Mapping[str, float] | None = None,
        on_error: str = "raise",
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(
                f"reward.on_error={on_error!r} is invalid; allowed: {', '.join(ON_ERROR)}"
            )
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
        self.on_error = on_error
        self._warned: set[str] = set()

    def __call__(self, completions: list[str], examples: list[Example], **ctx: Any) -> RewardOutput:
        n = len(completions)
        per_fn: dict[str, torch.Tensor] = {}
        errors: dict[str, torch.Tensor] = {}
        counts: dict[str, float] = {}
        for name, fn in self.functions.items():
            try:
                returned = fn(completions, examples, **ctx)
            except Exception as err:  # the user's code: say whose it was and keep the cause
                what = f"reward function {name!r} raised {type(err).__name__}: {err}"
                if self.on_error == "raise":
                    raise RewardError(
                        f"{what} (reward.on_error=zero scores such a batch 0 and goes on)"
                    ) from err
                self._warn_once(name, f"{what}; all {n} samples of the batch score 0")
                per_fn[name] = torch.zeros(n, dtype=torch.float32)
                errors[name] = torch.ones(n, dtype=torch.bool)
                continue
            counts.update(_pop_counts(name, fn))
            scores, is_none = self._check(name, returned, n)
            bad = ~torch.isfinite(scores) & ~is_none
            if bad.any():
                i = int(bad.nonzero()[0])
                what = f"reward function {name!r} returned {_shown(returned[i])} for sample {i}"
                if self.on_error == "raise":
                    raise RewardError(
                        f"{what}; rewards must be finite float32 numbers (return None to leave a "
                        "sample out, or set reward.on_error=zero to score it 0)"
                    )
                self._warn_once(name, f"{what}; non-finite scores count as 0")
                scores = scores.masked_fill(bad, 0.0)
            per_fn[name] = scores
            if self.on_error == "zero":
                errors[name] = bad
        total = torch.zeros(n, dtype=torch.float32)
        for name, scores in per_fn.items():
            total += self.weights[name] * torch.nan_to_num(scores, nan=0.0)
        return RewardOutput(total=total, per_fn=per_fn, errors=errors, counts=counts)

    def _warn_once(self, name: str, what: str) -> None:
        # A failing scorer usually fails again: one line per function, the count is a metric.
        if name in self._warned:
            return
        self._warned.add(name)
        log.warning(
            "%s (reward.on_error=zero). Later failures of %r are only counted, in rewards/%s/errors.",
            what,
            name,
            name,
        )

    @staticmethod
    def _check(name: str, scores: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) float32 scores with NaN for None, and (n,) bool where the score was None.

        Non-finite numbers (and numbers too large for float32, which become inf) are kept for
        the caller to raise on or zero.
        """
        if scores is None or len(scores) != n:
            got = "None" if scores is None else f"{len(scores)} scores"
            raise RewardError(f"reward function {name!r} returned {got}; expected a list of {n}")
        values, is_none = [], []
        for i, s in enumerate(scores):
            is_none.append(s is None)
            if s is None:
                values.append(math.nan)
                continue
            try:
                values.append(float(s))
            except OverflowError:  # an int beyond float range: as unusable as inf
                values.append(math.inf)
            except (TypeError, ValueError):
                raise RewardError(
                    f"reward function {name!r} returned {s!r} for sample {i}; expected a number or None"
                ) from None
        return torch.tensor(values, dtype=torch.float32), torch.tensor(is_none, dtype=torch.bool)


def _pop_counts(name: str, fn: RewardFn) -> dict[str, float]:
    """What a function counted in its last call (``fn.pop_counts()``, when it has one)."""
    pop = getattr(fn, "pop_counts", None)
    if not callable(pop):
        return {}
    return {f"{name}/{key}": float(value) for key, value in pop().items()}


def _shown(score: Any) -> str:
    """A short text for a bad score (repr of a huge int is long, and past 4300 digits raises)."""
    try:
        return repr(float(score))
    except OverflowError:
        return "an integer beyond float range"
