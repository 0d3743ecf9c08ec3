"""``grpo-lab eval`` on a checkpoint of the shared sweep, and the pass@k estimator by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_lab.evaluate import pass_at_k
from helpers import GridSweep


def test_pass_at_k_matches_hand_computation():
    # n=5 samples, c=2 correct, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # k=1 is the fraction correct: 1 - C(3,1)/C(4,1) = 1/4
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # n=10, c=3, k=4: 1 - C(7,4)/C(10,4) = 1 - 35/210
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(3, 2, 2) == 1.0  # only one wrong sample: any two include a right one
    assert pass_at_k(16, 16, 8) == 1.0
    assert math.isclose(pass_at_k(8, 4, 8), 1.0)


def test_pass_at_k_rejects_k_outside_1_to_n():
    with pytest.raises(ValueError, match=r"k=9 is invalid: expected 1 <= k <= n \(n=8\)"):
        pass_at_k(8, 1, 9)
    with pytest.raises(ValueError, match=r"c=9 is invalid"):
        pass_at_k(8, 9, 2)


def run_eval(sweep: GridSweep, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grpo_lab.cli", "eval", *args],
        cwd=sweep.cwd,
        env=sweep.env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
def test_eval_scores_a_checkpoint_as_a_run_linked_to_its_training_run(grid_sweep, tmp_path):
    from mlflow import MlflowClient

    job = grid_sweep.sweep_dir / "G-2+epsilon-0.1"
    ckpt = job / "checkpoints" / "last.ckpt"
    proc = run_eval(
        grid_sweep,
        f"ckpt={ckpt}",
        "task.max_operand=9",
        "task.eval_size=20",
        "eval.size=8",
        "eval.n=4",
        "eval.k=2",
        "eval.batch_size=4",
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    train_run_id = json.loads((job / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=grid_sweep.tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    (run,) = client.search_runs(
        [exp.experiment_id], f"tags.`grpo_lab.train_run_id` = '{train_run_id}'"
    )
    train_run = client.get_run(train_run_id)
    assert run.info.run_name == f"eval {train_run.info.run_name}" and run.info.status == "FINISHED"
    m = run.data.metrics
    assert set(m) >= {"eval/accuracy", "eval/pass_at_2", "eval/pass_at_1", "eval/mean_length"}
    assert 0 <= m["eval/pass_at_1"] <= m["eval/pass_at_2"] <= 1
    assert run.data.params["eval.k"] == "2" and run.data.params["eval.n"] == "4"
    table = json.loads(
        Path(
            client.download_artifacts(run.info.run_id, "eval/completions.json", str(tmp_path))
        ).read_text()
    )
    assert (
        len(table["data"]) == 8 and "pass_at_2" in table["columns"] and "greedy" in table["columns"]
    )
    assert f"eval/accuracy = {m['eval/accuracy']:.4f}" in proc.stdout


@pytest.mark.slow
def test_eval_rejects_k_larger_than_n(grid_sweep):
    ckpt = grid_sweep.sweep_dir / "G-2+epsilon-0.1" / "checkpoints" / "last.ckpt"
    proc = run_eval(grid_sweep, f"ckpt={ckpt}", "eval.n=4", "eval.k=9")
    assert proc.returncode != 0
    assert "eval.k=9 is invalid: expected 1 <= eval.k <= eval.n (eval.n=4)" in proc.stderr


def _eval_run(grid_sweep: GridSweep, ckpt: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=grid_sweep.tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`grpo_lab.role` = 'eval' and tags.`grpo_lab.checkpoint` = '{ckpt.resolve()}'",
        order_by=["attributes.start_time DESC"],
    )
    return client, runs[0]


def _eval_prompts(client, run_id: str, tmp: Path) -> list[str]:
    path = client.download_artifacts(run_id, "eval/completions.json", str(tmp))
    table = json.loads(Path(path).read_text())
    return [row[table["columns"].index("prompt")] for row in table["data"]]


def _arithmetic_eval_prompts(max_operand: int, eval_size: int, n: int) -> list[str]:
    """The task's held-out prompts built here from its class, with the grid job's settings."""
    from grpo_lab.tasks import ArithmeticTask

    task = ArithmeticTask(min_operand=0, max_operand=max_operand, ops=["+"], eval_size=eval_size)
    return [ex.prompt for ex in task.eval()[:n]]


@pytest.mark.slow
def test_eval_scores_the_task_and_eval_split_the_run_trained_with(grid_sweep, tmp_path):
    """No task override: the run's task (max_operand=9, eval_size=20), its eval split (the first
    train.eval_size=8 prompts) and its sampler, so greedy accuracy and mean length equal the
    run's final eval. An explicit override still wins."""
    job = grid_sweep.sweep_dir / "G-2+epsilon-0.1"
    ckpt = job / "checkpoints" / "last.ckpt"
    proc = run_eval(grid_sweep, f"ckpt={ckpt}", "eval.n=2", "eval.k=1")
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    client, run = _eval_run(grid_sweep, ckpt)
    # the run's held-out prompts: the first train.eval_size=8 of its task's eval split
    assert _eval_prompts(client, run.info.run_id, tmp_path / "a") == _arithmetic_eval_prompts(
        9, 20, 8
    )
    train_run_id = json.loads((job / "mlflow_run.json").read_text())["run_id"]
    final = client.get_run(train_run_id).data.metrics
    m = run.data.metrics
    assert m["eval/accuracy"] == pytest.approx(final["eval/accuracy_final"])
    assert m["eval/mean_length"] == pytest.approx(final["eval/mean_length_final"])
    params = run.data.params
    assert params["task.max_operand"] == "9" and params["task.eval_size"] == "20"
    assert params["eval.size"] == "8" and params["sampler.max_new_tokens"] == "6"

    proc = run_eval(
        grid_sweep, f"ckpt={ckpt}", "task.max_operand=19", "eval.size=5", "eval.n=2", "eval.k=1"
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    client, run = _eval_run(grid_sweep, ckpt)
    params = run.data.params
    assert params["task.max_operand"] == "19" and params["task.eval_size"] == "20"
    assert params["eval.size"] == "5"
    assert _eval_prompts(client, run.info.run_id, tmp_path / "b") == _arithmetic_eval_prompts(
        19, 20, 5
    )


def _compose(config_name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    from grpo_lab.paths import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def test_eval_config_takes_the_runs_task_sampler_and_split_unless_overridden():
    from grpo_lab.evaluate import config_from_run

    run = _compose(
        "config",
        "seed=3",
        "task.max_operand=9",
        "task.eval_size=20",
        "sampler.max_new_tokens=4",
        "train.eval_size=8",
        "train.eval_batch_size=5",
        "policy.hidden_size=32",
    )
    overrides = ["ckpt=x.ckpt", "task.eval_size=30", "sampler.temperature=0.5"]
    keys = [o.split("=")[0] for o in overrides]
    cfg = config_from_run(_compose("eval", *overrides), run, keys)
    # from the run, resolved against it (the task's seed is the run's seed=3, not eval's 0)
    assert (cfg.task.max_operand, cfg.task.seed, cfg.sampler.max_new_tokens) == (9, 3, 4)
    assert (cfg.eval.size, cfg.eval.batch_size, cfg.policy.hidden_size) == (8, 5, 32)
    # the command line wins
    assert (cfg.task.eval_size, cfg.sampler.temperature) == (30, 0.5)

    # a group chosen on the command line is eval's own, whole; an explicit eval.size wins
    overrides = ["ckpt=x.ckpt", "task=countdown", "eval.size=3", "policy_from_run=false"]
    cfg = config_from_run(_compose("eval", *overrides), run, ["ckpt", "task", "eval.size"])
    assert cfg.task._target_.endswith("CountdownTask") and cfg.eval.size == 3
    assert cfg.policy.hidden_size != 32  # policy_from_run=false: eval's own policy

    # no run config (a checkpoint made elsewhere): eval's own defaults
    own = _compose("eval", "ckpt=x.ckpt")
    cfg = config_from_run(own, None, ["ckpt"])
    assert cfg.task == own.task and (cfg.eval.size, cfg.eval.batch_size) == (200, 64)
