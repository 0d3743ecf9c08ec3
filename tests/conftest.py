"""Shared fixtures: a migrated MLflow SQLite store per test, the SFT cache, the CLI (run to the end
or started in the background), the session's one grid sweep, and the ``gpu`` marker's skip. Plain
helpers (FAST overrides, compose, a module from the config, a CPU trainer) are in helpers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import GRID, THREADS_PER_WORKER, GridSweep, cli_env, fast_without, sweep_dir_of


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


@pytest.fixture
def start_cli(tmp_path, tracking_uri, cache_dir):
    """Start the real ``grpo-lab`` in a subprocess inside tmp_path; the caller waits for it
    (helpers.wait_for). Any process still running at the end of the test is killed.

    command: another command line to run in that environment (a script that calls the CLI).
    output: a file for stdout and stderr together, for a process that prints more than a pipe
    holds before the test reads it (a sweep); default: pipes.
    """
    procs: list[subprocess.Popen] = []

    def start(
        *args: str, command: list[str] | None = None, output: Path | None = None
    ) -> subprocess.Popen:
        env = {
            **cli_env(tracking_uri, cache_dir),
            "OMP_NUM_THREADS": str(THREADS_PER_WORKER),
        }
        sink = open(output, "w") if output is not None else subprocess.PIPE  # noqa: SIM115
        proc = subprocess.Popen(
            command or [sys.executable, "-m", "grpo_lab.cli", *args],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT if output is not None else subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:  # a failed assertion must not leave a training process behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def grid_sweep(tmp_path_factory, mlflow_template, cache_dir) -> GridSweep:
    """``grpo-lab train -m G=2,4 epsilon=0.1,0.2`` of tiny runs, run once per session (per
    xdist worker) and shared by the sweep, eval, report and browser tests."""
    cwd = tmp_path_factory.mktemp("grid-sweep")
    shutil.copy(mlflow_template, cwd / "mlflow.db")
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    env = cli_env(uri, cache_dir)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo_lab.cli",
            "train",
            "-m",
            *GRID,
            *fast_without(*(o.split("=", 1)[0] for o in GRID)),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"grid sweep failed\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return GridSweep(cwd, uri, sweep_dir_of(cwd), env, proc.stdout)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``gpu`` skip, saying why, where no CUDA device is present."""
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (marked gpu)")


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


# ---------------------------------------------- the browser tests' outcome, in every run's summary
# pytest-xdist's quiet output names neither passed nor skipped tests: CI's log would not show
# whether the MLflow UI test ran. One line per test marked ``browser`` says it (skips with their
# reason), from the reports the run already has: nothing runs twice.

_browser_outcomes: dict[str, tuple[str, float, str]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "browser" not in report.keywords:
        return
    outcome, seconds, reason = _browser_outcomes.get(report.nodeid, ("passed", 0.0, ""))
    seconds += report.duration
    if report.failed:
        outcome = "failed"
    elif report.skipped and outcome != "failed":
        outcome = "skipped"
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""
    _browser_outcomes[report.nodeid] = (outcome, seconds, reason)


def pytest_terminal_summary(terminalreporter) -> None:
    for nodeid, (outcome, seconds, reason) in sorted(_browser_outcomes.items()):
        why = f" ({reason})" if reason else ""
        terminalreporter.write_line(
            f"browser test {outcome.upper()} in {seconds:.0f} s: {nodeid}{why}"
        )
