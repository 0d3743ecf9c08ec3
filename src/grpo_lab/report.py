"""``grpo-lab report``: read a sweep back from MLflow into a table, plots and verdicts.

    grpo-lab report multirun/2026-01-31/12-00-00          # a sweep folder
    grpo-lab report grpo_lab                               # an experiment: its latest sweep
    grpo-lab report grpo_lab --tracking-uri sqlite:///mlflow.db --out reports/

Writes into --out (default ``<sweep dir>/report``) and logs under ``report/`` in the sweep's
parent run:

- ``table.md`` / ``table.csv``: one row per configuration (the swept values; repeats with
  ``seeds=N`` averaged), sorted by the objective, failed jobs with status FAILED;
- ``curves.png``: reward and greedy eval accuracy against step, one line per configuration;
- ``objective_vs_<key>.png``: for each swept key the objective against its values (mean and
  standard deviation over the runs with that value, every run as a dot);
- ``verdicts.txt``: one line per swept key: the best value and its margin against the spread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grpo_lab.sweep import SWEEP_FILE, short_key

METRICS = ("eval/accuracy", "reward", "kl", "completions/mean_length", "rollout")
COLUMNS = [  # (column, what it is) after the swept keys
    ("objective", "what the sweeper maximised (train.objective), mean over seeds"),
    ("objective_std", "standard deviation of the objective over seeds"),
    ("eval_acc_final", "greedy eval accuracy after training"),
    ("eval_acc_best", "best greedy eval accuracy seen during training"),
    ("reward_final", "mean training reward of the last rollout"),
    ("kl", "KL to the reference at the last rollout"),
    ("mean_length", "mean completion length (tokens) at the last rollout"),
    ("steps", "rollouts done"),
    ("wall_s", "wall time of the run in seconds"),
]


@dataclass
class Job:
    """One run of the sweep: its swept values, summary numbers and curves."""

    num: int
    run_id: str
    name: str
    status: str
    swept: dict[str, str]
    values: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Sweep:
    parent_run_id: str | None
    experiment_id: str
    sweep_id: str
    swept_keys: list[str]
    objective_name: str
    jobs: list[Job]


# --------------------------------------------------------------------------- reading


def _abs_sqlite(uri: str, base: Path) -> str:
    """A relative ``sqlite:///mlflow.db`` as seen from ``base`` (where the sweep was started)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((base / uri[len(prefix) :]).resolve())
    return uri


def _num(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def _sort_values(values: list[str]) -> list[str]:
    """Numeric values in numeric order, others in text order."""
    if all(_num(v) is not None for v in values):
        return sorted(values, key=lambda v: float(v))
    return sorted(values)


def _job_from_run(client: Any, run: Any, swept: dict[str, str]) -> Job:
    hist = {
        k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
        for k in METRICS
    }
    m = run.data.metrics
    acc = [v for _, v in hist["eval/accuracy"]]
    last = {k: (h[-1][1] if h else math.nan) for k, h in hist.items()}
    final_acc = m.get("eval/accuracy_final", last["eval/accuracy"])
    failed = run.info.status == "FAILED"
    end = run.info.end_time or run.info.start_time
    values = {
        "objective": math.nan if failed else m.get("objective", final_acc),
        "eval_acc_final": math.nan if failed else final_acc,
        "eval_acc_best": max(acc) if acc else math.nan,
        "reward_final": last["reward"],
        "kl": last["kl"],
        "mean_length": last["completions/mean_length"],
        "steps": last["rollout"],
        "wall_s": (end - run.info.start_time) / 1000,
    }
    return Job(
        num=int(run.data.tags.get("grpo_lab.job_num", "-1")),
        run_id=run.info.run_id,
        name=run.info.run_name,
        status=run.info.status,
        swept=swept,
        values=values,
        curves={"reward": hist["reward"], "eval/accuracy": hist["eval/accuracy"]},
    )


def load(source: str, tracking_uri: str | None = None) -> tuple[Sweep, Path | None, str]:
    """The sweep in folder ``source`` (a multirun dir) or the latest sweep of experiment ``source``.

    Returns (sweep, sweep dir or None, tracking URI used).
    """
    from mlflow import MlflowClient

    path = Path(source)
    sweep_dir: Path | None = None
    if path.is_dir():
        info_file = path / SWEEP_FILE
        if not info_file.is_file():
            raise SystemExit(
                f"grpo-lab report: {source} has no {SWEEP_FILE}: give a folder made by "
                "`grpo-lab train -m ...` (multirun/<date>/<time>) or an MLflow experiment name"
            )
        info = json.loads(info_file.read_text())
        sweep_dir = path.resolve()
        uri = (
            tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or _abs_sqlite(info["tracking_uri"], sweep_dir.parents[2])
        )
        parent_id, exp_id = info["parent_run_id"], info["experiment_id"]
    else:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(source)
        if exp is None:
            raise SystemExit(
                f"grpo-lab report: {source!r} is neither a sweep folder nor an experiment in {uri} "
                "(give multirun/<date>/<time>, or an experiment name with --tracking-uri)"
            )
        exp_id = exp.experiment_id
        parents = MlflowClient(tracking_uri=uri).search_runs(
            [exp_id],
            filter_string="tags.`grpo_lab.role` = 'sweep'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not parents:
            raise SystemExit(
                f"grpo-lab report: experiment {source!r} in {uri} has no sweep (run grpo-lab train -m ...)"
            )
        parent_id = parents[0].info.run_id
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    keys = json.loads(parent.data.tags.get("grpo_lab.swept_keys", "[]"))
    if sweep_dir is None and parent.data.tags.get("grpo_lab.sweep_dir"):
        sweep_dir = Path(parent.data.tags["grpo_lab.sweep_dir"])
        sweep_dir = sweep_dir if sweep_dir.is_dir() else None
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000
    )
    jobs = []
    for run in runs:
        swept = json.loads(run.data.tags.get("grpo_lab.swept", "{}"))
        overrides_file = None
        if sweep_dir is not None and "grpo_lab.job_num" in run.data.tags:
            overrides_file = (
                sweep_dir / run.data.tags["grpo_lab.job_num"] / ".hydra" / "overrides.yaml"
            )
        if (
            overrides_file is not None and overrides_file.is_file()
        ):  # what Hydra ran, as the job saw it
            given = dict(
                o.lstrip("+~").split("=", 1) for o in yaml.safe_load(overrides_file.read_text())
            )
            swept = {k: str(given[k]) for k in keys if k in given}
        jobs.append(_job_from_run(client, run, swept))
    jobs.sort(key=lambda j: j.num)
    sweep = Sweep(
        parent_id,
        exp_id,
        parent.data.tags.get("grpo_lab.sweep_id", parent_id),
        keys,
        parent.data.tags.get("grpo_lab.objective") or "eval/accuracy",
        jobs,
    )
    return sweep, sweep_dir, uri


# --------------------------------------------------------------------------- tables


def config_keys(sweep: Sweep) -> list[str]:
    """Swept keys that define a configuration (``seed`` only repeats one)."""
    return [k for k in sweep.swept_keys if k != "seed"]


def label(swept: dict[str, str], keys: list[str]) -> str:
    from grpo_lab.sweep import short_value

    return (
        " ".join(f"{short_key(k)}={short_value(swept[k])}" for k in keys if k in swept) or "default"
    )


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def groups(sweep: Sweep) -> dict[tuple[str, ...], list[Job]]:
    keys = config_keys(sweep)
    out: dict[tuple[str, ...], list[Job]] = {}
    for job in sweep.jobs:
        out.setdefault(tuple(job.swept.get(k, "") for k in keys), []).append(job)
    return out


def table(sweep: Sweep):
    """One row per configuration, sorted by the objective (best first, failures last)."""
    import pandas as pd

    keys = config_keys(sweep)
    rows = []
    for values, jobs in groups(sweep).items():
        row: dict[str, Any] = dict(zip(keys, values))
        row["config"] = label(jobs[0].swept, keys)
        row["seeds"] = len(jobs)
        for col, _ in COLUMNS:
            if col != "objective_std":
                row[col] = _mean([j.values[col] for j in jobs])
        row["objective_std"] = _std([j.values["objective"] for j in jobs])
        failed = sum(j.status == "FAILED" for j in jobs)
        row["status"] = (
            "FAILED"
            if failed == len(jobs)
            else f"{failed}/{len(jobs)} FAILED"
            if failed
            else "FINISHED"
            if all(j.status == "FINISHED" for j in jobs)
            else "/".join(sorted({j.status for j in jobs}))
        )
        row["runs"] = ", ".join(j.run_id[:8] for j in jobs)
        rows.append(row)
    df = pd.DataFrame(
        rows, columns=[*keys, "config", "seeds", *(c for c, _ in COLUMNS), "status", "runs"]
    )
    return df.sort_values(
        "objective", ascending=False, na_position="last", kind="stable"
    ).reset_index(drop=True)


def to_markdown(df, objective_name: str) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "—" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cols = [c for c in df.columns if c != "runs"]
    lines = [
        f"Objective: `{objective_name}` (higher is better); one row per configuration, mean over seeds.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(cell(row[c]) for c in cols) + " |")
    lines += ["", *(f"- `{c}`: {what}" for c, what in COLUMNS)]
    return "\n".join(lines) + "\n"


def verdicts(sweep: Sweep) -> list[str]:
    """Per swept key: the value with the best mean objective, its margin and the spread.

    The spread is the pooled standard deviation of the objective among runs sharing a value
    (over seeds and the other swept keys); a margin under it is within noise.
    """
    out = []
    for key in config_keys(sweep):
        by_value: dict[str, list[float]] = {}
        for job in sweep.jobs:
            if key in job.swept and not math.isnan(job.values["objective"]):
                by_value.setdefault(job.swept[key], []).append(job.values["objective"])
        name = short_key(key)
        all_failed = sorted({j.swept[key] for j in sweep.jobs if key in j.swept} - set(by_value))
        failed_note = (
            f" ({', '.join(f'{name}={v}' for v in all_failed)}: every run FAILED)"
            if all_failed
            else ""
        )
        if len(by_value) < 2:
            out.append(f"{key}: fewer than two values finished; nothing to compare{failed_note}")
            continue
        means = {v: _mean(xs) for v, xs in by_value.items()}
        ranked = sorted(means, key=lambda v: means[v], reverse=True)
        best, second = ranked[0], ranked[1]
        gap = means[best] - means[second]
        variances = [_std(xs) ** 2 for xs in by_value.values() if len(xs) > 1]
        spread = math.sqrt(sum(variances) / len(variances)) if variances else math.nan
        head = (
            f"{key}: best {name}={best} (objective {means[best]:.4g}, {len(by_value[best])} runs) vs "
            f"{name}={second} ({means[second]:.4g}): {gap:+.4g}{failed_note}"
        )
        if gap == 0:
            out.append(f"{head}; no difference")
        elif math.isnan(spread):
            out.append(f"{head}; one run per value, no spread to judge it by (repeat with seeds=3)")
        elif spread == 0:
            out.append(f"{head}; runs with the same value agree exactly (spread 0)")
        else:
            ratio = gap / spread
            word = "clear" if ratio >= 2 else "likely" if ratio >= 1 else "within noise"
            out.append(f"{head}, {ratio:.2g}x the spread {spread:.3g}: {word}")
    return out


# --------------------------------------------------------------------------- plots


def _mean_curve(
    curves: list[list[tuple[int, float]]],
) -> tuple[list[int], list[float], list[float], list[float]]:
    by_step: dict[int, list[float]] = {}
    for c in curves:
        for s, v in c:
            by_step.setdefault(s, []).append(v)
    steps = sorted(by_step)
    return (
        steps,
        [sum(by_step[s]) / len(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def plot_curves(sweep: Sweep, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = config_keys(sweep)
    grouped = [(label(jobs[0].swept, keys), jobs) for jobs in groups(sweep).values()]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab10" if len(grouped) <= 10 else "tab20")
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]  # identical curves stay visible
    for i, (name, jobs) in enumerate(grouped):
        failed = all(j.status == "FAILED" for j in jobs)
        seeds = f" ({len(jobs)} seeds)" if len(jobs) > 1 else ""
        for ax, metric in zip(axes, ("reward", "eval/accuracy")):
            steps, mean, lo, hi = _mean_curve([j.curves[metric] for j in jobs])
            if not steps:
                ax.plot(
                    [], [], color=colors(i), label=f"{name}{seeds} [FAILED]" if failed else name
                )
                continue
            ls, mk = styles[i % len(styles)]
            ax.plot(steps, mean, ls=ls, marker=mk, ms=4, color=colors(i), label=f"{name}{seeds}")
            if len(jobs) > 1:
                ax.fill_between(steps, lo, hi, color=colors(i), alpha=0.08)
    axes[0].set(
        title="training reward (mean of each rollout)",
        xlabel="rollout (GRPO step)",
        ylabel="reward",
    )
    axes[1].set(
        title="greedy eval accuracy (held-out prompts)",
        xlabel="rollout (GRPO step)",
        ylabel="eval accuracy",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(title="configuration", fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(
        f"sweep {sweep.sweep_id}: one line per configuration"
        + (" (band: min-max over seeds)" if any(len(j) > 1 for _, j in grouped) else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_objective(sweep: Sweep, key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_value: dict[str, list[float]] = {}
    for job in sweep.jobs:
        if key in job.swept:
            by_value.setdefault(job.swept[key], []).append(job.values["objective"])
    values = _sort_values(list(by_value))
    xs = list(range(len(values)))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for x, v in zip(xs, values):
        ok = [y for y in by_value[v] if not math.isnan(y)]
        jitter = [x + 0.06 * (i - (len(ok) - 1) / 2) for i in range(len(ok))]
        ax.scatter(jitter, ok, color="0.55", s=18, zorder=2, label="one run" if x == 0 else None)
        n_failed = len(by_value[v]) - len(ok)
        if n_failed:
            ax.annotate(
                f"{n_failed} run{'s' * (n_failed > 1)}\nFAILED",
                (x, 0.5),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="center",
                color="tab:red",
                fontsize=10,
                fontweight="bold",
            )
    means = [_mean(by_value[v]) for v in values]
    stds = [_std(by_value[v]) for v in values]
    ax.errorbar(
        xs,
        means,
        yerr=[0 if math.isnan(s) else s for s in stds],
        color="tab:blue",
        marker="s",
        capsize=5,
        lw=2,
        zorder=3,
        label="mean ± std",
    )
    ax.set_xticks(xs, values)
    ax.set(
        xlabel=key,
        ylabel=f"objective ({sweep.objective_name})",
        title=f"{sweep.objective_name} against {key}\n(each value pooled over the other swept keys and seeds)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the command


def write_report(sweep: Sweep, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    df = table(sweep)
    files = {
        "table.csv": out / "table.csv",
        "table.md": out / "table.md",
        "curves.png": out / "curves.png",
        "verdicts.txt": out / "verdicts.txt",
    }
    df.to_csv(files["table.csv"], index=False)
    lines = verdicts(sweep)
    files["table.md"].write_text(
        f"# Sweep {sweep.sweep_id}\n\n"
        + to_markdown(df, sweep.objective_name)
        + "\n## Verdicts\n\n"
        + "".join(f"- {v}\n" for v in lines)
    )
    files["verdicts.txt"].write_text("\n".join(lines) + "\n")
    plot_curves(sweep, files["curves.png"])
    for key in config_keys(sweep):
        name = f"objective_vs_{key.replace('/', '_')}.png"
        files[name] = out / name
        plot_objective(sweep, key, files[name])
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="grpo-lab report",
        description="Tables, plots and verdicts of a sweep, logged to its MLflow parent run.",
    )
    parser.add_argument(
        "source", help="a sweep folder (multirun/<date>/<time>) or an MLflow experiment name"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else the sweep's, else sqlite:///mlflow.db)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: <sweep dir>/report)")
    args = parser.parse_args(argv)

    sweep, sweep_dir, uri = load(args.source, args.tracking_uri)
    if not sweep.jobs:
        raise SystemExit(f"grpo-lab report: sweep {sweep.sweep_id} has no job runs in {uri}")
    out = (
        Path(args.out)
        if args.out
        else (sweep_dir / "report" if sweep_dir else Path("reports") / sweep.sweep_id)
    )
    files = write_report(sweep, out)
    if sweep.parent_run_id:
        from mlflow import MlflowClient

        from grpo_lab.tracking import retry_locked

        client = MlflowClient(tracking_uri=uri)
        retry_locked(
            lambda: client.log_artifacts(sweep.parent_run_id, str(out), artifact_path="report")
        )
    print((out / "table.md").read_text())
    print(f"[grpo-lab] report of {len(sweep.jobs)} runs in {out}: " + ", ".join(sorted(files)))
    if sweep.parent_run_id:
        print(f"[grpo-lab] logged under report/ in MLflow run {sweep.parent_run_id}")
