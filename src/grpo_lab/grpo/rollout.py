"""Step 1 of the recipe: sample G completions per prompt and score them, with DAPO's dynamic
sampling (groups whose rewards are all equal carry no signal and are replaced by fresh prompts)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from grpo_lab import objective
from grpo_lab.grpo.types import Rollout
from grpo_lab.sampling.base import Completions
from grpo_lab.tasks.base import Example, Task


class DynamicSampling:
    """DAPO's dynamic sampling (arXiv 2503.14476): replace zero-variance groups by groups of fresh
    training prompts until none is left or ``max_tries`` samplings are done.

    The fresh prompts come from this process's own stream, seeded by (seed, rank). Every rank's
    stream goes into the checkpoint, so a resumed run draws on each rank what an uninterrupted
    one would have.
    """

    def __init__(self, enabled: bool, max_tries: int, seed: int) -> None:
        self.enabled = enabled
        self.max_tries = max_tries
        self.seed = seed
        self.rank = 0
        self._gen: torch.Generator | None = None  # made on first use, once the rank is known

    def generator(self) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(prompt_seed(self.seed, self.rank))
        return self._gen

    def fresh_prompts(self, task: Task, n_groups: int) -> list[Example]:
        """n_groups training prompts from this process's stream."""
        pool = task.train()
        picks = torch.randint(len(pool), (n_groups,), generator=self.generator())
        return [pool[i] for i in picks.tolist()]

    def state_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "state": self.generator().get_state()}

    def load_state_dict(self, saved: list[dict[str, Any]], rollouts_done: int) -> None:
        """Continue this rank's stream from ``saved``, the ``state_dict`` of each rank that
        wrote one. Checkpoints written before every rank's stream was saved hold rank 0's only:
        a rank without a saved stream starts one of its own that depends on how far the run
        got, so it does not replay its first prompts."""
        self._gen = torch.Generator()
        own = [s["state"] for s in saved if s is not None and s["rank"] == self.rank]
        if own:
            self._gen.set_state(own[0])
        else:
            self._gen.manual_seed(prompt_seed(self.seed, self.rank, rollouts_done))


def prompt_seed(seed: int, rank: int, resumed_at: int = 0) -> int:
    """Seed of one process's dynamic-sampling prompt stream: distinct for each (seed, rank).
    resumed_at: the rollout a rank without a saved stream resumes at (0 on a fresh start)."""
    entropy = [seed % 2**64, rank, resumed_at]  # SeedSequence takes non-negative integers
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def sample_and_score(host: Any, examples: list[Example]) -> Rollout:
    """G completions of each example's prompt from the host's policy and sampler, decoded and
    scored by its reward functions; advantages are still zeros."""
    G = host.algo.G
    prompt_ids, prompt_mask = host.encode_prompts(examples)  # (B, P) each
    with host.phase("sample"):
        completions = host.sampler.sample(host.policy, prompt_ids, prompt_mask, G)
    with host.phase("reward"):
        texts = host.tokenizer.batch_decode(completions.completion_ids, skip_special_tokens=True)
        per_row = [ex for ex in examples for _ in range(G)]
        out = host.rewards(texts, per_row, **host.reward_context(completions))
        rewards = out.total.to(host.device)  # (N,)
    return Rollout(
        completions=completions,
        examples=per_row,
        texts=texts,
        rewards=rewards,
        per_fn=out.per_fn,
        reward_errors=out.errors,
        reward_counts=out.counts,
        advantages=torch.zeros_like(rewards),
    )


def sample_with_dynamic_sampling(
    sample_and_score: Callable[[list[Example]], Rollout],
    examples: list[Example],
    G: int,
    dynamic: DynamicSampling,
    task: Task,
    pad_id: int,
) -> Rollout:
    """``sample_and_score(examples) -> Rollout``, then DAPO's replacement of dead groups; the
    rollout's stats describe the kept batch, plus what was first sampled."""
    rollout = sample_and_score(examples)
    first: dict[str, float] = {}
    tries = 1
    while dynamic.enabled:
        dead = objective.group_reward_std(rollout.rewards, G) == 0  # (B,)
        if not first:
            # reward/reward_std describe the kept batch; this is what the policy sampled
            first = {
                "dynamic_sampling/drop_rate": dead.float().mean().item(),
                "dynamic_sampling/sampled_reward": rollout.rewards.mean().item(),
            }
        if not dead.any() or tries >= dynamic.max_tries:
            break
        fresh = sample_and_score(dynamic.fresh_prompts(task, int(dead.sum())))
        rollout = replace_groups(rollout, fresh, dead, G, pad_id)
        tries += 1
    stats = rollout_stats(rollout, G)
    if first:
        stats.update(first)
        stats["dynamic_sampling/tries"] = float(tries)
    return dataclasses.replace(rollout, stats=stats)


def rollout_stats(rollout: Rollout, G: int) -> dict[str, float]:
    """TRL-named diagnostics of a scored rollout."""
    rewards, c = rollout.rewards, rollout.completions
    lengths = c.lengths.float()
    group_std = objective.group_reward_std(rewards, G)  # (B,)
    stats = {
        "reward": rewards.mean().item(),
        "reward_std": group_std.mean().item(),
        "frac_reward_zero_std": (group_std == 0).float().mean().item(),
        "completions/mean_length": lengths.mean().item(),
        "completions/max_length": lengths.max().item(),
        "completions/min_length": lengths.min().item(),
        "completions/clipped_ratio": c.truncated.float().mean().item(),
    }
    for name, scores in rollout.per_fn.items():
        valid = ~torch.isnan(scores)
        if valid.any():
            stats[f"rewards/{name}/mean"] = scores[valid].mean().item()
            stats[f"rewards/{name}/std"] = scores[valid].std(unbiased=False).item()
    for name, failed in rollout.reward_errors.items():
        stats[f"rewards/{name}/errors"] = float(failed.sum())  # samples scored 0
    for key, value in rollout.reward_counts.items():
        stats[f"rewards/{key}"] = value
    return stats


def _pad_cat(a: Tensor, b: Tensor, value: int, left: bool) -> tuple[Tensor, Tensor]:
    """Pad two (n, L) tensors to the same width (on the left for prompts)."""
    width = max(a.shape[1], b.shape[1])

    def pad(x: Tensor) -> Tensor:
        extra = width - x.shape[1]
        if not extra:
            return x
        fill = x.new_full((x.shape[0], extra), value)
        return torch.cat([fill, x] if left else [x, fill], dim=1)

    return pad(a), pad(b)


def _put_rows(old: Tensor, rows: Tensor, new: Tensor) -> Tensor:
    out = old.clone()
    out[rows] = new
    return out


def replace_groups(old: Rollout, new: Rollout, dead: Tensor, G: int, pad_id: int) -> Rollout:
    """``old`` with the groups of ``new`` (one per True in ``dead`` (B,), in order) in place of
    its dead groups."""
    rows = dead.repeat_interleave(G).nonzero().squeeze(1)  # (n_dead * G,)
    c, n = old.completions, new.completions
    merged = {}
    for name, value, left in (
        ("prompt_ids", pad_id, True),
        ("prompt_mask", 0, True),
        ("completion_ids", pad_id, False),
        ("completion_mask", 0, False),
    ):
        a, b = _pad_cat(getattr(c, name), getattr(n, name), value, left)
        merged[name] = _put_rows(a, rows, b)
    sampling_logp = None
    if c.sampling_logp is not None and n.sampling_logp is not None:
        a, b = _pad_cat(c.sampling_logp, n.sampling_logp, 0, left=False)
        sampling_logp = _put_rows(a, rows, b)
    texts, examples = list(old.texts), list(old.examples)
    for j, r in enumerate(rows.tolist()):
        texts[r], examples[r] = new.texts[j], new.examples[j]
    rewards = _put_rows(old.rewards, rows, new.rewards)
    return Rollout(
        completions=Completions(
            truncated=_put_rows(c.truncated, rows, n.truncated),
            sampling_logp=sampling_logp,
            **merged,
        ),
        examples=examples,
        texts=texts,
        rewards=rewards,
        per_fn={k: _put_rows(v, rows, new.per_fn[k]) for k, v in old.per_fn.items()},
        reward_errors={
            k: _put_rows(v, rows, new.reward_errors[k]) for k, v in old.reward_errors.items()
        },
        # every scoring round of the rollout counts (a timeout cost its time even if replaced)
        reward_counts={
            k: old.reward_counts.get(k, 0.0) + new.reward_counts.get(k, 0.0)
            for k in old.reward_counts.keys() | new.reward_counts.keys()
        },
        advantages=torch.zeros_like(rewards),
    )
