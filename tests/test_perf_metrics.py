"""Per-phase timing: every training step logs where its time went (perf/<phase>_s)."""

from __future__ import annotations

import lightning as L
import pytest

from grpo_lab.data import TaskDataModule
from grpo_lab.policy import tiny_llama
from grpo_lab.rewards import RewardSet, accuracy_reward
from grpo_lab.sampling import GenerateSampler
from grpo_lab.tasks import ArithmeticTask
from helpers import cpu_trainer, module_of

PHASES = ["sample", "reward", "ref_logprobs", "old_logprobs", "update"]


class StepMetrics(L.Callback):
    """What each step logged, read where Lightning collects it for the loggers."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def one_step(beta: float, mu: int) -> dict[str, float]:
    """The metrics of a one-rollout run: 2 prompts x G=4, tiny model, real Lightning Trainer."""
    module = module_of(
        "G=4",
        f"beta={beta}",
        f"mu={mu}",
        "train.prompts_per_step=2",
        "train.dynamic_sampling=false",
        "train.lr=1e-4",
        "train.warmup_steps=0",
        "sampler.max_new_tokens=4",
        policy=tiny_llama(hidden_size=32, intermediate_size=64),
        task=ArithmeticTask(max_operand=9, eval_size=20),
        rewards=RewardSet({"accuracy": accuracy_reward}),
        sampler=GenerateSampler(max_new_tokens=4),
    )
    record = StepMetrics()
    trainer = cpu_trainer(max_steps=mu, callbacks=[record])  # one rollout: mu optimizer steps
    trainer.fit(module, datamodule=TaskDataModule(module.task, 2, 4, 4, seed=0))
    assert len(record.steps) == 1
    return record.steps[0]


@pytest.mark.parametrize(
    ("beta", "mu", "computed", "skipped"),
    [
        # beta > 0: a reference pass; mu = 1 with one mini-batch: pi_old is the detached
        # pi_theta, so no old-log-prob pass at all
        (0.04, 1, {"sample", "reward", "ref_logprobs", "update"}, {"old_logprobs"}),
        # beta = 0: no reference model; mu = 2: pi_old must be taken before the first update
        (0.0, 2, {"sample", "reward", "old_logprobs", "update"}, {"ref_logprobs"}),
    ],
)
def test_each_step_logs_the_seconds_of_each_phase_within_the_step_time(beta, mu, computed, skipped):
    metrics = one_step(beta, mu)
    phases = {name: metrics[f"perf/{name}_s"] for name in PHASES}
    assert all(seconds >= 0 for seconds in phases.values()), phases
    # The phases are disjoint parts of the step: their sum cannot exceed it (1 ms of slack for
    # the two clocks being read at different places).
    assert sum(phases.values()) <= metrics["perf/step_time_s"] + 1e-3, (phases, metrics)
    # A phase that ran took some time; one that did not run is 0, not absent.
    assert all(phases[name] > 0 for name in computed), phases
    assert all(phases[name] == 0 for name in skipped), phases
