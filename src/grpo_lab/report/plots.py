"""The report's figures: curves per configuration and the objective against each swept key."""

from __future__ import annotations

import math
from pathlib import Path

from grpo_lab.report.load import Sweep
from grpo_lab.report.stats import (
    by_seed,
    config_keys,
    finished_objectives,
    groups,
    label,
    settings_of_others,
    smooth,
    t_interval,
)
from grpo_lab.sweep.naming import short_key, short_value


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


SMOOTH_WINDOW = 25  # rollouts in the reward curve's rolling mean (grpo-lab report --smooth-window)


def curves_figure(sweep: Sweep, smooth_window: int = SMOOTH_WINDOW):
    """Reward and eval accuracy against rollout, one colour per configuration (mean over seeds).

    The training reward of one rollout is the mean of B*G sampled completions, noisy from step
    to step: it is drawn faint, with its centred rolling mean over ``smooth_window`` rollouts
    on top. Eval accuracy is greedy on fixed prompts, drawn as it is.
    """
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
            if len(jobs) > 1:
                ax.fill_between(steps, lo, hi, color=colors(i), alpha=0.08)
            if metric == "reward":
                ax.plot(steps, mean, color=colors(i), lw=0.8, alpha=0.3)
                mean = smooth(mean, smooth_window)
            ax.plot(
                steps,
                mean,
                ls=ls,
                marker=mk,
                ms=4,
                markevery=max(1, len(steps) // 12),
                lw=1.8,
                color=colors(i),
                label=f"{name}{seeds}",
            )
    axes[0].set(
        title=f"training reward (faint: each rollout; bold: rolling mean over {smooth_window} rollouts)",
        xlabel="rollout (GRPO step)",
        ylabel="reward",
    )
    axes[1].set(
        title="greedy eval accuracy (held-out prompts)",
        xlabel="rollout (GRPO step)",
        ylabel="eval accuracy",
    )
    axes[0].title.set_fontsize(10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(title="configuration", fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(
        f"sweep {sweep.sweep_id}: one colour per configuration"
        + (" (band: min-max over seeds)" if any(len(j) > 1 for _, j in grouped) else "")
    )
    fig.tight_layout()
    return fig


def plot_curves(sweep: Sweep, path: Path, smooth_window: int = SMOOTH_WINDOW) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(sweep, smooth_window)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def objective_figure(sweep: Sweep, key: str):
    """The objective against ``key``'s values, one line per setting of the other swept keys.

    Each point is a configuration's mean over seeds with its 95% t-interval as the bar (none
    with one seed), every run a faint dot: values are compared like with like, as the verdicts
    compare them, rather than pooled over the other keys.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others, settings = settings_of_others(sweep, key)
    values = _sort_values(list({v for by_value in settings.values() for v in by_value}))
    x_of = {v: x for x, v in enumerate(values)}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.get_cmap("tab10" if len(settings) <= 10 else "tab20")
    width = min(0.3, 0.08 * (len(settings) - 1))  # settings side by side around each tick
    for i, (setting, by_value) in enumerate(settings.items()):
        shift = width * (i / (len(settings) - 1) - 0.5) if len(settings) > 1 else 0.0
        present = [v for v in values if v in by_value and by_seed(by_value[v])]
        stats = [t_interval(list(by_seed(by_value[v]).values())) for v in present]
        xs = [x_of[v] + shift for v in present]
        name = " ".join(f"{short_key(k)}={short_value(v)}" for k, v in zip(others, setting))
        for x, v in zip(xs, present):
            runs = finished_objectives(by_value[v])
            ax.scatter([x] * len(runs), runs, color=colors(i), s=12, alpha=0.35, zorder=2)
        ax.errorbar(
            xs,
            [m for m, _, _ in stats],
            yerr=[
                [0.0 if math.isnan(lo) else m - lo for m, lo, _ in stats],
                [0.0 if math.isnan(hi) else hi - m for m, _, hi in stats],
            ],
            color=colors(i),
            marker="s",
            capsize=4,
            lw=1.8,
            zorder=3,
            label=name or "all runs",
        )
    for v in values:
        jobs = [j for by_value in settings.values() for j in by_value.get(v, [])]
        n_failed = len(jobs) - len(finished_objectives(jobs))
        if n_failed:
            ax.annotate(
                f"{n_failed} run{'s' * (n_failed > 1)}\nFAILED",
                (x_of[v], 0.5),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="center",
                color="tab:red",
                fontsize=10,
                fontweight="bold",
            )
    ax.set_xticks(range(len(values)), values)
    ax.set(
        xlabel=key,
        ylabel=f"objective ({sweep.objective_name})",
        title=f"{sweep.objective_name} against {key}\n(mean and 95% interval over seeds; "
        + (f"one line per {', '.join(short_key(k) for k in others)})" if others else "dots: runs)"),
    )
    ax.grid(alpha=0.3)
    if len(settings) <= 12:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


def plot_objective(sweep: Sweep, key: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = objective_figure(sweep, key)
    fig.savefig(path, dpi=110)
    plt.close(fig)
