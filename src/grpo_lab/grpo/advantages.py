"""Advantages: how a group's rewards become one advantage per completion (``conf/advantage/``).

Each option is a small dataclass whose fields are its config; calling it on the rewards (N,)
of B groups of G (grouped contiguously) gives the advantages (N,). The math is
``objective.group_advantages``; a group whose rewards are all equal gets A = 0 under every option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from grpo_lab.grpo import fields
from grpo_lab.grpo.fields import Lazy, Range, ranged

if TYPE_CHECKING:
    from torch import Tensor

objective = Lazy("grpo_lab.objective")


class Advantage(Protocol):
    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        """rewards (N,) -> advantages (N,)."""
        ...


@dataclass(frozen=True)
class GroupZScore:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps): GRPO's outcome supervision,
    DeepSeekMath (arXiv 2402.03300) sec. 4.1.2. Population std unless ``unbiased_std``."""

    GROUP: ClassVar[str] = "advantage"
    eps: float = ranged(1e-6, Range(gt=0))
    unbiased_std: bool = False

    def __post_init__(self) -> None:
        fields.check(self, "advantage.")

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        return objective.group_advantages(
            rewards, group_size, scale="group_std", eps=self.eps, unbiased_std=self.unbiased_std
        )


@dataclass(frozen=True)
class BatchStd:
    """A_i = (r_i - mean(r_group)) / (std(r_batch) + eps): REINFORCE++'s "local mean, global
    std" (arXiv 2501.03262), TRL's scale_rewards="batch"."""

    GROUP: ClassVar[str] = "advantage"
    eps: float = ranged(1e-6, Range(gt=0))
    unbiased_std: bool = False

    def __post_init__(self) -> None:
        fields.check(self, "advantage.")

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        return objective.group_advantages(
            rewards, group_size, scale="batch_std", eps=self.eps, unbiased_std=self.unbiased_std
        )


@dataclass(frozen=True)
class GroupMean:
    """A_i = r_i - mean(r_group), no division by a std: Dr. GRPO (arXiv 2503.20783)."""

    GROUP: ClassVar[str] = "advantage"

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        return objective.group_advantages(rewards, group_size, scale="none")


@dataclass(frozen=True)
class RLOO:
    """A_i = r_i - 1/(G-1) sum_{j != i} r_j: the leave-one-out baseline, no scaling (RLOO,
    arXiv 2402.14740)."""

    GROUP: ClassVar[str] = "advantage"

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        return objective.group_advantages(rewards, group_size, scale="rloo")
