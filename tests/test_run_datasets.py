"""The data a run used is on its MLflow run (``mlflow.log_input``: training and evaluation, with
MLflow's digest), and ``grpo-lab report`` says when the arms of a sweep used different data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.data.digest_utils import compute_pandas_digest

from grpo_lab.report import Job, Sweep, data_differences
from grpo_lab.tasks import ArithmeticTask, JsonlTask
from grpo_lab.tracking import log_datasets, task_datasets
from helpers import FAST


class RunHandle:
    """What ``log_datasets`` reads of a Lightning MLFlowLogger: its client and run id."""

    def __init__(self, tracking_uri: str) -> None:
        self.experiment = MlflowClient(tracking_uri=tracking_uri)
        exp = self.experiment.create_experiment("datasets")
        self.run_id = self.experiment.create_run(exp).info.run_id


def inputs_of(client: MlflowClient, run_id: str) -> dict[str, tuple[str, str, str]]:
    """context -> (name, digest, source) of a run's dataset inputs."""
    out = {}
    for di in client.get_run(run_id).inputs.dataset_inputs:
        (context,) = [t.value for t in di.tags if t.key == "mlflow.data.context"]
        assert context not in out, f"context {context} logged twice"
        out[context] = (di.dataset.name, di.dataset.digest, di.dataset.source)
    return out


def frame_digest(examples) -> str:
    """MLflow's digest of a DataFrame of the examples built here, not by grpo_lab."""
    df = pd.DataFrame(
        {
            "prompt": [e.prompt for e in examples],
            "answer": [e.answer for e in examples],
            "demonstration": [e.demonstration or e.answer for e in examples],
        }
    )
    return compute_pandas_digest(df)


def test_a_run_gets_its_train_and_scored_eval_data_once(tracking_uri):
    task = ArithmeticTask(max_operand=9, eval_size=20, seed=0, flawed_demo_fraction=0.6)
    run = RunHandle(tracking_uri)
    assert log_datasets(run, task, eval_size=8)
    got = inputs_of(run.experiment, run.run_id)
    assert got == {
        "training": (
            "arithmetic/train",
            frame_digest(task.train()),
            '{"uri": "grpo_lab:arithmetic"}',
        ),
        "evaluation": (
            "arithmetic/eval",
            frame_digest(task.eval()[:8]),
            '{"uri": "grpo_lab:arithmetic"}',
        ),
    }
    # a resumed run already has them: nothing is logged a second time
    assert not log_datasets(run, ArithmeticTask(max_operand=5, eval_size=5), eval_size=8)
    assert inputs_of(run.experiment, run.run_id) == got


def digests(task, eval_size: int = 8) -> dict[str, str]:
    return {context: ds.digest for ds, context in task_datasets(task, eval_size)}


def test_the_same_data_gives_the_same_digest_and_other_data_another():
    base = digests(ArithmeticTask(max_operand=9, eval_size=20, seed=0, flawed_demo_fraction=0.6))
    again = digests(ArithmeticTask(max_operand=9, eval_size=20, seed=0, flawed_demo_fraction=0.6))
    assert again == base
    other_split = digests(
        ArithmeticTask(max_operand=9, eval_size=20, seed=1, flawed_demo_fraction=0.6)
    )
    assert (
        other_split["training"] != base["training"]
        and other_split["evaluation"] != base["evaluation"]
    )
    # flawed demonstrations change what SFT trains on, not what eval scores
    clean = digests(ArithmeticTask(max_operand=9, eval_size=20, seed=0, flawed_demo_fraction=0.0))
    assert clean["training"] != base["training"] and clean["evaluation"] == base["evaluation"]
    # the run scores the first train.eval_size eval prompts: that is what is digested
    assert (
        digests(ArithmeticTask(max_operand=9, eval_size=20, seed=0), eval_size=4)["evaluation"]
        != (digests(ArithmeticTask(max_operand=9, eval_size=20, seed=0), eval_size=8)["evaluation"])
    )


def test_a_file_task_names_its_files_as_the_source(tmp_path):
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(6))
    )
    evals.write_text(json.dumps({"prompt": "9+1=", "answer": "10"}) + "\n")
    task = JsonlTask(str(train), eval_path=str(evals))
    sources = {context: ds.source.to_json() for ds, context in task_datasets(task, 8)}
    assert sources == {
        "training": json.dumps({"uri": str(train)}),
        "evaluation": json.dumps({"uri": str(evals)}),
    }


# ---------------------------------------------------------------- the report


def job(num: int, arm: str, seed: str, train: str, evals: str = "e1") -> Job:
    return Job(
        num,
        f"run{num}",
        arm,
        "FINISHED",
        {"task.max_operand": arm},
        {"objective": 0.5},
        seed=seed,
        data={"training": ("arithmetic/train", train), "evaluation": ("arithmetic/eval", evals)},
    )


def sweep_of(*jobs: Job) -> Sweep:
    return Sweep("parent", "1", "s", ["task.max_operand", "seed"], "eval/accuracy", list(jobs))


def test_data_differences_compare_arms_seed_by_seed():
    same = sweep_of(job(0, "9", "0", "a"), job(1, "8", "0", "a"))
    assert data_differences(same) == []
    # each seed has its own split, alike in both arms: no difference between the arms
    per_seed = sweep_of(
        job(0, "9", "0", "a"), job(1, "8", "0", "a"), job(2, "9", "1", "b"), job(3, "8", "1", "b")
    )
    assert data_differences(per_seed) == []
    differ = sweep_of(
        job(0, "9", "0", "a"),
        job(1, "8", "0", "b", evals="e2"),
        job(2, "9", "1", "c"),
        job(3, "8", "1", "c"),
    )
    assert data_differences(differ) == [
        "data: the arms' training data differ (seed 0): arithmetic/train (digest a) in "
        "max_operand=9; arithmetic/train (digest b) in max_operand=8",
        "data: the arms' evaluation data differ (seed 0): arithmetic/eval (digest e1) in "
        "max_operand=9; arithmetic/eval (digest e2) in max_operand=8",
    ]
    # runs from before datasets were logged: nothing to say
    assert data_differences(sweep_of(Job(0, "r", "a", "FINISHED", {}, {"objective": 1.0}))) == []


@pytest.mark.slow
def test_a_sweep_over_task_data_logs_each_arms_digests_and_the_report_says_they_differ(
    tmp_path, mlflow_template, cache_dir
):
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "GRPO_LAB_CACHE": str(cache_dir),
        "HYDRA_FULL_ERROR": "1",
    }
    fast = [o for o in FAST if not o.startswith("task.max_operand")]

    def cli(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "grpo_lab.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc

    cli("train", "-m", "task.max_operand=8,9", *fast, "num_threads=1")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("grpo_lab")
    runs = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("grpo_lab.role") != "sweep"  # the jobs, not their parent
    ]
    by_arm = {r.data.params["task.max_operand"]: inputs_of(client, r.info.run_id) for r in runs}
    assert set(by_arm) == {"8", "9"}
    for arm, got in by_arm.items():
        task = ArithmeticTask(max_operand=int(arm), eval_size=20, seed=0, flawed_demo_fraction=0.6)
        assert got["training"][:2] == ("arithmetic/train", frame_digest(task.train()))
        assert got["evaluation"][:2] == ("arithmetic/eval", frame_digest(task.eval()[:8]))
    assert by_arm["8"]["training"][1] != by_arm["9"]["training"][1]

    (sweep_dir,) = {p.parent for p in (tmp_path / "multirun").glob("*/*/mlflow_sweep.json")}
    out = cli("report", str(sweep_dir)).stdout
    lines = (sweep_dir / "report" / "verdicts.txt").read_text().splitlines()
    data = [line for line in lines if line.startswith("data:")]
    d8, d9 = by_arm["8"]["training"][1], by_arm["9"]["training"][1]
    assert data[0] == (
        "data: the arms' training data differ (seed 0): "
        + "; ".join(
            sorted(
                [
                    f"arithmetic/train (digest {d8}) in max_operand=8",
                    f"arithmetic/train (digest {d9}) in max_operand=9",
                ]
            )
        )
    )
    assert data[1].startswith("data: the arms' evaluation data differ (seed 0)") and len(data) == 2
    assert "## Data" in out and data[0] in out
