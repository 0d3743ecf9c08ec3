"""The per-token GRPO loss assembled from the parts, then aggregated (``loss.*`` in the config).

    loss_t = -(w_t * surrogate_t) + beta * KL_t - entropy_coef * H_t,   then ``aggregation``

w_t is the off-policy correction's weight (1 without one), on the policy-gradient term only: the
KL term stays unweighted (as in TRL's and verl's rollout correction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from grpo_lab.grpo import fields
from grpo_lab.grpo.fields import Lazy, Range, ranged

if TYPE_CHECKING:
    from torch import Tensor

    from grpo_lab.grpo.aggregation import Aggregation
    from grpo_lab.grpo.kl import KL
    from grpo_lab.grpo.surrogates import Surrogate
    from grpo_lab.objective import LossStats

torch = Lazy("torch")
objective = Lazy("grpo_lab.objective")


@dataclass(frozen=True)
class LossOptions:
    """``loss.*``: terms and token masks that apply whatever the surrogate.

    entropy_coef: > 0 subtracts coef * H(pi(.|q, o_<t)) per token.
    mask_truncated: completions cut at sampler.max_new_tokens get no loss (DAPO's overlong filter).
    top_entropy_quantile: rho < 1 gives the policy-gradient term to the top rho of the rollout's
      completion tokens by pi_old's entropy only (Wang et al. 2025, "Beyond the 80/20 rule",
      arXiv 2506.01939; TRL's top_entropy_quantile). The threshold is the (1 - rho) quantile over
      every completion token of the rollout batch on every rank, so the micro-batch size and the
      number of processes do not change which tokens are kept (TRL takes it per micro-batch).
    """

    GROUP: ClassVar[str] = "loss"
    entropy_coef: float = ranged(0.0, Range(ge=0, why="0 = no entropy bonus"))
    mask_truncated: bool = False
    top_entropy_quantile: float = ranged(1.0, Range(gt=0, le=1, why="1 = every token"))

    def __post_init__(self) -> None:
        fields.check(self, "loss.")

    @property
    def needs_old_entropy(self) -> bool:
        """Whether ``select_tokens`` reads pi_old's entropy (the step computes it only then)."""
        return self.top_entropy_quantile < 1.0

    def select_tokens(
        self, old_entropy: Tensor | None, mask: Tensor
    ) -> tuple[Tensor | None, dict[str, float]]:
        """The tokens (N, T) of a whole rollout that get the policy-gradient term, or None for
        all of them, and diagnostics. mask: (N, T) real completion tokens."""
        if not self.needs_old_entropy:
            return None, {}
        real = mask.bool()
        every_rank = _all_ranks(old_entropy[real].float())  # (tokens on all ranks,)
        threshold = _quantile(every_rank, 1.0 - self.top_entropy_quantile)
        keep = (old_entropy >= threshold) & real  # (N, T)
        stats = {
            "entropy/threshold": threshold.item(),
            "entropy/selected_fraction": (keep.sum() / real.sum().clamp(min=1)).item(),
        }
        return keep, stats


def _quantile(values: Tensor, q: float) -> Tensor:
    """torch.quantile(values, q) (linear interpolation) of a 1-D tensor of any length:
    torch.quantile refuses more than 2**24 values, fewer than a large rollout's tokens."""
    n = values.numel()
    if n <= 2**24:
        return torch.quantile(values, q)
    ordered = values.sort().values
    pos = q * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    hi = min(lo + 1, n - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _all_ranks(values: Tensor) -> Tensor:
    """The 1-D ``values`` of every process, concatenated (this process's alone without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    world = torch.distributed.get_world_size()
    size = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    surrogate: Surrogate,
    aggregation: Aggregation,
    kl: KL,
    ref_logp: Tensor | None = None,
    weights: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, LossStats]:
    """-J for a batch of completions, plus detached diagnostics.

    logp, old_logp, ref_logp, weights, entropy: (N, T); advantages: (N,); mask: (N, T).
    With mu = 1 and old_logp = logp.detach() the ratio is 1, so the loss value is -mean(A) (about
    0) while its gradient is -A grad log pi / |o_i|.

    Log-probs on padding may be -inf (a masked logit): they are set to 0 before any exp, because
    selecting the output afterwards keeps the value finite but not the gradient.
    """
    logp, old_logp = objective._zero_padding(logp, mask), objective._zero_padding(old_logp, mask)
    if ref_logp is not None:
        ref_logp = objective._zero_padding(ref_logp, mask)
    if entropy is not None:
        entropy = objective._zero_padding(entropy, mask)
    per_token_objective, log_ratio = surrogate(logp, old_logp, advantages, mask)  # (N, T) each
    pg = per_token_objective if weights is None else weights * per_token_objective
    per_token = -pg
    kl_t = torch.zeros_like(logp)
    if kl.loss_beta > 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl_t = kl.per_token(logp, ref_logp)
        per_token = per_token + kl.loss_beta * kl_t
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs entropy")
        per_token = per_token - entropy_coef * entropy
    loss = aggregation(per_token, mask)

    with torch.no_grad():
        clip = surrogate.clip_fractions(log_ratio, advantages, mask)
        stats = objective.LossStats(
            loss=loss.detach(),
            surrogate=aggregation(per_token_objective.detach(), mask),
            kl=objective.masked_mean(kl_t.detach(), mask),
            entropy=objective.masked_mean(entropy.detach(), mask)
            if entropy is not None
            else torch.tensor(0.0),
            clip_low=clip["low"],
            clip_high=clip["high"],
            clip_region=clip["region"],
            ratio_mean=objective.masked_mean(torch.exp(log_ratio.detach()), mask),
        )
    return loss, stats
