"""GRPOModule: the Lightning shell around the GRPO step (``grpo.step``).

It holds the policy, the reference and the optimizer, and gives the step what Lightning owns:
backward under DDP, gradient clipping, the optimizer and scheduler steps, logging, checkpoint
state and the greedy eval. The algorithm itself (sampling, advantages, the loss) is ``grpo/``.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from grpo_lab import distributed
from grpo_lab.grpo import rollout, step
from grpo_lab.grpo.guards import SkippedSteps
from grpo_lab.grpo.kl import refresh_reference
from grpo_lab.grpo.rollout import DynamicSampling
from grpo_lab.grpo.schedule import lr_factor
from grpo_lab.grpo.step import Algorithm
from grpo_lab.grpo.types import Rollout
from grpo_lab.policy import native
from grpo_lab.policy.build import Policy, check_trainable_dtype, reference_policy
from grpo_lab.rewards.combine import RewardSet
from grpo_lab.sampling.base import Completions, Sampler
from grpo_lab.tasks.base import Example, Task
from grpo_lab.tasks.chat import encode_prompts

# The phases of a GRPO step, each logged as perf/<phase>_s (seconds spent in it this step).
PHASES = ("sample", "reward", "ref_logprobs", "old_logprobs", "update")


class GRPOModule(L.LightningModule):
    """GRPO with manual optimization: a training batch is B prompts; each step samples G
    completions per prompt, scores them and runs mu passes of mini-batch updates over them.

    cfg: the composed config (``grpo-lab train``'s): the parts from its groups, the knobs from
    ``train.*``. reference: a frozen reference model to use instead of a copy of the policy.
    """

    def __init__(
        self,
        cfg: DictConfig,
        policy: Policy,
        task: Task,
        rewards: RewardSet,
        sampler: Sampler,
        reference: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.algo = Algorithm.from_config(cfg)
        self.train_cfg = OmegaConf.create(OmegaConf.to_container(cfg.train, resolve=True))
        self.policy = policy.model
        check_trainable_dtype(self.policy, cfg.policy.get("dtype"))
        # Dropout off for good (as TRL's disable_dropout): pi_old, pi_theta and pi_ref must be
        # the same function of the weights, or the ratio is not 1 at the first inner step.
        self.policy.eval()
        self.tokenizer = policy.tokenizer
        self.pad_token_id = policy.tokenizer.pad_token_id
        self.use_chat_template = policy.use_chat_template
        self.model_impl = policy.model_impl
        self.task, self.rewards, self.sampler = task, rewards, sampler
        sampler.configure(policy.tokenizer, policy.model_impl)
        # No reference model at all when the KL term is off. With LoRA the reference is the
        # policy with its adapters disabled (see reference()): no second copy is held.
        self.reference_model = reference_policy(
            self.policy, reference, self.algo.kl.active, self.train_cfg.ref_sync_every
        )
        t = self.train_cfg
        self.dynamic_sampling = DynamicSampling(
            t.dynamic_sampling, t.dynamic_sampling_max_tries, cfg.seed
        )
        self.skips = SkippedSteps(t.max_consecutive_skipped_steps)
        self.total_steps = t.rollouts * self.algo.batching.steps_per_rollout(self.algo.mu)
        self._compiled = False  # train.compile: done once, in setup
        self.rollouts_done = 0
        self.last_rollout: Rollout | None = None  # read by tracking.CompletionTable
        self._phase_s = dict.fromkeys(PHASES, 0.0)  # this step's seconds per phase
        self._eval_outputs: list[dict[str, float]] = []
        # (rollouts done, eval metrics) of the latest eval: the final eval reuses it when the
        # last rollout was just evaluated, rather than score the same policy twice
        self.last_eval: tuple[int, dict[str, float]] | None = None

    # ------------------------------------------------------------------ Lightning plumbing

    def setup(self, stage: str) -> None:
        self.dynamic_sampling.rank = self.global_rank
        # Compiled here, not in __init__: ddp_spawn pickles the module to its processes, and a
        # pickled module loses its compiled forward.
        if self.train_cfg.compile and not self._compiled:
            self._compiled = True
            for model in (self.policy, self.reference_model):
                if model is not None:
                    native.compile_model(model, self.model_impl)

    def configure_optimizers(self):
        t = self.train_cfg
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_lambda(self, step: int) -> float:
        t = self.train_cfg
        return lr_factor(step, t.warmup_steps, t.scheduler, self.total_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["grpo_rollouts_done"] = self.rollouts_done
        checkpoint["grpo_skipped_steps_total"] = self.skips.total
        # every rank's dynamic-sampling stream (this hook runs on every rank; rank 0 writes)
        checkpoint["grpo_prompt_generators"] = distributed.gather_objects(
            self.dynamic_sampling.state_dict()
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rollouts_done = checkpoint.get("grpo_rollouts_done", 0)
        self.skips.total = checkpoint.get("grpo_skipped_steps_total", 0)
        self.dynamic_sampling.rank = self.global_rank
        # older checkpoints hold rank 0's stream alone, under the singular key
        saved = checkpoint.get("grpo_prompt_generators") or [
            checkpoint.get("grpo_prompt_generator")
        ]
        self.dynamic_sampling.load_state_dict(saved, self.rollouts_done)

    # ------------------------------------------------------------------ the GRPO step

    def training_step(self, batch: list[Example], batch_idx: int) -> None:
        t0 = time.perf_counter()
        self._phase_s = dict.fromkeys(PHASES, 0.0)
        rollout = self.make_rollout(batch)
        with self.phase("update"):
            update_stats = self.inner_updates(rollout)
        self.last_rollout = rollout
        self.rollouts_done += 1
        every = self.train_cfg.ref_sync_every  # TR-DPO / iterative GRPO's reference refresh
        if self.reference_model is not None and every and not self.rollouts_done % every:
            refresh_reference(self.reference_model, self.policy, self.train_cfg.ref_sync_mix)
        elapsed = time.perf_counter() - t0
        c = rollout.completions
        n_tokens = float(c.completion_mask.sum() + c.prompt_mask.sum())
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
        """Steps 1-3 of the recipe: a scored rollout with advantages, pi_ref and pi_old."""
        return step.prepare(self.algo, self, examples)

    def inner_updates(self, rollout: Rollout) -> dict[str, float]:
        """Steps 4-5 of the recipe: mu passes of mini-batch updates over the rollout."""
        stats = step.update(self.algo, self, rollout)
        stats["skipped_steps_total"] = float(self.skips.total)
        return stats

    # ------------------------------------------------------------------ what the step calls

    def sample_and_score(self, examples: list[Example]) -> Rollout:
        return rollout.sample_and_score(self, examples)

    def reference(self) -> tuple[torch.nn.Module, contextlib.AbstractContextManager]:
        """pi_ref and the context to run it in: the frozen copy, or with LoRA the policy with its
        adapters disabled."""
        if self.reference_model is not None:
            return self.reference_model, contextlib.nullcontext()
        return self.policy, self.policy.disable_adapter()

    def clear_gradients(self) -> None:
        self.optimizers().zero_grad(set_to_none=True)

    def backward_micro(self, loss: Tensor, sync: bool) -> None:
        """Backward; under DDP without the gradient all-reduce unless ``sync``. Only a
        ParallelStrategy has block_backward_sync (Lightning's own loops check the same)."""
        strategy = self.trainer.strategy
        parallel = isinstance(strategy, ParallelStrategy)
        block = strategy.block_backward_sync() if parallel and not sync else None
        with block or contextlib.nullcontext():
            self.manual_backward(loss)

    def optimizer_step(self) -> tuple[float, float]:
        """Clip and apply the accumulated gradient, or skip it when its norm is not finite;
        then the scheduler. Returns (gradient norm before clipping, the rate this update used)."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        params = [p for p in self.policy.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if params else 0.0
        # Under fp16 mixed precision the GradScaler overflows on purpose and skips those steps
        # itself (opt.step with no gradient at all would trip its bookkeeping).
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if not math.isfinite(grad_norm) and scaler is None:
            # With every grad None AdamW leaves weights and state untouched, while opt.step()
            # still counts in global_step: max_steps and checkpoint names count planned updates.
            opt.zero_grad(set_to_none=True)
            opt.step()
            self.skips.skipped(grad_norm, self.rollouts_done + 1)
        else:
            self.skips.stepped()
            if self.train_cfg.max_grad_norm:
                self.clip_gradients(
                    opt,
                    gradient_clip_val=self.train_cfg.max_grad_norm,
                    gradient_clip_algorithm="norm",
                )
            opt.step()
        lr = sched.get_last_lr()[0]  # the rate this update used, not the next one's
        sched.step()  # the schedule follows planned updates (global_step), skipped ones included
        self.sampler.weights_changed()
        return grad_norm, lr

    @contextlib.contextmanager
    def phase(self, name: str):
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

    def encode_prompts(self, examples: list[Example]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and mask (B, P), rendered as SFT and eval render them."""
        enc = encode_prompts(self.tokenizer, examples, self.task, self.use_chat_template)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def reward_context(self, completions: Completions) -> dict[str, Any]:
        """What every reward function may read besides completions and examples."""
        return {
            "task": self.task,
            "truncated": completions.truncated.tolist(),
            "lengths": completions.lengths.tolist(),  # completion tokens, EOS included
            "max_new_tokens": self.sampler.max_new_tokens,
        }

    # ------------------------------------------------------------------ eval

    def validation_step(self, batch: list[Example], batch_idx: int) -> None:
        prompt_ids, prompt_mask = self.encode_prompts(batch)
        comp = self.sampler.sample(self.policy, prompt_ids, prompt_mask, 1, greedy=True)
        texts = self.tokenizer.batch_decode(comp.completion_ids, skip_special_tokens=True)
        correct = sum(self.task.is_correct(t, ex) for t, ex in zip(texts, batch))
        scores = self.rewards(texts, batch, **self.reward_context(comp))
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
