"""Aggregations (``conf/aggregation/``): how a per-token loss (N, T) becomes one number.

``by_tokens`` says whether the weight of a micro-batch is its token count (token_mean) or its row
count: the step weighs micro-batches, and under DDP token_mean divides by the tokens of all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from grpo_lab.grpo import fields
from grpo_lab.grpo.fields import Lazy, Range, ranged

if TYPE_CHECKING:
    from torch import Tensor

objective = Lazy("grpo_lab.objective")


class Aggregation(Protocol):
    by_tokens: bool

    def __call__(self, per_token: Tensor, mask: Tensor) -> Tensor:
        """(N, T) per-token values, mask (N, T) -> a scalar; padding never counts."""
        ...


@dataclass(frozen=True)
class SeqMeanTokenMean:
    """1/N sum_i 1/|o_i| sum_t x_it: the paper's form (DeepSeekMath eq. 3)."""

    GROUP: ClassVar[str] = "aggregation"
    by_tokens: ClassVar[bool] = False

    def __call__(self, per_token: Tensor, mask: Tensor) -> Tensor:
        return objective.aggregate(per_token, mask, "seq_mean_token_mean")


@dataclass(frozen=True)
class TokenMean:
    """sum_it x_it / sum_i |o_i|: DAPO's token-level loss (arXiv 2503.14476), TRL's "dapo"."""

    GROUP: ClassVar[str] = "aggregation"
    by_tokens: ClassVar[bool] = True

    def __call__(self, per_token: Tensor, mask: Tensor) -> Tensor:
        return objective.aggregate(per_token, mask, "token_mean")


@dataclass(frozen=True)
class SeqMeanTokenSumNorm:
    """1/N sum_i 1/L sum_t x_it with a constant L = max_len (sampler.max_new_tokens): Dr. GRPO
    (arXiv 2503.20783), TRL's "dr_grpo"."""

    GROUP: ClassVar[str] = "aggregation"
    by_tokens: ClassVar[bool] = False
    max_len: int = ranged(1, Range(integer=True, ge=1))

    def __post_init__(self) -> None:
        fields.check(self, "aggregation.")

    def __call__(self, per_token: Tensor, mask: Tensor) -> Tensor:
        return objective.aggregate(per_token, mask, "seq_mean_token_sum_norm", self.max_len)
