"""The GRPO step as a recipe over the algorithm's parts (DeepSeekMath, arXiv 2402.03300, Alg. 1).

    1 sample and score G completions per prompt (with dynamic sampling)
    2 log pi_ref (when there is a KL term) and log pi_old (when the rollout gets more than one
      optimizer step: every step after the first is off-policy)
    3 advantages (a KL penalty enters the rewards first in kl.mode=reward)
    4 for mu passes / mini-batches / micro-batches: log pi_theta, the loss, backward
    5 clip the gradient and step, or skip a non-finite one

Shapes: N = B*G completions, grouped by prompt; T = longest completion. Steps 1-3 are ``prepare``,
4-5 ``update``. The host (the LightningModule) supplies sampling, backward and the optimizer
step through ``StepHost``; nothing here knows Lightning.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from grpo_lab import distributed
from grpo_lab.grpo.advantages import Advantage
from grpo_lab.grpo.aggregation import Aggregation
from grpo_lab.grpo.batching import Batching
from grpo_lab.grpo.corrections import Correction
from grpo_lab.grpo.guards import check_finite_loss
from grpo_lab.grpo.kl import KL
from grpo_lab.grpo.loss import LossOptions, policy_loss
from grpo_lab.grpo.rollout import DynamicSampling, sample_with_dynamic_sampling
from grpo_lab.grpo.surrogates import Surrogate
from grpo_lab.grpo.types import Rollout, select_rows
from grpo_lab.instantiate import instantiate
from grpo_lab.objective import masked_mean
from grpo_lab.policy.forward import completion_logprobs
from grpo_lab.sampling.base import Completions, sampling_logp_gap
from grpo_lab.tasks.base import Example


@dataclass(frozen=True)
class Algorithm:
    """The parts of the step, each built from its config group by ``from_config``."""

    G: int
    mu: int
    advantage: Advantage
    kl: KL
    surrogate: Surrogate
    aggregation: Aggregation
    correction: Correction
    loss: LossOptions
    batching: Batching

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Algorithm:
        return cls(
            G=cfg.G,
            mu=cfg.mu,
            advantage=instantiate(cfg.advantage),
            kl=instantiate(cfg.kl),
            surrogate=instantiate(cfg.surrogate),
            aggregation=instantiate(cfg.aggregation),
            correction=instantiate(cfg.correction),
            loss=LossOptions(**cfg.loss),
            batching=Batching.from_config(cfg),
        )

    @property
    def group_size(self) -> int | None:
        """G when the forwards share each group's prompt, else None (see policy.forward)."""
        return self.G if self.batching.shared else None


class StepHost(Protocol):
    """What the step needs from the module that runs it."""

    policy: nn.Module
    device: torch.device
    sampler: Any
    task: Any
    model_impl: str
    dynamic_sampling: DynamicSampling
    pad_token_id: int
    rollouts_done: int

    def phase(self, name: str) -> AbstractContextManager: ...

    def sample_and_score(self, examples: list[Example]) -> Rollout: ...

    def reference(self) -> tuple[nn.Module, AbstractContextManager]: ...

    def clear_gradients(self) -> None: ...

    def backward_micro(self, loss: Tensor, sync: bool) -> None: ...

    def optimizer_step(self) -> tuple[float, float]:
        """Clip and step (or skip a non-finite gradient): (gradient norm, learning rate used)."""
        ...


def prepare(algo: Algorithm, host: StepHost, examples: list[Example]) -> Rollout:
    """Steps 1-3: a scored rollout with its advantages, pi_ref and pi_old (no gradient)."""
    was_training = host.policy.training
    host.policy.eval()
    with torch.no_grad():
        # 1 sample and score (dynamic sampling)
        rollout = sample_with_dynamic_sampling(
            host.sample_and_score, examples, algo.G, host.dynamic_sampling, host.task,
            host.pad_token_id,
        )  # fmt: skip
        c = rollout.completions
        # 2 pi_ref, pi_old
        ref_logp = old_logp = None
        if algo.kl.active:
            with host.phase("ref_logprobs"):
                model, base = host.reference()
                with base:
                    ref_logp, _ = logprobs_in_chunks(algo, host, model, c)  # (N, T)
        one_step = algo.batching.steps_per_rollout(algo.mu, rollout.size) == 1
        logp = old_entropy = None  # log pi of the sampling policy, its entropy (N, T) each
        if not one_step or algo.loss.needs_old_entropy:
            with host.phase("old_logprobs"):
                logp, old_entropy = logprobs_in_chunks(
                    algo, host, host.policy, c, with_entropy=algo.loss.needs_old_entropy
                )
        # one step per rollout: pi_old is pi_theta detached, exactly (the loss takes it then)
        old_logp = None if one_step else logp
        pg_mask, selection_stats = algo.loss.select_tokens(old_entropy, c.completion_mask)
        # 3 advantages
        rewards = rollout.rewards  # (N,)
        if algo.kl.in_reward:
            if logp is None:
                with host.phase("old_logprobs"):
                    logp, _ = logprobs_in_chunks(algo, host, host.policy, c)
            rewards = algo.kl.penalised_rewards(rewards, logp, ref_logp, c.completion_mask)
        advantages = algo.advantage(rewards, algo.G)  # (N,)
    if was_training:
        host.policy.train()
    return dataclasses.replace(
        rollout,
        advantages=advantages,
        old_logp=old_logp,
        ref_logp=ref_logp,
        pg_mask=pg_mask,
        stats={**rollout.stats, **selection_stats},
    )


def update(algo: Algorithm, host: StepHost, rollout: Rollout) -> dict[str, float]:
    """Steps 4-5: mu passes over the rollout, one optimizer step per mini-batch; returns the
    step's statistics (means over its optimizer steps)."""
    N = rollout.size
    mini, micro = algo.batching.minibatch(N), algo.batching.microbatch(N)
    c = rollout.completions
    # |log q - log pi_old| per token, filled on the first pass that reaches each row
    gap = None if c.sampling_logp is None else torch.full_like(c.sampling_logp, float("nan"))
    sums: dict[str, float] = {}
    grad_norms: list[float] = []
    n_updates = skipped = 0
    lr = float("nan")
    # 4 for mu / mini / micro: log-probs, loss, backward
    for _ in range(algo.mu):
        order = algo.batching.order(N, shuffle=algo.mu > 1 or mini < N, device=host.device)
        for start in range(0, N, mini):
            stats = minibatch_backward(algo, host, rollout, order[start : start + mini], micro, gap)
            # 5 clip, skip or step
            grad_norm, lr = host.optimizer_step()
            if math.isfinite(grad_norm):
                grad_norms.append(grad_norm)
            else:
                skipped += 1
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n_updates += 1
    out = {k: v / n_updates for k, v in sums.items()}
    out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    out["skipped_steps"] = float(skipped)
    out["lr"] = lr  # of the rollout's last update
    if gap is not None and not gap[:, 0].isnan().any():
        out["sampling/sampling_logp_difference/mean"] = (
            gap.sum() / c.completion_mask.sum().clamp(min=1)
        ).item()
        out["sampling/sampling_logp_difference/max"] = gap.max().item()
    return out


def minibatch_backward(
    algo: Algorithm, host: StepHost, rollout: Rollout, idx: Tensor, micro: int, gap: Tensor | None
) -> dict[str, float]:
    """Forward and backward over the mini-batch ``idx`` in micro-batches (gradients accumulate).

    Each micro-batch's loss is weighted by its share of the mini-batch, so the sum of the
    backwards is the mini-batch's loss: rows / |idx| for the per-sequence aggregations, real
    tokens / tokens of the mini-batch over all ranks for token_mean. Token means (ratio, clip
    fractions, KL, entropy) combine by token count whatever the aggregation.
    """
    c = rollout.completions
    mask = c.completion_mask  # (N, T)
    if algo.loss.mask_truncated:
        mask = mask * (~c.truncated).long().unsqueeze(1)
    by_tokens = algo.aggregation.by_tokens
    # seq_mean_* need no communication: every rank holds as many rows, so DDP's average of the
    # ranks' row means is the row mean over all ranks. token_mean does (see distributed).
    total = distributed.token_mean_denominator(mask[idx].sum()) if by_tokens else len(idx)
    total_tokens = mask[idx].sum().clamp(min=1).item()
    host.clear_gradients()
    chunks = list(torch.split(idx, micro))
    sums: dict[str, float] = {}
    for i, chunk in enumerate(chunks):
        weight = (mask[chunk].sum().item() if by_tokens else float(len(chunk))) / total
        token_weight = mask[chunk].sum().item() / total_tokens
        sub = select_rows(c, chunk)
        sub.completion_mask = mask[chunk]
        logp, entropy = logprobs(
            algo, host, host.policy, sub, with_entropy=True,
            entropy_grad=bool(algo.loss.entropy_coef),
        )  # (n, T) each  # fmt: skip
        old = rollout.old_logp[chunk] if rollout.old_logp is not None else logp.detach()
        ref = rollout.ref_logp[chunk] if rollout.ref_logp is not None else None
        if gap is not None:
            _record_gap(gap, c, chunk, old)
        weights, correction_stats = algo.correction(old, sub.sampling_logp, sub.completion_mask)
        if rollout.pg_mask is not None:  # tokens the loss options left out of the gradient
            keep = rollout.pg_mask[chunk].to(logp.dtype)
            weights = keep if weights is None else weights * keep
        loss, stats = policy_loss(
            logp,
            old,
            rollout.advantages[chunk],
            sub.completion_mask,
            surrogate=algo.surrogate,
            aggregation=algo.aggregation,
            kl=algo.kl,
            ref_logp=ref,
            weights=weights,
            entropy=entropy,
            entropy_coef=algo.loss.entropy_coef,
        )
        check_finite_loss(loss, host.rollouts_done + 1)
        # Under DDP, gradients sync on the last micro-batch of the mini-batch only.
        host.backward_micro(loss * weight, sync=i == len(chunks) - 1)
        if ref is not None and algo.kl.in_reward:  # the KL the reward was penalised by
            stats.kl = masked_mean(algo.kl.per_token(logp.detach(), ref), sub.completion_mask)
        # With one optimizer step per rollout the ratio is exactly 1 and this loss is ~0
        # although its gradient is not: -A * grad log pi / |o_i| (see grpo.loss).
        for name, value in {"loss": stats.loss, "surrogate": stats.surrogate}.items():
            sums[name] = sums.get(name, 0.0) + weight * float(value)
        for name, value in {
            "kl": stats.kl,
            "entropy": stats.entropy,
            "clip_ratio/low_mean": stats.clip_low,
            "clip_ratio/high_mean": stats.clip_high,
            "clip_ratio/region_mean": stats.clip_region,
            "ratio_mean": stats.ratio_mean,
            **correction_stats,
        }.items():
            sums[name] = sums.get(name, 0.0) + token_weight * float(value)
    return sums


def _record_gap(gap: Tensor, c: Completions, rows: Tensor, old: Tensor) -> None:
    """TRL's sampling/sampling_logp_difference: |log q - log pi_old| over real tokens. q is the
    sampler's distribution (after top_k/top_p/min_p); pi_old is the same on every pass, so each
    row counts once, on the first pass that reaches it."""
    new = gap[rows, 0].isnan()  # (n,)
    rows = rows[new]
    gap[rows] = sampling_logp_gap(c.sampling_logp[rows], old[new].detach(), c.completion_mask[rows])


def logprobs(
    algo: Algorithm, host: StepHost, model: nn.Module, completions: Completions, **kw: Any
) -> tuple[Tensor, Tensor | None]:
    """log pi (N, T) of the completions under ``model`` at the sampler's temperature."""
    return completion_logprobs(
        model,
        completions,
        temperature=host.sampler.temperature,
        group_size=algo.group_size,
        model_impl=host.model_impl,
        **kw,
    )


def logprobs_in_chunks(
    algo: Algorithm,
    host: StepHost,
    model: nn.Module,
    completions: Completions,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log pi (N, T) of a whole rollout, and its entropy (N, T) when asked, in chunks of the
    micro-batch size (whole groups with the shared prefix): B*G rows may not fit at once. In
    inference mode; the results are cloned out of it so that the loss may use them beside tensors
    that need grad."""
    n = completions.completion_ids.shape[0]
    rows = torch.arange(n, device=completions.completion_ids.device)
    with torch.inference_mode():
        parts = [
            logprobs(algo, host, model, select_rows(completions, idx), with_entropy=with_entropy)
            for idx in rows.split(algo.batching.microbatch(n))
        ]
        logp = torch.cat([p[0] for p in parts]).clone()
        entropy = torch.cat([p[1] for p in parts]).clone() if with_entropy else None
    return logp, entropy
