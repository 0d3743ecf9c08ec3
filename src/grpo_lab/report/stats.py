"""Statistics of a sweep: per-configuration intervals over seeds, and like-with-like verdicts.

A verdict compares two values of one swept key while every other swept key is held fixed
(within each setting of the others), over seed replicates: paired by seed when both sides ran
the same seeds, else Welch's unpaired interval. It says "clear" only when the 95% interval of
the difference excludes 0; one seed per side gives no noise estimate, and so no verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from grpo_lab.report.load import Job, Sweep
from grpo_lab.sweep.naming import short_key, short_value

COLUMNS = [  # (column, what it is) after the swept keys
    ("seeds", "seeds with a finished run: the n behind the mean and its interval"),
    ("objective", "what the sweeper maximised (train.objective), mean over seeds"),
    ("objective_std", "standard deviation of the objective over seeds"),
    ("objective_ci_low", "95% t-interval of that mean over seeds, lower end (empty with one seed)"),
    ("objective_ci_high", "95% t-interval of that mean over seeds, upper end"),
    ("eval_acc_final", "greedy eval accuracy after training"),
    ("eval_acc_best", "best greedy eval accuracy seen during training"),
    ("reward_final", "mean training reward of the last rollout"),
    ("kl", "KL to the reference at the last rollout"),
    ("mean_length", "mean completion length (tokens) at the last rollout"),
    ("steps", "rollouts done"),
    ("wall_s", "wall time of the run in seconds"),
]
OBJECTIVE_STATS = {"seeds", "objective", "objective_std", "objective_ci_low", "objective_ci_high"}
CONFIDENCE = 0.95
NO_SPREAD = "no spread over seeds: no noise estimate, rerun with more seeds"
RERUN = "one seed: no noise estimate, rerun with seeds=3"


# --------------------------------------------------------------------------- pure statistics


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def t_quantile(df: float) -> float:
    """t_{0.975, df}: the two-sided 95% quantile of Student's t (scipy comes with mlflow)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + CONFIDENCE / 2, df))


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): mean -+ t_{0.975, n-1} * sd / sqrt(n); low = high = NaN for n < 2."""
    m, sd, n = _mean(xs), _std(xs), len(xs)
    if n < 2:
        return m, math.nan, math.nan
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return m, m - half, m + half


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): Welch's unpaired 95% interval, each side n >= 2.

    se^2 = s_a^2/n_a + s_b^2/n_b; df by Welch-Satterthwaite:
    se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)).
    """
    diff = _mean(a) - _mean(b)
    va, vb = _std(a) ** 2 / len(a), _std(b) ** 2 / len(b)
    if va + vb == 0:  # no spread on either side: the difference is exact, df undefined
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(df) * math.sqrt(va + vb)
    return diff, diff - half, diff + half


def smooth(values: list[float], window: int) -> list[float]:
    """Centred rolling mean: point i averages values[i - (w-1)//2 : i + w//2 + 1] that exist.

    The window shortens at both ends rather than padding, so the curve keeps its length and
    has no lag; window 1 is the raw curve.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(
            f"window={window!r} is invalid: expected an integer >= 1 (points in the rolling mean)"
        )
    before, after = (window - 1) // 2, window // 2
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - before) : i + after + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def negligible(diff: float, *levels: float) -> bool:
    """A difference at float32 rounding level of the values compared (a 1.5e-08 "effect")."""
    return abs(diff) <= 1e-6 * max(1.0, *(abs(x) for x in levels))


def decimals(half_width: float) -> int:
    """Decimals that show an interval's half-width to 2 significant digits (3 to 6)."""
    if not math.isfinite(half_width) or half_width <= 0:
        return 3
    return min(6, max(3, 1 - math.floor(math.log10(half_width))))


@dataclass
class Comparison:
    """Value ``best`` against value ``other`` of one key, the other swept keys fixed."""

    best: str
    other: str
    n_best: int  # seeds with a finished run
    n_other: int
    mean_best: float  # mean objective over seeds
    mean_other: float
    diff: float  # mean(best) - mean(other) (paired: the mean of the per-seed differences)
    low: float  # 95% interval of diff; NaN with one seed on either side
    high: float
    method: str  # "paired", "Welch" or "one seed"

    @property
    def verdict(self) -> str:
        if self.method == "one seed":
            return RERUN
        if self.high - self.low <= 1e-9 * max(1.0, abs(self.diff)) and not self.negligible:
            # Every seed moved by exactly the same amount (discrete accuracies on a few seeds do):
            # a zero-width interval is no evidence of an effect's size, only of too few seeds.
            return NO_SPREAD
        excludes_zero = self.low > 0 or self.high < 0
        return "clear" if excludes_zero and not self.negligible else "no clear difference"

    @property
    def negligible(self) -> bool:
        return negligible(self.diff, self.mean_best, self.mean_other)

    def text(self, name: str) -> str:
        head = f"{name}={self.best} vs {name}={self.other}"
        if self.method == "one seed":
            seeds = (
                "1 seed each"
                if self.n_best == self.n_other == 1
                else f"{self.n_best} vs {self.n_other} seeds"
            )
            return f"{head}: {self.diff:+.3f} ({seeds}); {self.verdict}"
        half = (self.high - self.low) / 2
        d = decimals(0.0 if negligible(half, self.mean_best, self.mean_other) else half)
        how = (
            f"paired over {self.n_best} seeds"
            if self.method == "paired"
            else f"Welch, {self.n_best} vs {self.n_other} seeds"
        )
        return (
            f"{head}: {self.diff:+.{d}f} [{self.low:+.{d}f}, {self.high:+.{d}f}] "
            f"({CONFIDENCE:.0%} CI, {how}): {self.verdict}"
        )


def _all_equal(values: list[float]) -> bool:
    """True when the values differ by float rounding at most (0.21-0.2 vs 0.224-0.214 do)."""
    scale = max(1.0, *(abs(v) for v in values))
    return max(values) - min(values) <= 1e-9 * scale


def compare(best: dict[str, float], other: dict[str, float], names: tuple[str, str]) -> Comparison:
    """Compare objectives by seed (``{seed: objective}``): paired when the seeds match (and their
    differences vary), else Welch."""
    a, b = list(best.values()), list(other.values())
    if len(a) < 2 or len(b) < 2:
        diff, low, high, method = _mean(a) - _mean(b), math.nan, math.nan, "one seed"
    elif set(best) == set(other) and not _all_equal([best[s] - other[s] for s in best]):
        diff, low, high = t_interval([best[s] - other[s] for s in best])
        method = "paired"
    else:
        # Unpaired also when every seed moved by exactly the same amount (discrete accuracies
        # on few seeds do): a zero-width paired interval estimates no noise, the seeds' spread does.
        (diff, low, high), method = welch_interval(a, b), "Welch"
    return Comparison(*names, len(a), len(b), _mean(a), _mean(b), diff, low, high, method)


# --------------------------------------------------------------------------- a sweep's statistics


def config_keys(sweep: Sweep) -> list[str]:
    """Swept keys that define a configuration (``seed`` only repeats one)."""
    return [k for k in sweep.swept_keys if k != "seed"]


def label(swept: dict[str, str], keys: list[str]) -> str:
    return (
        " ".join(f"{short_key(k)}={short_value(swept[k])}" for k in keys if k in swept) or "default"
    )


def data_differences(sweep: Sweep) -> list[str]:
    """One line per dataset context and seed in which the arms did not all use the same data
    (the MLflow dataset digests of ``tracking.log_datasets``); empty when they did.

    Runs are compared seed by seed: a task whose split depends on the seed gives each seed its
    own data, in every arm alike. Runs that logged no dataset are left out.
    """
    keys = config_keys(sweep)
    contexts = sorted(
        {c for job in sweep.jobs for c in job.data}, key=lambda c: (c != "training", c)
    )
    lines = []
    for context in contexts:
        seeds = sorted({str(j.seed) for j in sweep.jobs if context in j.data})
        for seed in seeds:
            arms: dict[tuple[str, str], set[str]] = {}
            for job in sweep.jobs:
                if context in job.data and str(job.seed) == seed:
                    arms.setdefault(job.data[context], set()).add(label(job.swept, keys))
            if len(arms) > 1:
                parts = "; ".join(
                    f"{name} (digest {digest}) in {', '.join(sorted(labels))}"
                    for (name, digest), labels in sorted(arms.items())
                )
                lines.append(f"data: the arms' {context} data differ (seed {seed}): {parts}")
    return lines


def groups(sweep: Sweep) -> dict[tuple[str, ...], list[Job]]:
    keys = config_keys(sweep)
    out: dict[tuple[str, ...], list[Job]] = {}
    for job in sweep.jobs:
        out.setdefault(tuple(job.swept.get(k, "") for k in keys), []).append(job)
    return out


def by_seed(jobs: list[Job]) -> dict[str, float]:
    """The objective of each seed's finished runs (their mean if a seed ran twice).

    A run whose seed is unknown counts as its own seed, so it is never paired.
    """
    runs: dict[str, list[float]] = {}
    for job in jobs:
        if _finished(job):
            seed = job.seed or job.swept.get("seed") or f"run {job.run_id}"
            runs.setdefault(seed, []).append(job.values["objective"])
    return {seed: _mean(xs) for seed, xs in runs.items()}


def finished_objectives(jobs: list[Job]) -> list[float]:
    """The objectives of the finished runs, one per run."""
    return [j.values["objective"] for j in jobs if _finished(j)]


def _finished(job: Job) -> bool:
    return job.status != "FAILED" and not math.isnan(job.values["objective"])


def table(sweep: Sweep):
    """One row per configuration, sorted by the objective (best first, failures last)."""
    import pandas as pd

    keys = config_keys(sweep)
    rows = []
    for values, jobs in groups(sweep).items():
        row: dict[str, Any] = dict(zip(keys, values))
        row["config"] = label(jobs[0].swept, keys)
        objectives = list(by_seed(jobs).values())
        mean, low, high = t_interval(objectives)
        row |= {
            "seeds": len(objectives),
            "objective": mean,
            "objective_std": _std(objectives),
            "objective_ci_low": low,
            "objective_ci_high": high,
        }
        for col, _ in COLUMNS:
            if col not in OBJECTIVE_STATS:
                row[col] = _mean([j.values[col] for j in jobs])
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
    df = pd.DataFrame(rows, columns=[*keys, "config", *(c for c, _ in COLUMNS), "status", "runs"])
    return df.sort_values(
        "objective", ascending=False, na_position="last", kind="stable"
    ).reset_index(drop=True)


def settings_of_others(
    sweep: Sweep, key: str
) -> tuple[list[str], dict[tuple[str, ...], dict[str, list[Job]]]]:
    """The other swept keys, and the jobs by their setting of those keys, then by ``key``'s value.

    Jobs within one setting differ only in ``key`` (and seed): they compare like with like.
    """
    others = [k for k in config_keys(sweep) if k != key]
    settings: dict[tuple[str, ...], dict[str, list[Job]]] = {}
    for job in sweep.jobs:
        if key in job.swept:
            setting = tuple(job.swept.get(k, "") for k in others)
            settings.setdefault(setting, {}).setdefault(job.swept[key], []).append(job)
    return others, settings


def verdicts(sweep: Sweep) -> list[str]:
    """Lines comparing the values of each swept key, like with like, over seeds.

    Per key and per setting of the other swept keys (a line starting ``G at beta=0:``), the
    best value against each other value. A key no two of whose values ran at the same setting
    of the others (a random search) gets one marginal line, pooled over them, and no verdict.
    """
    out = []
    for key in config_keys(sweep):
        name = short_key(key)
        others, strata = settings_of_others(sweep, key)
        pooled: dict[str, list[float]] = {}  # each value's objectives over all settings
        for by_value in strata.values():
            for value, jobs in by_value.items():
                pooled.setdefault(value, []).extend(finished_objectives(jobs))
        failed = [v for v, objectives in pooled.items() if not objectives]
        if failed:
            out.append(f"{key}: " + ", ".join(f"{name}={v}" for v in failed) + ": every run FAILED")
        if len(pooled) < 2:
            out.append(f"{key}: one value ({name}={next(iter(pooled))}); nothing to compare")
            continue
        if len(pooled) - len(failed) < 2:
            out.append(f"{key}: fewer than two values finished; nothing to compare")
            continue
        compared = False
        for setting, by_value in strata.items():
            finished = {v: by_seed(jobs) for v, jobs in by_value.items()}
            finished = {v: seeds for v, seeds in finished.items() if seeds}
            if len(finished) < 2:
                continue
            compared = True
            where = " ".join(f"{short_key(k)}={short_value(v)}" for k, v in zip(others, setting))
            head = f"{key} at {where}" if where else key
            out += [f"{head}: {c.text(name)}" for c in _best_against_each(finished)]
        if not compared:
            means = {v: _mean(objectives) for v, objectives in pooled.items() if objectives}
            best, *rest = sorted(means, key=lambda v: means[v], reverse=True)
            pooled_over = ", ".join(short_key(k) for k in others)
            out += [
                f"{key} (marginal, pooled over {pooled_over}): {name}={best} vs {name}={v}: "
                f"{means[best] - means[v]:+.3f}; no two values ran at the same {pooled_over}, "
                "so this is not like with like: no verdict"
                for v in rest
            ]
    return out


def _best_against_each(finished: dict[str, dict[str, float]]) -> list[Comparison]:
    means = {v: _mean(list(seeds.values())) for v, seeds in finished.items()}
    best, *rest = sorted(means, key=lambda v: means[v], reverse=True)
    return [compare(finished[best], finished[v], (best, v)) for v in rest]
