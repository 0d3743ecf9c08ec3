"""The data a GRPO step passes between its stages. Frozen: a stage returns a new one."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from grpo_lab.sampling.base import Completions
from grpo_lab.tasks.base import Example


@dataclass(frozen=True)
class Rollout:
    """A scored batch of N = B*G completions, rows grouped by prompt.

    completions:   see ``Completions``
    examples:      (N,) the example each row answers
    texts:         (N,) decoded completions
    rewards:       (N,) weighted reward (before a KL penalty in reward mode)
    per_fn:        name -> (N,) each reward function's scores (NaN = None)
    reward_errors: name -> (N,) bool, samples that reward.on_error=zero scored 0 (empty: raise)
    advantages:    (N,) zeros until ``step.prepare`` sets them
    old_logp:      (N, T) log pi_old, taken before the first update; None when the rollout gets
                   exactly one optimizer step (pi_old is then pi_theta detached, exactly)
    ref_logp:      (N, T) log pi_ref, or None without a KL term
    pg_mask:       (N, T) 1 on the tokens that get the policy-gradient term (``loss.*`` may
                   select some by pi_old's entropy), or None for every token
    reward_counts: "<fn>/<key>" -> what reward functions counted while scoring this rollout
                   (e.g. math_verify's timeouts; summed over dynamic sampling's rounds)
    stats:         the rollout's diagnostics (TRL's names), logged with the step's
    """

    completions: Completions
    examples: list[Example]
    texts: list[str]
    rewards: Tensor
    per_fn: dict[str, Tensor]
    reward_errors: dict[str, Tensor]
    advantages: Tensor
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    pg_mask: Tensor | None = None
    reward_counts: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.rewards.shape[0])


def select_rows(c: Completions, idx: Tensor) -> Completions:
    """The completions of rows ``idx``."""
    return Completions(
        prompt_ids=c.prompt_ids[idx],
        prompt_mask=c.prompt_mask[idx],
        completion_ids=c.completion_ids[idx],
        completion_mask=c.completion_mask[idx],
        truncated=c.truncated[idx],
        sampling_logp=None if c.sampling_logp is None else c.sampling_logp[idx],
    )
