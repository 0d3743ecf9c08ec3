"""What many tests need, in one place: the fast-run overrides, composing the real config tree,
a module built from it, a bare CPU trainer. Test modules import from here (never from conftest or
from each other); conftest holds the fixtures."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from grpo_lab.config import validate
from grpo_lab.data import TaskDataModule
from grpo_lab.module import GRPOModule
from grpo_lab.paths import config_dir
from grpo_lab.train import build_module

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist the workers share the cores: each worker, and the CLI runs it starts, get
# their share of torch threads rather than all of them each (oversubscription slows both).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS_PER_WORKER = max(1, (os.cpu_count() or 1) // _WORKERS)
if _WORKERS > 1:
    import torch

    torch.set_num_threads(THREADS_PER_WORKER)

# Overrides that make `grpo-lab train` finish in seconds: a 10x10 addition table, a short
# SFT warm start, two rollouts of 4 prompts x 4 completions.
FAST = [
    "task.max_operand=9",
    "task.eval_size=20",
    "sft.steps=5",
    "sft.num_examples=50",
    "train.rollouts=2",
    "train.prompts_per_step=4",
    "G=4",
    "train.eval_every=1",
    "train.eval_size=8",
    "train.checkpoint_every=1",
    "train.log_samples_every=1",
    "policy.hidden_size=32",
    "policy.intermediate_size=64",
    "trainer.enable_progress_bar=false",
    # The tests pin the GRPO paper's step (the default experiment uses beta 0 and DAPO's dynamic
    # sampling): with FAST's untrained warm start every group is dead, and dynamic sampling would
    # resample each rollout 4 times.
    "beta=0.04",
    "train.dynamic_sampling=false",
]


def fast_without(*keys: str) -> list[str]:
    """FAST minus the keys a test or sweep sets itself (Hydra refuses a key given twice)."""
    return [o for o in FAST if o.split("=", 1)[0] not in keys]


def compose(*overrides: str, check: bool = True) -> DictConfig:
    """The real config tree composed with ``overrides`` (Hydra's compose API), validated as
    ``grpo-lab train`` validates it unless ``check`` is false."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    if check:
        validate(cfg)
    return cfg


def module_of(*overrides: str, check: bool = True, **parts) -> GRPOModule:
    """A GRPOModule built from the composed config as ``grpo-lab train`` builds it; ``parts``
    (policy, task, rewards, sampler) replace the config's own. ``check=False`` skips the config
    check (a test may set what a user may not, e.g. ``train.lr=0`` to keep pi_old fixed)."""
    return build_module(compose(*overrides, check=check), **parts)


def cpu_trainer(**kwargs) -> L.Trainer:
    """A bare Lightning Trainer on the CPU: no logger, checkpoints, progress bar or sanity eval."""
    settings = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**settings, **kwargs})


def attach(module: GRPOModule, prompts: int = 2) -> GRPOModule:
    """Attach a real trainer, optimizer and scheduler without taking a step (max_steps=0), so a
    test can call make_rollout / inner_updates itself on a known rollout."""
    cpu_trainer(max_steps=0).fit(
        module, datamodule=TaskDataModule(module.task, prompts, 4, 4, seed=0)
    )
    return module


# FAST with a warm start that samples some correct answers: groups have reward variance, so the
# policy moves (with FAST's 5 SFT steps every reward is 0 and every gradient 0).
LEARNING = [o for o in FAST if not o.startswith("sft.")] + [
    "sft.steps=80",
    "sft.lr=3e-3",
    "sft.num_examples=50",
]

# What every training run logs per step (TRL's names where TRL has one).
STEP_METRICS = [
    "reward",
    "reward_std",
    "rewards/accuracy/mean",
    "rewards/format/mean",
    "kl",
    "loss",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "completions/mean_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "frac_reward_zero_std",
    "entropy",
    "grad_norm",
    "lr",
    "perf/step_time_s",
    "perf/tokens_per_s",
    "perf/sample_s",
    "perf/reward_s",
    "perf/ref_logprobs_s",
    "perf/old_logprobs_s",
    "perf/update_s",
    "rollout",
]


def points_of(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value), ...] in step order, every point an MLflow run holds (repeats
    kept). client: an MlflowClient."""
    keys = client.get_run(run_id).data.metrics
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in keys
    }


def wait_for(proc, find, timeout: float = 300) -> Path:
    """Poll until ``find()`` returns a path; fail with the output of ``proc`` (a Popen started
    with text pipes) if it exits first."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        if proc.poll() is not None:
            out, err = proc.communicate()
            out, err = out or "", err or ""  # None: the output went to a file
            raise AssertionError(f"exited {proc.returncode} early\n{out[-3000:]}\n{err[-5000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the run to write checkpoints")


def cli_env(tracking_uri: str, cache_dir: Path) -> dict:
    """The environment of a ``grpo-lab`` subprocess: this store, this SFT cache."""
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "GRPO_LAB_CACHE": str(cache_dir),
        "HYDRA_FULL_ERROR": "1",
        "PYTHONUNBUFFERED": "1",
    }


def runs_of(tracking_uri: str):
    """(client, the grpo_lab experiment, its runs) of a store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    return client, exp, client.search_runs([exp.experiment_id], max_results=100)


def sweep_dir_of(cwd: Path) -> Path:
    """The one sweep folder a ``-m`` run started in ``cwd`` wrote."""
    dirs = sorted(p.parent for p in (cwd / "multirun").glob("*/*/mlflow_sweep.json"))
    assert len(dirs) == 1, f"expected one sweep folder under {cwd / 'multirun'}, found {dirs}"
    return dirs[0]


# The grid of the session's shared sweep (conftest's ``grid_sweep`` fixture).
GRID = ["G=2,4", "epsilon=0.1,0.2"]


@dataclass
class GridSweep:
    """Where the shared grid sweep ran: its working dir, store, sweep folder, env and stdout."""

    cwd: Path
    tracking_uri: str
    sweep_dir: Path
    env: dict
    stdout: str
