"""``grpo-lab report`` over the shared 2x2 sweep, and the verdict arithmetic on made-up sweeps."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from grpo_lab.report import Job, Sweep, table, verdicts
from test_sweep import GridSweep, shared_grid_sweep


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, mlflow_template, cache_dir) -> GridSweep:
    return shared_grid_sweep(tmp_path_factory, mlflow_template, cache_dir)


def report(sweep: GridSweep, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_lab.cli", "report", *args],
        cwd=sweep.cwd,
        env=sweep.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_report_of_a_sweep_folder_has_one_row_per_configuration(grid_sweep):
    report(grid_sweep, str(grid_sweep.sweep_dir))
    out = grid_sweep.sweep_dir / "report"
    df = pd.read_csv(out / "table.csv")
    assert len(df) == 4
    assert sorted(zip(df["G"], df["epsilon"])) == [(2, 0.1), (2, 0.2), (4, 0.1), (4, 0.2)]
    assert list(df["config"]) == [f"G={g} eps={e}" for g, e in zip(df["G"], df["epsilon"])]
    assert (
        (df["status"] == "FINISHED").all() and (df["steps"] == 2).all() and (df["seeds"] == 1).all()
    )
    assert list(df["objective"]) == sorted(df["objective"], reverse=True)
    assert df["eval_acc_best"].ge(df["eval_acc_final"] - 1e-9).all()
    md = (out / "table.md").read_text()
    assert md.count("| G=") == 4 and "## Verdicts" in md
    lines = (out / "verdicts.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["G", "epsilon"]
    for name in ("curves.png", "objective_vs_G.png", "objective_vs_epsilon.png"):
        with Image.open(out / name) as im:
            im.verify()
            assert im.size[0] > 500 and im.size[1] > 300

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=grid_sweep.tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    parent = client.search_runs([exp.experiment_id], "tags.`grpo_lab.role` = 'sweep'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {
        "report/table.csv",
        "report/table.md",
        "report/curves.png",
        "report/objective_vs_G.png",
    } <= logged


@pytest.mark.slow
def test_report_of_an_experiment_name_reads_the_same_sweep(grid_sweep, tmp_path):
    proc = report(
        grid_sweep, "grpo_lab", "--tracking-uri", grid_sweep.tracking_uri, "--out", str(tmp_path)
    )
    df = pd.read_csv(tmp_path / "table.csv")
    assert sorted(df["config"]) == ["G=2 eps=0.1", "G=2 eps=0.2", "G=4 eps=0.1", "G=4 eps=0.2"]
    assert "report of 4 runs" in proc.stdout


def test_report_of_an_unknown_source_says_what_to_give(tmp_path, tracking_uri):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo_lab.cli",
            "report",
            "no_such_experiment",
            "--tracking-uri",
            tracking_uri,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "'no_such_experiment' is neither a sweep folder nor an experiment" in proc.stderr


def _sweep(
    objectives: dict[tuple[str, str], list[float]], failed: tuple[str, str] | None = None
) -> Sweep:
    jobs, num = [], 0
    for (g, seed_free), values in objectives.items():
        for seed, obj in enumerate(values):
            status = "FAILED" if (g, seed_free) == failed else "FINISHED"
            jobs.append(
                Job(
                    num,
                    f"run{num:06d}",
                    "",
                    status,
                    {"G": g, "beta": seed_free, "seed": str(seed)},
                    {
                        "objective": float("nan") if status == "FAILED" else obj,
                        "eval_acc_final": obj,
                        "eval_acc_best": obj,
                        "reward_final": 0.0,
                        "kl": 0.0,
                        "mean_length": 3.0,
                        "steps": 2.0,
                        "wall_s": 1.0,
                    },
                )
            )
            num += 1
    return Sweep("parent", "1", "2026-01-01/00-00-00", ["G", "beta", "seed"], "eval/accuracy", jobs)


def test_verdict_calls_a_margin_above_twice_the_spread_clear():
    sweep = _sweep({("4", "0"): [0.50, 0.52], ("8", "0"): [0.60, 0.62]})
    (g,) = [v for v in verdicts(sweep) if v.startswith("G:")]
    assert "best G=8" in g and "+0.1" in g and g.endswith("clear")  # gap 0.1, spread 0.0141


def test_verdict_calls_a_margin_below_the_spread_noise():
    sweep = _sweep({("4", "0"): [0.40, 0.60], ("8", "0"): [0.45, 0.65]})
    (g,) = [v for v in verdicts(sweep) if v.startswith("G:")]
    assert "best G=8" in g and g.endswith("within noise")  # gap 0.05, spread 0.141


def test_table_averages_seeds_and_puts_failed_configurations_last():
    sweep = _sweep(
        {("4", "0"): [0.2, 0.4], ("8", "0"): [0.5, 0.7], ("16", "0"): [0.9, 0.9]},
        failed=("16", "0"),
    )
    df = table(sweep)
    assert list(df["G"]) == ["8", "4", "16"]
    assert list(df["seeds"]) == [2, 2, 2]
    assert df["objective"].iloc[0] == pytest.approx(0.6) and df["objective_std"].iloc[
        0
    ] == pytest.approx(0.1414, abs=1e-4)
    assert list(df["status"]) == ["FINISHED", "FINISHED", "FAILED"]
    assert any("G=16: every run FAILED" in v for v in verdicts(sweep))
