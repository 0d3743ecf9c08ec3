"""The KL term to the reference policy (``conf/kl/``): its estimator, its weight beta, and
where it enters (each token's loss, as the paper, or the reward, as PPO-RLHF)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from grpo_lab.grpo import fields
from grpo_lab.grpo.fields import Choice, Lazy, Range, ranged

if TYPE_CHECKING:
    from torch import Tensor, nn

torch = Lazy("torch")
objective = Lazy("grpo_lab.objective")


@dataclass(frozen=True)
class KL:
    """Per-token KL(pi_theta || pi_ref) by ``estimator`` (k1, k2, k3: Schulman's "Approximating
    KL Divergence"; k3 is DeepSeekMath's eq. 4), weighted by ``beta``.

    estimator none, or beta 0, turns the term off, and then no reference model exists at all.
    mode loss: beta * KL_t joins each token's loss. mode reward: r_i <- r_i - beta sum_t KL_t
    before the advantages (no gradient of its own).
    """

    GROUP: ClassVar[str] = "kl"
    estimator: str = ranged("k3", Choice(("k1", "k2", "k3", "none")))
    beta: float = ranged(0.0, Range(ge=0, why="0 turns the KL term and the reference model off"))
    mode: str = ranged("loss", Choice(("loss", "reward")))

    def __post_init__(self) -> None:
        fields.check(self, "kl.")

    @property
    def active(self) -> bool:
        """Whether there is a KL term, and so a reference model."""
        return self.estimator != "none" and self.beta > 0

    @property
    def loss_beta(self) -> float:
        """The weight of KL in each token's loss (0 in reward mode)."""
        return self.beta if self.active and self.mode == "loss" else 0.0

    @property
    def in_reward(self) -> bool:
        return self.active and self.mode == "reward"

    def per_token(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        """(N, T) KL estimate per token."""
        return objective.kl_estimate(logp, ref_logp, self.estimator)

    def penalised_rewards(
        self, rewards: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor
    ) -> Tensor:
        """r_i - beta * sum_t KL_t(o_i), (N,)."""
        return objective.kl_penalised_rewards(
            rewards, logp, ref_logp, mask, self.beta, self.estimator
        )


def refresh_reference(reference: nn.Module, policy: nn.Module, mix: float) -> None:
    """pi_ref <- mix * pi_theta + (1 - mix) * pi_ref, parameter by parameter: a hard reset at
    mix 1 (iterative GRPO, DeepSeekMath sec. 4.1.3), TR-DPO's soft update below it (Gorbatovski
    et al. 2024, arXiv 2404.09656)."""
    with torch.no_grad():
        for ref_p, p in zip(reference.parameters(), policy.parameters()):
            ref_p.mul_(1.0 - mix).add_(p.detach(), alpha=mix)
