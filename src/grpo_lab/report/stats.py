"""Statistics of a sweep: configurations, the per-configuration table and the verdicts."""

from __future__ import annotations

import math
from typing import Any

from grpo_lab.report.load import Job, Sweep
from grpo_lab.sweep import short_key

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
