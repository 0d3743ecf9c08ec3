"""Off-policy corrections (``conf/correction/``) for the gap between the sampler's distribution q
and pi_old: a per-token weight (N, T), detached, on the policy-gradient term.

q is ``Completions.sampling_logp`` (after temperature and top_k/top_p/min_p filtering, and in the
sampler's precision); pi_old is the full softmax the loss uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from grpo_lab.grpo.fields import Lazy

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
