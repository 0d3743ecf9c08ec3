"""Surrogates (``conf/surrogate/``): the policy-gradient objective per token.

A surrogate takes log pi_theta and log pi_old (N, T), the advantages (N,) and the mask, and
gives the objective to maximise per token (N, T) with the log-ratio it used (for the logged
ratio and clip fractions). The loss is -objective (grpo.loss). Log-probs arrive with padding
already set to 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional, Protocol

from grpo_lab.grpo import fields
from grpo_lab.grpo.fields import Lazy, Range, ranged

if TYPE_CHECKING:
    from torch import Tensor

torch = Lazy("torch")
objective = Lazy("grpo_lab.objective")


class Surrogate(Protocol):
    def __call__(
        self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """-> (objective per token (N, T), log rho (N, T))."""
        ...

    def clip_fractions(
        self, log_ratio: Tensor, advantages: Tensor, mask: Tensor
    ) -> dict[str, Tensor]:
        """TRL's clip_ratio/{low,high,region}_mean: fractions of real tokens the clip cut."""
        ...


_EPS_LOW = Range(gt=0, lt=1)
_EPS_HIGH = Range(gt=0, infinite=True, why="inf = no upper clip")
_DUAL_CLIP = Range(gt=1, nullable=True)


@dataclass(frozen=True)
class PPOClip:
    """min(rho A, clip(rho, 1-epsilon_low, 1+epsilon_high) A) per token, rho = pi/pi_old:
    DeepSeekMath eq. 3 (PPO's clip); epsilon_high > epsilon_low is DAPO's clip-higher.
    dual_clip c > 1 bounds negative-advantage tokens' objective below by c*A (Ye et al. 2020)."""

    GROUP: ClassVar[str] = "surrogate"
    ratio_level: ClassVar[str] = "token"
    epsilon_low: float = ranged(0.2, _EPS_LOW)
    epsilon_high: float = ranged(0.2, _EPS_HIGH)
    dual_clip: Optional[float] = ranged(None, _DUAL_CLIP)  # noqa: UP045 - OmegaConf reads Optional

    def __post_init__(self) -> None:
        fields.check(self, "surrogate.")

    def __call__(
        self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        log_ratio = objective.importance_log_ratio(logp, old_logp, mask, self.ratio_level)
        surrogate = objective.clipped_surrogate(
            log_ratio, advantages, self.epsilon_low, self.epsilon_high, self.dual_clip
        )
        return surrogate, log_ratio

    def clip_fractions(
        self, log_ratio: Tensor, advantages: Tensor, mask: Tensor
    ) -> dict[str, Tensor]:
        return objective.clip_fractions(
            log_ratio, advantages, mask, self.epsilon_low, self.epsilon_high
        )


@dataclass(frozen=True)
class GSPO(PPOClip):
    """PPO's clip on GSPO's sequence ratio s_i = (pi(o_i)/pi_old(o_i))^(1/|o_i|) (Zheng et al.
    2025, arXiv 2507.18071), in the GSPO-token form: each token carries s_i's value with the
    gradient of its own log-prob / |o_i|. The paper clips to [1 - 3e-4, 1 + 4e-4]."""

    ratio_level: ClassVar[str] = "sequence"
    epsilon_low: float = ranged(3e-4, _EPS_LOW)
    epsilon_high: float = ranged(4e-4, _EPS_HIGH)


@dataclass(frozen=True)
class CISPO:
    """sg(clip(rho, min_weight, max_weight)) * A * log pi_theta per token: CISPO, MiniMax-M1
    (arXiv 2506.13585) eq. 4. The importance weight is clipped and detached, so every token keeps
    its gradient A * w * grad log pi (PPO's clip drops the clipped tokens' gradient).

    min_weight, max_weight: absolute bounds on the weight rho itself, not 1 -/+ epsilon. The
    paper's clip(rho, 1 - eps_low, 1 + eps_high) is min_weight = 1 - eps_low, max_weight =
    1 + eps_high; it sets no lower bound in practice (min_weight 0). TRL's ``epsilon_high`` for
    loss_type="cispo" is this max_weight (its docs advise 5.0, the default here).
    """

    GROUP: ClassVar[str] = "surrogate"
    min_weight: float = ranged(0.0, Range(ge=0, lt=1, why="0 = no lower bound"))
    max_weight: float = ranged(5.0, Range(gt=1, infinite=True, why="inf = no upper bound"))

    def __post_init__(self) -> None:
        fields.check(self, "surrogate.")

    def __call__(
        self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        log_ratio = logp - old_logp  # (N, T)
        weight = torch.exp(log_ratio.detach()).clamp(self.min_weight, self.max_weight)
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (N, 1)
        return weight * adv * logp, log_ratio

    def clip_fractions(
        self, log_ratio: Tensor, advantages: Tensor, mask: Tensor
    ) -> dict[str, Tensor]:
        """Fractions of real tokens whose weight was clipped below, above, either."""
        ratio = torch.exp(log_ratio.detach())
        n = mask.sum().clamp(min=1)
        low = ((ratio < self.min_weight) & mask.bool()).sum() / n
        high = ((ratio > self.max_weight) & mask.bool()).sum() / n
        return {"low": low, "high": high, "region": low + high}


@dataclass(frozen=True)
class SAPO:
    """(4 / tau) * sigmoid(tau * (rho - 1)) * A per token, tau = tau_pos where A > 0 and tau_neg
    where A <= 0: SAPO (Qwen, arXiv 2511.20347), as TRL's loss_type="sapo" implements it. A smooth
    gate in place of the hard clip: its slope in rho is 1 at rho = 1 (the on-policy gradient) and
    fades as rho leaves 1, faster for the larger temperature. No token is clipped, so the logged
    clip fractions are 0.
    """

    GROUP: ClassVar[str] = "surrogate"
    tau_pos: float = ranged(1.0, Range(gt=0))
    tau_neg: float = ranged(1.05, Range(gt=0))

    def __post_init__(self) -> None:
        fields.check(self, "surrogate.")

    def __call__(
        self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        log_ratio = logp - old_logp  # (N, T)
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (N, 1)
        tau = torch.where(adv > 0, self.tau_pos, self.tau_neg)  # (N, 1)
        gate = torch.sigmoid(tau * (torch.exp(log_ratio) - 1.0)) * 4.0 / tau
        return gate * adv, log_ratio

    def clip_fractions(
        self, log_ratio: Tensor, advantages: Tensor, mask: Tensor
    ) -> dict[str, Tensor]:
        zero = torch.zeros((), device=log_ratio.device)
        return {"low": zero, "high": zero, "region": zero}
