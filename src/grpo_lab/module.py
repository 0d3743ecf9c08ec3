"""GRPOModule: one GRPO step per training batch, orchestrated; the math is in ``objective``."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor

from grpo_lab import distributed, objective
from grpo_lab.policy.build import Policy, frozen_copy
from grpo_lab.policy.lora import is_lora
from grpo_lab.rewards.combine import RewardSet
from grpo_lab.sampling import native
from grpo_lab.sampling.base import Completions, Sampler, completion_logprobs, sampling_logp_gap
from grpo_lab.tasks.base import Example, Task
from grpo_lab.tasks.chat import render_prompts

# The phases of a GRPO step, each logged as perf/<phase>_s (seconds spent in it this step).
PHASES = ("sample", "reward", "ref_logprobs", "old_logprobs", "update")


@dataclass
class AlgoConfig:
    """The knobs of the GRPO step (the module's view of the Hydra config).

    G: completions per prompt. epsilon_low / epsilon_high: clip range of the ratio.
    beta: KL coefficient (0 = no reference model is created). mu: inner iterations per rollout.
    minibatch_size: completions per optimizer step (divides B*G); or num_minibatches: optimizer
    steps per pass over the rollout (divides B*G; at most one of the two is set);
    microbatch_size: completions per forward/backward (divides minibatch_size).
    shared_prefix: each forward runs a group's prompt once for its G completions (mini- and
    micro-batches are then whole groups, and mini-batches shuffle groups, not rows).
    compile: torch.compile the forwards (``train.compile``; see ``native.compile_model``).
    """

    G: int = 8
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.04
    mu: int = 1
    kl_estimator: str = "k3"
    kl_mode: str = "loss"  # "loss" (the paper) or "reward" (per-sequence reward penalty)
    advantage_scale: str = "group_std"
    advantage_eps: float = 1e-6
    unbiased_std: bool = False
    aggregation: str = "seq_mean_token_mean"
    ratio_level: str = "token"
    dual_clip: float | None = None
    entropy_coef: float = 0.0
    mask_truncated: bool = False
    minibatch_size: int | None = None
    num_minibatches: int | None = None
    microbatch_size: int | None = None
    shared_prefix: bool = False
    compile: bool = False
    max_grad_norm: float | None = 1.0
    max_consecutive_skipped_steps: int = 3  # non-finite gradients in a row before the run stops
    ref_sync_every: int = 0  # refresh the reference every N rollouts (0 = never)
    ref_sync_mix: float = 1.0  # 1.0 = hard copy; < 1 = TR-DPO mix alpha
    dynamic_sampling: bool = False
    dynamic_sampling_max_tries: int = 4
    seed: int = 0  # with the process rank, seeds the stream of dynamic-sampling prompts


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0
    scheduler: str = "constant"  # constant | cosine | linear
    total_steps: int = 1000


@dataclass
class Rollout:
    """A scored batch of completions ready for the inner updates.

    completions: see ``Completions`` (N = B*G rows)
    examples:    (N,) the example each row answers
    texts:       (N,) decoded completions
    rewards:     (N,) weighted reward
    per_fn:      name -> (N,) each reward function's scores (NaN = None)
    advantages:  (N,)
    old_logp:    (N, T) log pi_old, taken before the first update; None when the rollout gets
                 exactly one optimizer step (then pi_old = detached pi_theta, exactly)
    ref_logp:    (N, T) or None when beta == 0
    sampling_gap: (N, T) |log q - log pi_old| per token (q: the sampler's distribution), NaN
                 on rows no update has reached yet; None when the sampler records no q
    reward_errors: name -> (N,) bool, samples that reward.on_error=zero scored 0 (empty: raise)
    reward_counts: "<fn>/<key>" -> what reward functions counted while scoring this rollout
                 (e.g. math_verify's timeouts; summed over dynamic sampling's rounds)
    """

    completions: Completions
    examples: list[Example]
    texts: list[str]
    rewards: Tensor
    per_fn: dict[str, Tensor]
    advantages: Tensor
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    sampling_gap: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)
    reward_errors: dict[str, Tensor] = field(default_factory=dict)
    reward_counts: dict[str, float] = field(default_factory=dict)


class GRPOModule(L.LightningModule):
    """Group Relative Policy Optimization with manual optimization.

    A training batch is a list of B examples; each step samples G completions per prompt,
    scores them, and runs mu passes of mini-batch updates over them.
    """

    def __init__(
        self,
        policy: Policy,
        task: Task,
        rewards: RewardSet,
        sampler: Sampler,
        algo: AlgoConfig,
        optim: OptimConfig,
        reference: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy.model
        # Dropout off for good (as TRL's disable_dropout): pi_old, pi_theta and pi_ref must be
        # the same function of the weights, or the ratio is not 1 at the first inner step.
        self.policy.eval()
        self.tokenizer = policy.tokenizer
        self.use_chat_template = policy.use_chat_template
        self.model_impl = policy.model_impl
        self.task = task
        self.rewards = rewards
        self.sampler = sampler
        if getattr(sampler, "stop_strings", None):
            sampler.tokenizer = policy.tokenizer
        if hasattr(sampler, "model_impl"):
            sampler.model_impl = policy.model_impl
        self.algo = algo
        self.optim = optim
        # No reference model at all when the KL term is off. With LoRA the reference is the
        # policy with its adapters disabled (see _reference_logprobs): no second copy is held.
        self.reference = None
        self.has_reference = algo.beta > 0
        lora_base_is_reference = reference is None and is_lora(self.policy)
        if self.has_reference and lora_base_is_reference and algo.ref_sync_every:
            raise ValueError(
                f"train.ref_sync_every={algo.ref_sync_every} needs a separate reference model; "
                "with policy.lora.enabled=true the reference is the frozen base model: set "
                "train.ref_sync_every=0"
            )
        if self.has_reference and not lora_base_is_reference:
            self.reference = reference if reference is not None else frozen_copy(self.policy)
        self._compiled = False  # train.compile: done once, in setup
        self.rollouts_done = 0
        self.skipped_steps_total = 0  # optimizer steps skipped for a non-finite gradient
        self.consecutive_skipped_steps = 0
        self._prompt_gen: torch.Generator | None = None  # made on first use, once the rank is known
        self.last_rollout: Rollout | None = None  # read by tracking.CompletionTable
        self._phase_s = dict.fromkeys(PHASES, 0.0)  # this step's seconds per phase
        self._eval_outputs: list[dict[str, float]] = []
        # (rollouts done, eval metrics) of the latest eval: the final eval reuses it when the
        # last rollout was just evaluated, rather than score the same policy twice
        self.last_eval: tuple[int, dict[str, float]] | None = None

    # ------------------------------------------------------------------ Lightning plumbing

    def setup(self, stage: str) -> None:
        # Compiled here, not in __init__: ddp_spawn pickles the module to its processes, and a
        # pickled module loses its compiled forward.
        if self.algo.compile and not self._compiled:
            self._compiled = True
            for model in (self.policy, self.reference):
                if model is not None:
                    native.compile_model(model, self.model_impl)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params,
            lr=self.optim.lr,
            weight_decay=self.optim.weight_decay,
            betas=tuple(self.optim.betas),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_lambda(self, step: int) -> float:
        warm = self.optim.warmup_steps
        if warm and step < warm:
            return (step + 1) / warm
        if self.optim.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, self.optim.total_steps - warm))
        if self.optim.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["grpo_rollouts_done"] = self.rollouts_done
        checkpoint["grpo_skipped_steps_total"] = self.skipped_steps_total
        checkpoint["grpo_prompt_generator"] = {
            "rank": self.global_rank,
            "state": self._prompt_generator().get_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rollouts_done = checkpoint.get("grpo_rollouts_done", 0)
        self.skipped_steps_total = checkpoint.get("grpo_skipped_steps_total", 0)
        saved = checkpoint.get("grpo_prompt_generator")
        self._prompt_gen = torch.Generator()
        if saved is not None and saved["rank"] == self.global_rank:
            self._prompt_gen.set_state(saved["state"])
        else:
            # Only one rank writes the checkpoint: the others start a stream of their own that
            # depends on how far the run got, so they do not replay their first prompts.
            seed = prompt_seed(self.algo.seed, self.global_rank, self.rollouts_done)
            self._prompt_gen.manual_seed(seed)

    def _prompt_generator(self) -> torch.Generator:
        if self._prompt_gen is None:
            seed = prompt_seed(self.algo.seed, self.global_rank)
            self._prompt_gen = torch.Generator().manual_seed(seed)
        return self._prompt_gen

    def _encode_prompts(self, examples: list[Example]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and mask (B, P), rendered as SFT and eval render them."""
        texts = render_prompts(
            self.tokenizer,
            [ex.prompt for ex in examples],
            system_prompt=getattr(self.task, "system_prompt", None),
            use_chat_template=self.use_chat_template,
        )
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # ------------------------------------------------------------------ the GRPO step

    def training_step(self, batch: list[Example], batch_idx: int) -> None:
        t0 = time.perf_counter()
        self._phase_s = dict.fromkeys(PHASES, 0.0)
        rollout = self.make_rollout(batch)
        with self._phase("update"):
            update_stats = self.inner_updates(rollout)
        self.last_rollout = rollout
        self.rollouts_done += 1
        self._maybe_refresh_reference()
        elapsed = time.perf_counter() - t0
        n_tokens = float(
            rollout.completions.completion_mask.sum() + rollout.completions.prompt_mask.sum()
        )
        metrics = {
            **rollout.stats,
            **update_stats,
            "rollout": float(self.rollouts_done),
            "step": float(self.rollouts_done),  # Lightning logs at this step: the rollout count
            "perf/step_time_s": elapsed,
            "perf/tokens_per_s": n_tokens * self.algo.mu / elapsed,
            **{f"perf/{name}_s": seconds for name, seconds in self._phase_s.items()},
        }
        # Under DDP each rank has its own prompts: log the step's statistics over all of them.
        metrics = distributed.mean_over_ranks(metrics)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))
        self.log(
            "reward_mean", metrics["reward"], prog_bar=True, logger=False, batch_size=len(batch)
        )

    def make_rollout(self, examples: list[Example]) -> Rollout:
        """Sample G completions per prompt, score them, and compute advantages (no grad)."""
        G = self.algo.G
        was_training = self.policy.training
        self.policy.eval()
        with torch.no_grad():
            rollout = self._sample_and_score(examples)
            drop_rate = None
            tries = 1
            # DAPO dynamic sampling: groups with no reward variance carry no signal; replace
            # them by groups of fresh training prompts until none is left or tries run out.
            while self.algo.dynamic_sampling:
                dead = objective.group_reward_std(rollout.rewards, G) == 0
                if drop_rate is None:
                    drop_rate = dead.float().mean().item()
                    # reward/reward_std describe the kept batch; this is what the policy sampled
                    sampled_reward = rollout.rewards.mean().item()
                if not dead.any() or tries >= self.algo.dynamic_sampling_max_tries:
                    break
                fresh = self._sample_and_score(self._fresh_prompts(int(dead.sum())))
                rollout = _replace_groups(rollout, fresh, dead, G, self.tokenizer.pad_token_id)
                tries += 1
            rollout.stats = self._rollout_stats(rollout)
            if drop_rate is not None:
                rollout.stats["dynamic_sampling/drop_rate"] = drop_rate
                rollout.stats["dynamic_sampling/sampled_reward"] = sampled_reward
                rollout.stats["dynamic_sampling/tries"] = float(tries)

            if self.has_reference:
                with self._phase("ref_logprobs"):
                    rollout.ref_logp = self._reference_logprobs(rollout.completions)
            # Every optimizer step after the first of a rollout is off-policy: it needs the
            # sampling policy's log-probs (TRL computes them whenever the steps differ).
            if self.optimizer_steps_per_rollout(rollout.rewards.shape[0]) > 1:
                with self._phase("old_logprobs"):
                    rollout.old_logp = self._rollout_logprobs(self.policy, rollout.completions)
            rewards = rollout.rewards
            if self.algo.kl_mode == "reward" and self.has_reference:
                logp = rollout.old_logp
                if logp is None:
                    with self._phase("old_logprobs"):
                        logp = self._rollout_logprobs(self.policy, rollout.completions)
                rewards = objective.kl_penalised_rewards(
                    rewards,
                    logp,
                    rollout.ref_logp,
                    rollout.completions.completion_mask,
                    self.algo.beta,
                    self.algo.kl_estimator,
                )
            rollout.advantages = self._advantages(rewards)
        if was_training:
            self.policy.train()
        return rollout

    def _reference_logprobs(self, completions: Completions) -> Tensor:
        """log pi_ref (N, T): the frozen copy, or with LoRA the base model (adapters disabled)."""
        if self.reference is not None:
            model, base = self.reference, contextlib.nullcontext()
        else:
            model, base = self.policy, self.policy.disable_adapter()
        with base:
            return self._rollout_logprobs(model, completions)

    def _rollout_logprobs(self, model: torch.nn.Module, completions: Completions) -> Tensor:
        """log pi (N, T) of a whole rollout in chunks of the micro-batch size (whole groups
        with the shared prefix): micro-batching is there because B*G rows do not fit at once.

        In inference mode (no autograd bookkeeping at all); the result is cloned out of it so
        that the loss may use it beside tensors that need grad."""
        n = completions.completion_ids.shape[0]
        size = self.algo.microbatch_size or self.minibatch_size(n)
        rows = torch.arange(n, device=completions.completion_ids.device)
        with torch.inference_mode():
            parts = [
                completion_logprobs(
                    model,
                    _select(completions, idx),
                    temperature=self.sampler.temperature,
                    group_size=self._group_size(),
                    model_impl=self.model_impl,
                )[0]
                for idx in rows.split(size)
            ]
            logp = torch.cat(parts)
        return logp.clone()

    def _group_size(self) -> int | None:
        """G when the forwards share each group's prompt (``train.shared_prefix``), else None."""
        return self.algo.G if self.algo.shared_prefix else None

    def _fresh_prompts(self, n_groups: int) -> list[Example]:
        """n_groups training prompts for dynamic sampling, from this process's own stream."""
        pool = self.task.train()
        picks = torch.randint(len(pool), (n_groups,), generator=self._prompt_generator())
        return [pool[i] for i in picks.tolist()]

    def _advantages(self, rewards: Tensor) -> Tensor:
        return objective.group_advantages(
            rewards,
            self.algo.G,
            scale=self.algo.advantage_scale,
            eps=self.algo.advantage_eps,
            unbiased_std=self.algo.unbiased_std,
        )

    def _sample_and_score(self, examples: list[Example]) -> Rollout:
        G = self.algo.G
        prompt_ids, prompt_mask = self._encode_prompts(examples)
        with self._phase("sample"):
            completions = self.sampler.sample(self.policy, prompt_ids, prompt_mask, G)
        with self._phase("reward"):
            texts = self.tokenizer.batch_decode(
                completions.completion_ids, skip_special_tokens=True
            )
            per_row = [ex for ex in examples for _ in range(G)]
            out = self.rewards(texts, per_row, **self._reward_context(completions))
            rewards = out.total.to(self.device)
        return Rollout(
            completions=completions,
            examples=per_row,
            texts=texts,
            rewards=rewards,
            per_fn=out.per_fn,
            advantages=torch.zeros_like(rewards),
            reward_errors=out.errors,
            reward_counts=out.counts,
        )

    @contextlib.contextmanager
    def _phase(self, name: str):
        """Add the seconds spent inside to this step's ``perf/<name>_s``. On a GPU it waits for
        the queued kernels at both ends, or a phase would be billed for the one before it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._phase_s[name] += time.perf_counter() - start

    def _reward_context(self, completions: Completions) -> dict[str, Any]:
        """What every reward function may read besides completions and examples."""
        return {
            "task": self.task,
            "truncated": completions.truncated.tolist(),
            "lengths": completions.lengths.tolist(),  # completion tokens, EOS included
            "max_new_tokens": self.sampler.max_new_tokens,
        }

    def _rollout_stats(self, rollout: Rollout) -> dict[str, float]:
        """TRL-named diagnostics of a scored rollout."""
        rewards, c = rollout.rewards, rollout.completions
        lengths = c.lengths.float()
        group_std = objective.group_reward_std(rewards, self.algo.G)
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

    def minibatch_size(self, n: int) -> int:
        """Completions per optimizer step for a rollout of n completions."""
        if self.algo.num_minibatches:
            return n // self.algo.num_minibatches
        return self.algo.minibatch_size or n

    def optimizer_steps_per_rollout(self, n: int) -> int:
        """mu x mini-batches: how many times the policy moves on one rollout of n completions."""
        return self.algo.mu * math.ceil(n / self.minibatch_size(n))

    def inner_updates(self, rollout: Rollout) -> dict[str, float]:
        """mu passes over the rollout in mini-batches, one optimizer step per mini-batch."""
        opt = self.optimizers()
        sched = self.lr_schedulers()
        N = rollout.rewards.shape[0]
        mini = self.minibatch_size(N)
        micro = self.algo.microbatch_size or mini
        sums: dict[str, float] = {}
        n_updates = skipped = 0
        grad_norms: list[float] = []
        for _ in range(self.algo.mu):
            order = self._update_order(N, shuffle=self.algo.mu > 1 or mini < N)
            for start in range(0, N, mini):
                idx = order[start : start + mini]
                stats = self._minibatch_step(rollout, idx, micro, opt)
                grad_norm = self._clip_and_step(opt)
                lr = sched.get_last_lr()[0]  # the rate this update used, not the next one's
                # The schedule follows planned updates (global_step), skipped ones included.
                sched.step()
                if math.isfinite(grad_norm):
                    grad_norms.append(grad_norm)
                else:
                    skipped += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
        out = {k: v / n_updates for k, v in sums.items()}
        out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
        out["skipped_steps"] = float(skipped)
        out["skipped_steps_total"] = float(self.skipped_steps_total)
        out["lr"] = lr  # of the rollout's last update
        return out

    def _update_order(self, N: int, shuffle: bool) -> Tensor:
        """The order rows are visited in, (N,). With the shared prefix, whole groups are shuffled
        (their G rows stay together) so that every micro-batch holds whole groups."""
        if not shuffle:
            return torch.arange(N, device=self.device)
        if not self.algo.shared_prefix:
            return torch.randperm(N, device=self.device)
        G = self.algo.G
        groups = torch.randperm(N // G, device=self.device)
        return (groups.unsqueeze(1) * G + torch.arange(G, device=self.device)).reshape(-1)

    def _minibatch_step(self, rollout: Rollout, idx: Tensor, micro: int, opt) -> dict[str, float]:
        """Forward/backward over one mini-batch in micro-batches; gradients accumulate."""
        mask = rollout.completions.completion_mask
        if self.algo.mask_truncated:
            mask = mask * (~rollout.completions.truncated).long().unsqueeze(1)
        by_tokens = self.algo.aggregation == "token_mean"
        # seq_mean_* need no communication: every rank holds as many rows, so DDP's average of
        # the ranks' row means is the row mean over all ranks. token_mean does (see distributed).
        total = distributed.token_mean_denominator(mask[idx].sum()) if by_tokens else len(idx)
        total_tokens = mask[idx].sum().clamp(min=1).item()
        opt.zero_grad(set_to_none=True)
        chunks = list(torch.split(idx, micro))
        sums: dict[str, float] = {}
        for i, chunk in enumerate(chunks):
            weight = (mask[chunk].sum().item() if by_tokens else float(len(chunk))) / total
            # Token means (ratio, clip fractions, KL, entropy) combine by token count whatever
            # the aggregation, or a micro-batch of short completions would count as much as one
            # of long ones.
            token_weight = mask[chunk].sum().item() / total_tokens
            sub = _select(rollout.completions, chunk)
            sub.completion_mask = mask[chunk]
            logp, entropy = completion_logprobs(
                self.policy,
                sub,
                temperature=self.sampler.temperature,
                with_entropy=True,
                entropy_grad=bool(self.algo.entropy_coef),
                group_size=self._group_size(),
                model_impl=self.model_impl,
            )
            old = rollout.old_logp[chunk] if rollout.old_logp is not None else logp.detach()
            ref = rollout.ref_logp[chunk] if rollout.ref_logp is not None else None
            self._record_sampling_gap(rollout, chunk, old)
            loss, stats = objective.grpo_loss(
                logp,
                old,
                rollout.advantages[chunk],
                sub.completion_mask,
                eps_low=self.algo.epsilon_low,
                eps_high=self.algo.epsilon_high,
                beta=self.algo.beta if self.algo.kl_mode == "loss" else 0.0,
                ref_logp=ref,
                kl_estimator=self.algo.kl_estimator,
                aggregation=self.algo.aggregation,
                max_len=self.sampler.max_new_tokens,
                ratio_level=self.algo.ratio_level,
                dual_clip=self.algo.dual_clip,
                entropy=entropy,
                entropy_coef=self.algo.entropy_coef,
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"GRPO loss is {loss.item()} at rollout {self.rollouts_done + 1}; lower train.lr "
                    "or check the rewards (reward.weights, each rewards/<fn>/mean) and "
                    "sampler.temperature. Checkpoints saved so far are kept."
                )
            last = i == len(chunks) - 1
            # Under DDP, sync gradients only on the last micro-batch of the mini-batch. Only a
            # ParallelStrategy has block_backward_sync (Lightning's own loops check the same).
            strategy = self.trainer.strategy
            parallel = isinstance(strategy, ParallelStrategy)
            sync = (
                strategy.block_backward_sync()
                if parallel and not last
                else contextlib.nullcontext()
            )
            with sync:
                self.manual_backward(loss * weight)
            if ref is not None and self.algo.kl_mode == "reward":
                stats.kl = objective.masked_mean(
                    objective.kl_estimate(logp.detach(), ref, self.algo.kl_estimator),
                    sub.completion_mask,
                )
            # With one optimizer step per rollout the ratio is exactly 1 and this loss is ~0
            # although its gradient is not: -A * grad log pi / |o_i| (see objective.grpo_loss).
            for name, value in {"loss": stats.loss, "surrogate": stats.surrogate}.items():
                sums[name] = sums.get(name, 0.0) + weight * float(value)
            for name, value in {
                "kl": stats.kl,
                "entropy": stats.entropy,
                "clip_ratio/low_mean": stats.clip_low,
                "clip_ratio/high_mean": stats.clip_high,
                "clip_ratio/region_mean": stats.clip_region,
                "ratio_mean": stats.ratio_mean,
            }.items():
                sums[name] = sums.get(name, 0.0) + token_weight * float(value)
        return sums

    def _record_sampling_gap(self, rollout: Rollout, rows: Tensor, old: Tensor) -> None:
        """TRL's ``sampling/sampling_logp_difference/{mean,max}`` over real completion tokens.

        The tokens come from the sampler's distribution q (top_k/top_p/min_p filter it) while
        the loss's pi_old is the full softmax: the gap shows how far apart they are. pi_old is
        the same on every pass, so each row counts once, on the first pass that reaches it.
        """
        c = rollout.completions
        if c.sampling_logp is None:
            return
        if rollout.sampling_gap is None:
            rollout.sampling_gap = torch.full_like(c.sampling_logp, float("nan"))
        new = rollout.sampling_gap[rows, 0].isnan()  # (n,)
        rows = rows[new]
        rollout.sampling_gap[rows] = sampling_logp_gap(
            c.sampling_logp[rows], old[new].detach(), c.completion_mask[rows]
        )
        if not rollout.sampling_gap[:, 0].isnan().any():  # every row reached: log it
            gap = rollout.sampling_gap
            rollout.stats["sampling/sampling_logp_difference/mean"] = (
                gap.sum() / c.completion_mask.sum().clamp(min=1)
            ).item()
            rollout.stats["sampling/sampling_logp_difference/max"] = gap.max().item()

    def _clip_and_step(self, opt) -> float:
        """Clip and apply the accumulated gradient; skip the update when its norm is not finite.

        Returns the gradient norm before clipping (inf or NaN for a skipped step).
        """
        params = [p for p in self.policy.parameters() if p.grad is not None]
        grad_norm = (
            torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.tensor(0.0)
        )
        # Under fp16 mixed precision the GradScaler overflows on purpose and skips those steps
        # itself (opt.step with no gradient at all would trip its bookkeeping).
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if not torch.isfinite(grad_norm) and scaler is None:
            self._skip_step(opt, float(grad_norm))
            return float(grad_norm)
        self.consecutive_skipped_steps = 0
        if self.algo.max_grad_norm:
            self.clip_gradients(
                opt, gradient_clip_val=self.algo.max_grad_norm, gradient_clip_algorithm="norm"
            )
        opt.step()
        return float(grad_norm)

    def _skip_step(self, opt, grad_norm: float) -> None:
        """A finite loss can carry a NaN or inf gradient (0 x inf in a backward); applying it
        would ruin the weights and Adam's moments for good. With every grad None, AdamW leaves
        weights and state untouched, while opt.step() still counts in Lightning's global_step,
        so max_steps and checkpoint names keep counting planned updates."""
        opt.zero_grad(set_to_none=True)
        opt.step()
        self.skipped_steps_total += 1
        self.consecutive_skipped_steps += 1
        limit = self.algo.max_consecutive_skipped_steps
        if self.consecutive_skipped_steps >= limit:
            raise FloatingPointError(
                f"{self.consecutive_skipped_steps} optimizer steps in a row had a non-finite "
                f"gradient norm ({grad_norm}), the last at rollout {self.rollouts_done + 1}; "
                "each was skipped, and train.max_consecutive_skipped_steps="
                f"{limit} stops the run here. Try a lower train.lr, or check the rewards, "
                "sampler.temperature and the policy's dtype. Checkpoints saved so far are kept."
            )

    def _maybe_refresh_reference(self) -> None:
        every = self.algo.ref_sync_every
        if self.reference is None or not every or self.rollouts_done % every:
            return
        alpha = self.algo.ref_sync_mix
        with torch.no_grad():
            for ref_p, p in zip(self.reference.parameters(), self.policy.parameters()):
                ref_p.mul_(1.0 - alpha).add_(p.detach(), alpha=alpha)

    # ------------------------------------------------------------------ eval

    def validation_step(self, batch: list[Example], batch_idx: int) -> None:
        prompt_ids, prompt_mask = self._encode_prompts(batch)
        comp = self.sampler.sample(self.policy, prompt_ids, prompt_mask, 1, greedy=True)
        texts = self.tokenizer.batch_decode(comp.completion_ids, skip_special_tokens=True)
        correct = sum(self.task.is_correct(t, ex) for t, ex in zip(texts, batch))
        scores = self.rewards(texts, batch, **self._reward_context(comp))
        # Under reward.on_error=zero a failed scorer gives 0: such samples are left out of
        # eval/reward and counted, so an outage cannot pass for a worse policy.
        failed = torch.zeros(len(batch), dtype=torch.bool)
        for mask in scores.errors.values():
            failed |= mask.cpu().bool()
        self._eval_outputs.append(
            {
                "n": len(batch),
                "correct": correct,
                "reward": float(scores.total.cpu()[~failed].sum()),
                "reward_errors": float(failed.sum()),
                "length": float(comp.lengths.float().sum()),
            }
        )

    def on_validation_epoch_end(self) -> None:
        outs, self._eval_outputs = self._eval_outputs, []
        # Each rank scored its own shard of the eval prompts: sum the counts over ranks (every
        # rank, even one with an empty shard, must take part).
        keys = ("n", "correct", "reward", "reward_errors", "length")
        local = torch.tensor(
            [[o[k] for k in keys] for o in outs] or [[0.0] * len(keys)], dtype=torch.float64
        )
        n, correct, reward, errors, length = distributed.sum_over_ranks(
            local.sum(0).to(self.device)
        ).tolist()
        if not n:
            return
        metrics = {
            "eval/accuracy": correct / n,
            "eval/reward": reward / (n - errors) if n > errors else math.nan,
            "eval/reward_errors": errors,
            "eval/mean_length": length / n,
        }
        if self.trainer.state.fn == "fit":  # an eval inside fit, after rollout N
            self.last_eval = (self.rollouts_done, metrics)
        self.log_dict(
            {**metrics, "step": float(self.rollouts_done)},  # an eval after rollout N: step N
            on_epoch=True,
            batch_size=int(n),
            sync_dist=True,  # the values are already global (equal on every rank): a no-op mean
        )


def prompt_seed(seed: int, rank: int, resumed_at: int = 0) -> int:
    """Seed of one process's dynamic-sampling prompt stream: distinct for each (seed, rank), so
    two runs with different seeds, or two ranks of one run, draw different replacement prompts.
    resumed_at: the rollout a rank without a saved stream resumes at (0 on a fresh start)."""
    entropy = [seed % 2**64, rank, resumed_at]  # SeedSequence takes non-negative integers
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def _select(c: Completions, idx: Tensor) -> Completions:
    return Completions(
        prompt_ids=c.prompt_ids[idx],
        prompt_mask=c.prompt_mask[idx],
        completion_ids=c.completion_ids[idx],
        completion_mask=c.completion_mask[idx],
        truncated=c.truncated[idx],
        sampling_logp=None if c.sampling_logp is None else c.sampling_logp[idx],
    )


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


def _replace_groups(old: Rollout, new: Rollout, dead: Tensor, G: int, pad_id: int) -> Rollout:
    """Put the groups of ``new`` (one per True in ``dead``, in order) in place of dead groups."""
    rows = dead.repeat_interleave(G).nonzero().squeeze(1)
    c, n = old.completions, new.completions
    fields = {}
    for name, value, left in (
        ("prompt_ids", pad_id, True),
        ("prompt_mask", 0, True),
        ("completion_ids", pad_id, False),
        ("completion_mask", 0, False),
    ):
        a, b = _pad_cat(getattr(c, name), getattr(n, name), value, left)
        a = a.clone()
        a[rows] = b
        fields[name] = a
    truncated = c.truncated.clone()
    truncated[rows] = n.truncated
    sampling_logp = None
    if c.sampling_logp is not None and n.sampling_logp is not None:
        sampling_logp, fresh_logp = _pad_cat(c.sampling_logp, n.sampling_logp, 0, left=False)
        sampling_logp = sampling_logp.clone()
        sampling_logp[rows] = fresh_logp
    rewards = old.rewards.clone()
    rewards[rows] = new.rewards
    per_fn = {}
    for k, v in old.per_fn.items():
        v = v.clone()
        v[rows] = new.per_fn[k]
        per_fn[k] = v
    reward_errors = {}
    for k, v in old.reward_errors.items():
        v = v.clone()
        v[rows] = new.reward_errors[k]
        reward_errors[k] = v
    # every scoring round of the rollout counts (a timeout cost its time even if regrouped)
    reward_counts = {
        k: old.reward_counts.get(k, 0.0) + new.reward_counts.get(k, 0.0)
        for k in old.reward_counts.keys() | new.reward_counts.keys()
    }
    texts, examples = list(old.texts), list(old.examples)
    for j, r in enumerate(rows.tolist()):
        texts[r], examples[r] = new.texts[j], new.examples[j]
    merged = Completions(truncated=truncated, sampling_logp=sampling_logp, **fields)
    return Rollout(
        completions=merged,
        examples=examples,
        texts=texts,
        rewards=rewards,
        per_fn=per_fn,
        advantages=torch.zeros_like(rewards),
        reward_errors=reward_errors,
        reward_counts=reward_counts,
    )
