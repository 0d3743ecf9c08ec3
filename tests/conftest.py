"""Shared fixtures: a migrated MLflow SQLite store per test, fast-run overrides, the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An SQLite store with MLflow's schema migrations already run (they take ~10 s)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, mlflow_template) -> str:
    """A fresh, already-migrated SQLite store in this test's temporary directory."""
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One SFT cache for the session, so tests with the same warm start train it once."""
    return tmp_path_factory.mktemp("grpo-cache")


@pytest.fixture
def run_cli(tmp_path, tracking_uri, cache_dir):
    """Run the real `grpo-lab` console entry point in a subprocess inside tmp_path."""

    def run(*args: str, check: bool = True, timeout: float = 300, env: dict | None = None):
        full_env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": tracking_uri,
            "GRPO_LAB_CACHE": str(cache_dir),
            "HYDRA_FULL_ERROR": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(THREADS_PER_WORKER),
            **(env or {}),
        }
        proc = subprocess.run(
            [sys.executable, "-m", "grpo_lab.cli", *args],
            cwd=tmp_path,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"grpo-lab {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                f"\n--- stderr\n{proc.stderr[-6000:]}"
            )
        return proc

    return run


# Lines the local chat model's tokenizer is trained on: the characters of the hf-task tests'
# prompts, answers and tags (byte-level BPE encodes any other text too, in more tokens).
CHAT_TEXTS = [
    "You are a helpful assistant. Answer with <think> reasoning </think><answer> \\boxed{} </answer>.",
    *(f"What is {a} plus {b}? {a}+{b}={a + b} #### {a + b}" for a in range(10) for b in range(10)),
    "<think> 3+4 </think><answer> \\boxed{7} </answer>",
]


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """A Qwen2-architecture model with random weights (hidden 64, 2 layers) and a BPE tokenizer
    with a ChatML chat template, written by save_pretrained (``grpo_lab.testing``)."""
    from grpo_lab.testing import save_chat_model

    return save_chat_model(tmp_path_factory.mktemp("chat-model") / "qwen2-tiny", CHAT_TEXTS)
