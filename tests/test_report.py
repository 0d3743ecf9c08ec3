"""``grpo-lab report`` over the shared 2x2 sweep, and the verdict arithmetic on made-up sweeps."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from grpo_lab.report import Job, Sweep, load, table, verdicts
from grpo_lab.report.plots import curves_figure, objective_figure
from grpo_lab.report.stats import smooth
from helpers import GridSweep


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
    # G and epsilon do not change the data: no data line among the verdicts below
    assert "Every arm trained and scored on the same data" in md
    lines = (out / "verdicts.txt").read_text().splitlines()
    # like with like: each key within each value of the other; one seed each (the seed param, 0)
    heads = ["G at eps=0.1", "G at eps=0.2", "epsilon at G=2", "epsilon at G=4"]
    assert [line.split(":")[0] for line in lines] == heads
    assert all(line.endswith("one seed: no noise estimate, rerun with seeds=3") for line in lines)
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


OTHER_VALUES = {
    "eval_acc_final": 0.0,
    "eval_acc_best": 0.0,
    "reward_final": 0.0,
    "kl": 0.0,
    "mean_length": 3.0,
    "steps": 2.0,
    "wall_s": 1.0,
}


def _sweep(
    configs: dict[tuple[str, ...], list[float]],
    keys: tuple[str, ...] = ("G", "beta"),
    failed: tuple[str, ...] | None = None,
    seeds_swept: bool = True,
) -> Sweep:
    """Runs as the report reads them: per configuration (values of ``keys``), one objective per seed.

    With ``seeds_swept=False`` the seed is not a swept key (a sweep without ``seeds=N``): every
    run has the config's default seed 0, as MLflow's ``seed`` param would say.
    """
    jobs, num = [], 0
    for values, objectives in configs.items():
        for seed, obj in enumerate(objectives):
            status = "FAILED" if values == failed else "FINISHED"
            swept = dict(zip(keys, values))
            if seeds_swept:
                swept["seed"] = str(seed)
            jobs.append(
                Job(
                    num,
                    f"run{num:06d}",
                    "",
                    status,
                    swept,
                    {"objective": float("nan") if status == "FAILED" else obj, **OTHER_VALUES},
                    seed=str(seed),
                )
            )
            num += 1
    swept_keys = [*keys, "seed"] if seeds_swept else list(keys)
    return Sweep("parent", "1", "2026-01-01/00-00-00", swept_keys, "eval/accuracy", jobs)


def _lines(sweep: Sweep, key: str) -> list[str]:
    return [v for v in verdicts(sweep) if v.split(":")[0].split(" ")[0] == key]


def _interval(line: str) -> tuple[float, float]:
    low, high = re.search(r"\[([-+0-9.]+), ([-+0-9.]+)\]", line).groups()
    return float(low), float(high)


# t quantiles t_{0.975, df} from a printed t table (not from the code under test)
T975 = {1: 12.706, 2: 4.303, 4: 2.776}


def test_a_known_effect_over_five_seeds_is_clear_and_its_interval_holds_it():
    # effect +0.10, seed noise sd 0.01 on each run, 5 seeds, same seeds on both sides: paired
    rng = np.random.default_rng(0)
    g4 = 0.50 + 0.01 * rng.standard_normal(5)
    g8 = 0.60 + 0.01 * rng.standard_normal(5)
    (line,) = _lines(_sweep({("4", "0"): list(g4), ("8", "0"): list(g8)}), "G")
    d = np.asarray(g8, dtype=np.float64) - np.asarray(g4, dtype=np.float64)
    half = T975[4] * d.std(ddof=1) / np.sqrt(5)
    low, high = _interval(line)
    assert low < 0.10 < high
    assert low == pytest.approx(d.mean() - half, abs=6e-4)  # printed with 3 decimals
    assert high == pytest.approx(d.mean() + half, abs=6e-4)
    assert "G=8 vs G=4" in line and f"{d.mean():+.3f}" in line
    assert "paired over 5 seeds" in line and line.endswith(": clear")


def test_no_effect_over_five_seeds_is_no_clear_difference():
    g4 = [0.50, 0.52, 0.48, 0.51, 0.49]
    # paired differences +0.012 -0.010 +0.020 -0.020 +0.003: mean +0.001, sd 0.01619,
    # 95% interval +0.001 -+ 2.776 * 0.01619 / sqrt(5) = [-0.019, +0.021]
    g8 = [0.512, 0.51, 0.50, 0.49, 0.493]
    (line,) = _lines(_sweep({("4", "0"): g4, ("8", "0"): g8}), "G")
    assert "G=8 vs G=4: +0.001" in line
    assert _interval(line) == pytest.approx((-0.019, 0.021), abs=1.1e-3)
    assert line.endswith(": no clear difference")


def test_a_one_seed_sweep_has_no_noise_estimate():
    sweep = _sweep({("4",): [0.50], ("8",): [0.60]}, keys=("G",), seeds_swept=False)
    (line,) = _lines(sweep, "G")
    assert "G=8 vs G=4: +0.100" in line
    assert line.endswith("one seed: no noise estimate, rerun with seeds=3")


def test_a_key_is_compared_within_each_setting_of_the_other_keys_not_across_them():
    # The 4-job sweep G=4,8 beta=0,0.04, one seed each. Pooled over beta, G=8 is
    # +0.024 ahead and the old "spread" (sd within a G value, sd of 0.500/0.516 = 0.0113)
    # came from beta, not from seeds: "2.1x the spread: clear". Like with like: one G=8 vs
    # G=4 comparison per beta, each from one seed, so no noise estimate and no verdict.
    sweep = _sweep(
        {("4", "0"): [0.500], ("4", "0.04"): [0.516], ("8", "0"): [0.524], ("8", "0.04"): [0.540]},
        seeds_swept=False,
    )
    lines = _lines(sweep, "G")
    assert [line.split(":")[0] for line in lines] == ["G at beta=0", "G at beta=0.04"]
    for line in lines:
        assert "G=8 vs G=4: +0.024" in line
        assert line.endswith("one seed: no noise estimate, rerun with seeds=3")
    assert not any(v.endswith(": clear") for v in verdicts(sweep))


def test_a_strong_other_key_does_not_make_a_null_key_look_clear():
    # beta moves the objective by 0.3, G by nothing; with seeds, G is judged within each beta
    noise = [0.01, -0.01, 0.0]
    sweep = _sweep(
        {
            ("4", "0"): [0.5 + e for e in noise],
            ("8", "0"): [0.5 + e for e in reversed(noise)],
            ("4", "0.04"): [0.8 + e for e in noise],
            ("8", "0.04"): [0.8 + e for e in reversed(noise)],
        }
    )
    g_lines, beta_lines = _lines(sweep, "G"), _lines(sweep, "beta")
    assert len(g_lines) == 2 and all(v.endswith(": no clear difference") for v in g_lines)
    assert len(beta_lines) == 2 and all(v.endswith(": clear") for v in beta_lines)
    assert all("beta=0.04 vs beta=0: +0.300" in v for v in beta_lines)


def test_a_float_rounding_difference_is_printed_as_zero_not_as_an_effect():
    # the two-seed case: a 1.5e-08 gap was printed "+1.49e-08, 5.5e-07x the spread"
    g4 = [0.50, 0.56]
    g8 = [0.53 + 3e-8, 0.53]  # paired differences +0.03, -0.03: mean 1.5e-08
    (line,) = _lines(_sweep({("4", "0"): g4, ("8", "0"): g8}), "G")
    assert "e-0" not in line and ": +0.000 " in line
    assert line.endswith(": no clear difference")
    # the same float-rounding gap on every seed: an interval that excludes 0, still no effect
    g8 = [0.50 + 1.5e-8, 0.56 + 1.5e-8]
    (line,) = _lines(_sweep({("4", "0"): g4, ("8", "0"): g8}), "G")
    assert "e-0" not in line and line.endswith(": no clear difference")


def test_different_seeds_on_each_side_are_compared_unpaired_with_welch():
    # G=4 seeds 0,1,2; G=8 seeds 0,1 (its seed 2 failed): no pairing, Welch's interval
    sweep = _sweep({("4", "0"): [0.50, 0.52, 0.54], ("8", "0"): [0.60, 0.64, 0.0]})
    sweep.jobs[-1].status = "FAILED"
    sweep.jobs[-1].values["objective"] = float("nan")
    (line,) = _lines(sweep, "G")
    a, b = np.array([0.50, 0.52, 0.54]), np.array([0.60, 0.64])
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 2  # 0.0001333, 0.0004
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 1)  # Welch-Satterthwaite: 1.68
    from scipy.stats import t

    half = t.ppf(0.975, df) * np.sqrt(va + vb)
    assert "G=8 vs G=4: +0.100" in line and "Welch, 2 vs 3 seeds" in line
    assert _interval(line) == pytest.approx((0.1 - half, 0.1 + half), abs=6e-4)


def test_table_gives_each_configuration_its_mean_and_95_interval_over_seeds():
    sweep = _sweep(
        {
            ("4", "0"): [0.2, 0.4],
            ("8", "0"): [0.5, 0.6, 0.7],
            ("16", "0"): [0.9, 0.9],
            ("32", "0"): [0.25],
        },
        failed=("16", "0"),
    )
    df = table(sweep).set_index("G")
    assert list(df.index) == ["8", "4", "32", "16"]
    assert list(df["seeds"]) == [3, 2, 1, 0]  # finished seeds behind the mean
    assert list(df["status"]) == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    # [0.5, 0.6, 0.7]: mean 0.6, sd 0.1, 0.6 -+ 4.303 * 0.1 / sqrt(3) = [0.3516, 0.8484]
    assert df.loc["8", "objective"] == pytest.approx(0.6)
    assert df.loc["8", "objective_std"] == pytest.approx(0.1)
    assert df.loc["8", "objective_ci_low"] == pytest.approx(0.3516, abs=2e-4)
    assert df.loc["8", "objective_ci_high"] == pytest.approx(0.8484, abs=2e-4)
    # [0.2, 0.4]: mean 0.3, sd 0.1414, 0.3 -+ 12.706 * 0.1414 / sqrt(2) = [-0.9706, 1.5706]
    assert df.loc["4", "objective_ci_low"] == pytest.approx(-0.9706, abs=2e-4)
    assert df.loc["4", "objective_ci_high"] == pytest.approx(1.5706, abs=2e-4)
    assert np.isnan(df.loc["32", "objective_ci_low"])  # one seed: no interval
    assert any("G=16: every run FAILED" in v for v in verdicts(sweep))


def test_smooth_is_a_centred_rolling_mean_that_shortens_at_the_ends():
    # window 3: (1+2)/2, (1+2+3)/3, (2+3+4)/3, (3+4+10)/3, (4+10)/2
    assert smooth([1.0, 2.0, 3.0, 4.0, 10.0], 3) == pytest.approx([1.5, 2.0, 3.0, 17 / 3, 7.0])
    # window 4: one point before, two after: (1+2+3)/3, (1+2+3+4)/4, (2+3+4+10)/4, (3+4+10)/3, (4+10)/2
    assert smooth([1.0, 2.0, 3.0, 4.0, 10.0], 4) == pytest.approx([2.0, 2.5, 4.75, 17 / 3, 7.0])
    assert smooth([1.0, 5.0], 1) == [1.0, 5.0]
    assert smooth([], 5) == []
    with pytest.raises(ValueError, match="window=0 is invalid: expected an integer >= 1"):
        smooth([1.0], 0)


def test_curves_figure_draws_the_smoothed_reward_over_the_faint_raw_one():
    sweep = _sweep({("4",): [0.5, 0.6]}, keys=("G",))
    rewards = [[0.0, 1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0, 0.0]]
    for job, reward in zip(sweep.jobs, rewards):
        job.curves = {"reward": list(enumerate(reward)), "eval/accuracy": [(0, 0.5), (4, 0.6)]}
    fig = curves_figure(sweep, smooth_window=3)
    reward_ax = fig.axes[0]
    raw, smoothed = reward_ax.lines
    # mean over the two seeds per step: 0, 0.5, 0, 1, 0.5; window 3: 0.25, 1/6, 0.5, 0.5, 0.75
    assert list(raw.get_ydata()) == pytest.approx([0.0, 0.5, 0.0, 1.0, 0.5])
    assert list(smoothed.get_ydata()) == pytest.approx([0.25, 1 / 6, 0.5, 0.5, 0.75])
    assert raw.get_alpha() <= 0.35 and (smoothed.get_alpha() or 1.0) == 1.0
    assert smoothed.get_label().startswith("G=4") and raw.get_label().startswith("_")
    assert "rolling mean over 3 rollouts" in reward_ax.get_title()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_a_random_search_gets_a_marginal_line_and_no_verdict():
    # Optuna-like: every trial has its own beta, so no two G values ran at the same beta. The
    # old verdict pooled over beta: G=8 0.605 vs G=4 0.510, +0.095, 8.5x the spread: "clear".
    sweep = _sweep(
        {
            ("4", "0.01"): [0.50],
            ("8", "0.02"): [0.60],
            ("4", "0.03"): [0.52],
            ("8", "0.04"): [0.61],
        },
        seeds_swept=False,
    )
    (line,) = _lines(sweep, "G")
    assert line.startswith("G (marginal, pooled over beta): G=8 vs G=4: +0.095")
    assert line.endswith("not like with like: no verdict")


def test_report_rejects_a_smoothing_window_below_one_before_reading_anything(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_lab.cli", "report", "no_such_sweep", "--smooth-window", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--smooth-window=0 is invalid: expected an integer >= 1" in proc.stderr
    assert "no_such_sweep" not in proc.stderr  # rejected before looking the source up


def test_objective_figure_draws_each_setting_of_the_other_keys_with_its_95_intervals():
    sweep = _sweep(
        {
            ("4", "0"): [0.5, 0.6, 0.7],
            ("8", "0"): [0.6, 0.6, 0.6],
            ("4", "0.04"): [0.2, 0.3, 0.4],
            ("8", "0.04"): [0.1],
        }
    )
    fig = objective_figure(sweep, "G")
    (ax,) = fig.axes
    beta0, beta004 = ax.containers
    assert [beta0.get_label(), beta004.get_label()] == ["beta=0", "beta=0.04"]
    # means over seeds; [0.5, 0.6, 0.7] and [0.2, 0.3, 0.4]: sd 0.1, half 4.303 * 0.1 / sqrt(3) = 0.2484
    assert list(beta0.lines[0].get_ydata()) == pytest.approx([0.6, 0.6])
    assert list(beta004.lines[0].get_ydata()) == pytest.approx([0.3, 0.1])
    bars0 = [y for seg in beta0.lines[2][0].get_segments() for y in (seg[0][1], seg[1][1])]
    assert bars0 == pytest.approx([0.3516, 0.8484, 0.6, 0.6], abs=2e-4)
    bars004 = [y for seg in beta004.lines[2][0].get_segments() for y in (seg[0][1], seg[1][1])]
    assert bars004 == pytest.approx([0.0516, 0.5484, 0.1, 0.1], abs=2e-4)  # one seed: no bar
    assert "95% interval over seeds" in ax.get_title()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_runs_read_from_mlflow_are_paired_by_their_seed(tracking_uri):
    # A seeds=3 sweep as MLflow holds it: a parent run, one child per job with its swept values
    # and seed. Jobs are stored in an order that is not the seed order, so pairing must go by seed.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.create_experiment("ablation")
    parent = client.create_run(
        exp,
        tags={"grpo_lab.role": "sweep", "grpo_lab.swept_keys": '["G", "seed"]'},
    ).info.run_id
    # G=4: seeds 0,1,2 -> 0.50, 0.60, 0.55; G=8: 0.62, 0.71, 0.66. Per-seed differences
    # 0.12, 0.11, 0.11: mean 0.11333, sd 0.005774, 95% half-width 4.303 * 0.005774 / sqrt(3) = 0.01434
    jobs = [("8", 2, 0.66), ("4", 0, 0.50), ("8", 0, 0.62), ("4", 2, 0.55), ("4", 1, 0.60)]
    jobs.append(("8", 1, 0.71))
    for num, (g, seed, objective) in enumerate(jobs):
        run = client.create_run(
            exp,
            tags={
                "mlflow.parentRunId": parent,
                "grpo_lab.job_num": str(num),
                "grpo_lab.swept": json.dumps({"G": g, "seed": str(seed)}),
            },
        ).info.run_id
        client.log_param(run, "seed", seed)
        client.log_metric(run, "objective", objective)
        client.set_terminated(run)
    sweep, _, _ = load("ablation", tracking_uri)
    assert sorted((j.swept["G"], j.seed) for j in sweep.jobs) == sorted(
        (g, str(s)) for g, s, _ in jobs
    )
    (line,) = verdicts(sweep)
    assert "G=8 vs G=4: +0.113" in line and "paired over 3 seeds" in line
    assert _interval(line) == pytest.approx((0.1133 - 0.0143, 0.1133 + 0.0143), abs=6e-4)
    assert line.endswith(": clear")


def test_seeds_that_all_moved_by_the_same_amount_are_no_clear_verdict():
    # Accuracy on a small eval set is discrete: two seeds can each differ by exactly 1/8. The
    # paired interval then has zero width, which estimates no noise: the comparison falls back to
    # Welch over the seeds' spread. Welch by hand: sd 0.0884 each side, se 0.0884, df 2,
    # t 4.303: 0.125 +- 0.380, which holds 0.
    from grpo_lab.report.stats import NO_SPREAD, compare

    same_step = compare({"0": 0.625, "1": 0.5}, {"0": 0.5, "1": 0.375}, ("8", "4"))
    assert same_step.method == "Welch"
    assert (same_step.low, same_step.high) == pytest.approx(
        (0.125 - 0.3804, 0.125 + 0.3804), abs=2e-4
    )
    assert same_step.verdict == "no clear difference", same_step.text("G")
    # the same step in accuracies that are not exact in binary: the paired differences differ
    # in their last bits only (0.21 - 0.2 != 0.224 - 0.214), which is no spread either
    rounded = compare(
        {"0": 105 / 500, "1": 112 / 500, "2": 119 / 500},
        {"0": 100 / 500, "1": 107 / 500, "2": 114 / 500},
        ("8", "4"),
    )
    assert rounded.method == "Welch" and rounded.verdict == "no clear difference", rounded.text("G")
    # no spread on either side at all: nothing estimates the noise
    flat = compare({"0": 0.5, "1": 0.5}, {"0": 0.375, "1": 0.375}, ("8", "4"))
    assert flat.verdict == NO_SPREAD, flat.text("G")
