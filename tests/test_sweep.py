"""Sweeps through the real CLI: nested MLflow runs, failures recorded, joblib, Optuna, submitit.

``grid_sweep`` (conftest: one 2x2 sweep G=2,4 x epsilon=0.1,0.2 of tiny runs) is shared with the
report, eval and browser tests; it runs once per session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import fast_without, runs_of, sweep_dir_of


@pytest.mark.slow
def test_grid_sweep_nests_one_run_per_job_under_one_parent(grid_sweep):
    client, _, runs = runs_of(grid_sweep.tracking_uri)
    parents = [r for r in runs if r.data.tags.get("grpo_lab.role") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert sorted(r.info.run_name for r in children) == [
        "G=2 eps=0.1",
        "G=2 eps=0.2",
        "G=4 eps=0.1",
        "G=4 eps=0.2",
    ]
    assert {r.info.status for r in children} == {"FINISHED"} and parent.info.status == "FINISHED"
    assert sorted(int(r.data.tags["grpo_lab.job_num"]) for r in children) == [0, 1, 2, 3]
    for r in children:
        assert r.data.tags["grpo_lab.sweep_id"] == parent.data.tags["grpo_lab.sweep_id"]
        assert "objective" in r.data.metrics  # what the sweeper got back from train()
        assert r.data.metrics["objective"] == pytest.approx(r.data.metrics["eval/accuracy_final"])
        # the params say what the run did
        assert r.data.params["G"] == json.loads(r.data.tags["grpo_lab.swept"])["G"]
    assert json.loads(parent.data.tags["grpo_lab.swept_keys"]) == ["G", "epsilon"]
    assert parent.data.metrics["sweep/jobs"] == 4 and parent.data.metrics["sweep/failed"] == 0
    assert "sweep_summary.md" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    # the job folders Hydra wrote, named by their swept values (sorted keys), each with its
    # overrides and the id of its MLflow run
    jobs = sorted(p for p in grid_sweep.sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == [
        "G-2+epsilon-0.1",
        "G-2+epsilon-0.2",
        "G-4+epsilon-0.1",
        "G-4+epsilon-0.2",
    ]
    by_id = {r.info.run_id: r for r in children}
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        run = by_id[json.loads((job / "mlflow_run.json").read_text())["run_id"]]
        assert run.data.tags["grpo_lab.job_dir"] == str(job.resolve())
        assert (
            f"G={run.data.params['G']}" in overrides
            and job.name.split("+")[0].replace("-", "=") in overrides
        )
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert "grpo-lab report multirun/" in grid_sweep.stdout


@pytest.mark.slow
def test_failed_job_is_recorded_while_parallel_jobs_finish(run_cli, tmp_path, tracking_uri):
    """joblib launcher (two processes); epsilon=1.5 fails at runtime, the other job finishes."""
    proc = run_cli(
        "train",
        "-m",
        "hydra/launcher=parallel",
        "num_threads=1",
        "epsilon=0.2,1.5",
        *fast_without("epsilon"),
    )
    client, _, runs = runs_of(tracking_uri)
    parent = next(r for r in runs if r.data.tags.get("grpo_lab.role") == "sweep")
    assert "JoblibLauncher" in parent.data.tags["grpo_lab.launcher"]
    children = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"eps=0.2", "eps=1.5"}
    ok, bad = children["eps=0.2"], children["eps=1.5"]
    assert ok.info.status == "FINISHED" and "objective" in ok.data.metrics
    assert bad.info.status == "FAILED"
    assert "epsilon=1.5 is invalid" in bad.data.tags["grpo_lab.error"]
    trace = Path(client.download_artifacts(bad.info.run_id, "error/traceback.txt", str(tmp_path)))
    assert "ConfigError" in trace.read_text() and "Traceback" in trace.read_text()
    assert parent.info.status == "FAILED" and parent.data.metrics["sweep/failed"] == 1
    assert "1 failed" in proc.stdout
    # the report lists the failed configuration
    run_cli("report", str(sweep_dir_of(tmp_path)))
    table = (sweep_dir_of(tmp_path) / "report" / "table.csv").read_text().splitlines()
    assert table[1].startswith("0.2,") and table[1].endswith(ok.info.run_id[:8])
    assert table[2].startswith("1.5,") and ",FAILED," in table[2]


@pytest.mark.slow
def test_fail_fast_stops_the_sweep_at_the_first_failure(run_cli, tmp_path, tracking_uri):
    proc = run_cli(
        "train",
        "-m",
        "epsilon=1.5,0.2",
        "sweep.fail_fast=true",
        *fast_without("epsilon"),
        check=False,
    )
    assert proc.returncode != 0
    assert "sweep.fail_fast=true" in proc.stdout + proc.stderr
    _, _, runs = runs_of(tracking_uri)
    parent = next(r for r in runs if r.data.tags.get("grpo_lab.role") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [(r.info.run_name, r.info.status) for r in children] == [("eps=1.5", "FAILED")]
    assert parent.info.status == "FAILED"
    assert not (sweep_dir_of(tmp_path) / "epsilon-0.2").exists()  # job 1 never started


@pytest.mark.slow
def test_optuna_sweeper_maximises_the_objective_train_returns(run_cli, tmp_path, tracking_uri):
    run_cli(
        "train",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.params.G='choice(2,4)'",
        *fast_without("G", "beta"),
    )
    _, _, runs = runs_of(tracking_uri)
    parent = next(r for r in runs if r.data.tags.get("grpo_lab.role") == "sweep")
    assert "OptunaSweeper" in parent.data.tags["grpo_lab.sweeper"]
    assert json.loads(parent.data.tags["grpo_lab.swept_keys"]) == [
        "G",
        "epsilon",
        "beta",
        "train.lr",
    ]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}
    result = yaml.safe_load((sweep_dir_of(tmp_path) / "optimization_results.yaml").read_text())
    objectives = [r.data.metrics["objective"] for r in trials]
    assert result["best_value"] == pytest.approx(max(objectives))
    assert set(result["best_params"]) == {"G", "epsilon", "beta", "train.lr"}
    assert all(
        r.data.metrics["objective"] == pytest.approx(r.data.metrics["eval/accuracy_final"])
        for r in trials
    )
    assert {r.data.params["G"] for r in trials} <= {"2", "4"}


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from grpo_lab.paths import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert (
        launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 120
    )
    # the preemption settings the config documents are the plugin's own keys
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout == 0
    assert cfg.hydra.callbacks.mlflow_sweep._target_ == "grpo_lab.sweep.MLflowSweepCallback"
    from hydra.utils import get_class

    assert get_class(launcher._target_).__name__ == "SlurmLauncher"  # the plugin is importable


def test_parallel_gpu_launcher_gives_each_worker_one_device():
    """Composes; which GPU each worker gets is tested in test_launchers.py."""
    from hydra import compose, initialize_config_dir

    from grpo_lab.paths import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=parallel_gpu", "hydra.launcher.n_jobs=4"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher.n_jobs == 4
    assert "grpo_lab_device" in cfg.hydra.job.env_set._get_node("CUDA_VISIBLE_DEVICES")._value()


def test_seeds_repeats_every_configuration():
    from grpo_lab.sweep import expand_seeds

    assert expand_seeds(["-m", "G=2,4", "seeds=3"]) == ["-m", "G=2,4", "seed=0,1,2"]
    assert expand_seeds(["-m", "seed=5", "seeds=2", "beta=0"]) == ["-m", "beta=0", "seed=5,6"]
    assert expand_seeds(["G=2"]) == ["G=2"]
    with pytest.raises(SystemExit, match=r"add -m"):
        expand_seeds(["G=2", "seeds=3"])
    with pytest.raises(SystemExit, match=r"seeds='0' is invalid: expected an integer >= 1"):
        expand_seeds(["-m", "seeds=0"])


def test_missing_plugin_names_the_extra_to_install(tmp_path):
    """With the joblib plugin unimportable, the CLI says which package and extra to install."""
    code = (
        "import sys; sys.modules['hydra_plugins.hydra_joblib_launcher'] = None\n"  # Python's way to block an import
        "from grpo_lab.cli import main\n"
        "main(['train', '-m', 'hydra/launcher=parallel', 'G=2,4'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "hydra/launcher=parallel needs the Hydra plugin hydra-joblib-launcher" in proc.stderr
    assert "pip install 'grpo-lab[sweep]'" in proc.stderr
    assert not (tmp_path / "multirun").exists()
