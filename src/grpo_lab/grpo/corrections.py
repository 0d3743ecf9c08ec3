"""Off-policy corrections (``conf/correction/``) for the gap between the sampler's distribution q
and pi_old: a per-token weight (N, T), detached, on the policy-gradient term.

q is ``Completions.sampling_logp`` (after temperature and top_k/top_p/min_p filtering, and in the
sampler's precision); pi_old is the full softmax the loss uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from grpo_lab.grpo import fields
from grpo_lab.grpo.fields import Choice, Lazy, Range, ranged

if TYPE_CHECKING:
    from torch import Tensor

torch = Lazy("torch")


class Correction(Protocol):
    def __call__(
        self, old_logp: Tensor, sampling_logp: Tensor | None, mask: Tensor
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """-> (weight per token (N, T) or None for none, diagnostics as scalars)."""
        ...


@dataclass(frozen=True)
class NoCorrection:
    """No correction: the tokens are taken as drawn from pi_old (the paper's assumption)."""

    GROUP: ClassVar[str] = "correction"

    def __call__(
        self, old_logp: Tensor, sampling_logp: Tensor | None, mask: Tensor
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        return None, {}


def _importance_log_ratio(
    old_logp: Tensor, sampling_logp: Tensor | None, mask: Tensor, level: str, sequence_ratio: str
) -> Tensor:
    """log(pi_old / q) per token (N, T), or per completion broadcast to its tokens: the sum over
    the completion (``product``) or its mean (``geometric_mean``). 0 on padding."""
    if sampling_logp is None:
        raise ValueError(
            "an off-policy correction needs the sampler's log-probs (Completions.sampling_logp), "
            "and this sampler records none; use sampler=kv_cache or sampler=generate, or "
            "correction=none"
        )
    real = mask.bool()
    zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
    log_ratio = torch.where(real, old_logp.detach() - sampling_logp, zero)  # (N, T)
    if level == "token":
        return log_ratio
    total = log_ratio.sum(dim=1, keepdim=True)  # (N, 1)
    if sequence_ratio == "geometric_mean":
        total = total / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(real, total.expand_as(log_ratio), zero)


def _stats(weight: Tensor, capped: Tensor, mask: Tensor, capped_name: str) -> dict[str, Tensor]:
    n = mask.sum().clamp(min=1)
    return {
        "sampling/importance_sampling_ratio/mean": (weight * mask).sum() / n,
        f"sampling/importance_sampling_ratio/{capped_name}": (capped & mask.bool()).sum() / n,
    }


_LEVEL = Choice(("token", "sequence"))
_SEQUENCE_RATIO = Choice(("product", "geometric_mean"))


@dataclass(frozen=True)
class TIS:
    """Truncated importance sampling: w_t = min(pi_old / q, cap), detached, on the policy-gradient
    term. Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"; verl truncates token ratios at 2 (the default here). level sequence: one ratio per
    completion, the product of its tokens' ratios or their geometric mean."""

    GROUP: ClassVar[str] = "correction"
    cap: float = ranged(2.0, Range(gt=0, infinite=True, why="inf = no truncation"))
    level: str = ranged("token", _LEVEL)
    sequence_ratio: str = ranged("product", _SEQUENCE_RATIO)

    def __post_init__(self) -> None:
        fields.check(self, "correction.")

    def __call__(
        self, old_logp: Tensor, sampling_logp: Tensor | None, mask: Tensor
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        log_ratio = _importance_log_ratio(
            old_logp, sampling_logp, mask, self.level, self.sequence_ratio
        )
        log_cap = math.log(self.cap)
        weight = torch.exp(log_ratio.clamp(max=log_cap))  # min(ratio, cap), no overflow
        return weight, _stats(weight, log_ratio > log_cap, mask, "clipped_fraction")


@dataclass(frozen=True)
class MIS:
    """Masked importance sampling: w_t = pi_old / q where that is at most cap, else 0 (the token,
    or the whole completion at level sequence, gets no policy gradient but stays in the loss's
    denominator). TRL's rollout correction defaults to a sequence-level mask with cap 3 (the
    defaults here)."""

    GROUP: ClassVar[str] = "correction"
    cap: float = ranged(3.0, Range(gt=0, infinite=True, why="inf = no mask"))
    level: str = ranged("sequence", _LEVEL)
    sequence_ratio: str = ranged("product", _SEQUENCE_RATIO)

    def __post_init__(self) -> None:
        fields.check(self, "correction.")

    def __call__(
        self, old_logp: Tensor, sampling_logp: Tensor | None, mask: Tensor
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        log_ratio = _importance_log_ratio(
            old_logp, sampling_logp, mask, self.level, self.sequence_ratio
        )
        over = log_ratio > math.log(self.cap)
        # selecting the exponent, not the result: exp of a huge ratio would be inf, and inf * 0 NaN
        weight = torch.where(over, 0.0, torch.exp(torch.where(over, 0.0, log_ratio)))
        return weight, _stats(weight, over, mask, "masked_fraction")
