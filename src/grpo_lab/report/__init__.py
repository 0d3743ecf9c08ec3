"""``grpo-lab report``: read a sweep back from MLflow into a table, plots and verdicts.

    grpo-lab report multirun/2026-01-31/12-00-00          # a sweep folder
    grpo-lab report grpo_lab                               # an experiment: its latest sweep
    grpo-lab report grpo_lab --tracking-uri sqlite:///mlflow.db --out reports/
    grpo-lab report multirun/2026-01-31/12-00-00 --smooth-window 51

Writes into --out (default ``<sweep dir>/report``) and logs under ``report/`` in the sweep's
parent run:

- ``table.md`` / ``table.csv``: one row per configuration (the swept values; repeats with
  ``seeds=N`` averaged, with a 95% t-interval), sorted by the objective, failed jobs FAILED;
- ``curves.png``: reward (raw faint, rolling mean bold) and greedy eval accuracy against
  step, one colour per configuration;
- ``objective_vs_<key>.png``: for each swept key the objective against its values (mean and
  standard deviation over the runs with that value, every run as a dot);
- ``verdicts.txt``: per swept key and per setting of the other swept keys, the best value
  against each other value: the difference, its 95% interval over seeds (paired by seed, or
  Welch) and "clear" only when that interval excludes 0 (rules in ``stats.py``); then a
  ``data:`` line per dataset context and seed where the arms' MLflow dataset digests differ
  (also the Data section of ``table.md``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from grpo_lab.report.load import Job, Sweep, load
from grpo_lab.report.plots import SMOOTH_WINDOW, plot_curves, plot_objective
from grpo_lab.report.stats import COLUMNS, config_keys, data_differences, table, verdicts

__all__ = ["Job", "Sweep", "data_differences", "load", "main", "table", "verdicts", "write_report"]


def to_markdown(df, objective_name: str) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "—" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cols = [c for c in df.columns if c != "runs"]
    lines = [
        f"Objective: `{objective_name}` (higher is better); one row per configuration, mean over "
        "seeds with its 95% t-interval.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(cell(row[c]) for c in cols) + " |")
    lines += ["", *(f"- `{c}`: {what}" for c, what in COLUMNS)]
    return "\n".join(lines) + "\n"


def data_summary(sweep: Sweep, differences: list[str]) -> str:
    """The table's Data section: where the arms' datasets (MLflow digests) differ, or that they
    do not."""
    if differences:
        return "".join(f"- {line}\n" for line in differences)
    if not any(job.data for job in sweep.jobs):
        return "The runs logged no datasets (runs from before grpo_lab logged them).\n"
    return "Every arm trained and scored on the same data (the same MLflow dataset digests, seed by seed).\n"


def write_report(sweep: Sweep, out: Path, smooth_window: int = SMOOTH_WINDOW) -> dict[str, Path]:
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
    # A verdict between arms that trained or scored on different data compares more than the key.
    data = data_differences(sweep)
    files["table.md"].write_text(
        f"# Sweep {sweep.sweep_id}\n\n"
        + to_markdown(df, sweep.objective_name)
        + "\n## Verdicts\n\n"
        + "Each key's best value against each other value, with the other swept keys held fixed, "
        + "over seeds (paired by seed when both sides ran the same seeds, else Welch). "
        + "`clear`: the 95% interval of the difference excludes 0.\n\n"
        + "".join(f"- {v}\n" for v in lines)
        + "\n## Data\n\n"
        + data_summary(sweep, data)
    )
    files["verdicts.txt"].write_text("\n".join(lines + data) + "\n")
    plot_curves(sweep, files["curves.png"], smooth_window)
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
        "source", help="a sweep folder (multirun/<date>/<time>-<id>) or an MLflow experiment name"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else the sweep's, else sqlite:///mlflow.db)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: <sweep dir>/report)")
    parser.add_argument(
        "--smooth-window",
        type=int,
        default=SMOOTH_WINDOW,
        metavar="N",
        help=f"rollouts in the rolling mean drawn over the raw training reward (default {SMOOTH_WINDOW}; 1: none)",
    )
    args = parser.parse_args(argv)
    if args.smooth_window < 1:
        parser.error(
            f"--smooth-window={args.smooth_window} is invalid: expected an integer >= 1 "
            "(rollouts in the reward curve's rolling mean; 1 draws the raw curve only)"
        )

    sweep, sweep_dir, uri = load(args.source, args.tracking_uri)
    if not sweep.jobs:
        raise SystemExit(f"grpo-lab report: sweep {sweep.sweep_id} has no job runs in {uri}")
    out = (
        Path(args.out)
        if args.out
        else (sweep_dir / "report" if sweep_dir else Path("reports") / sweep.sweep_id)
    )
    files = write_report(sweep, out, args.smooth_window)
    if sweep.parent_run_id:
        from grpo_lab import store

        store.client(uri).log_artifacts(sweep.parent_run_id, str(out), artifact_path="report")
    print((out / "table.md").read_text())
    print(f"[grpo-lab] report of {len(sweep.jobs)} runs in {out}: " + ", ".join(sorted(files)))
    if sweep.parent_run_id:
        print(f"[grpo-lab] logged under report/ in MLflow run {sweep.parent_run_id}")
