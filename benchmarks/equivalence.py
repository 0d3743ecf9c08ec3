"""Before/after: does a refactor log the same numbers? Runs `grpo-lab train` for every option of
the config in two source trees and compares every logged metric at every step.

    python benchmarks/equivalence.py --before /path/to/old/checkout [--after .] [--jobs 2]
        [--out benchmarks/EQUIVALENCE.md] [--only NAME ...]

Each case is a short run (FAST-like sizes, 2 rollouts, one torch thread, the same seed) with its
own MLflow store and SFT cache, started with the tree's ``src`` first on PYTHONPATH. Metrics under
``perf/`` (timings) are skipped; every other metric must agree to ``--rtol`` (float rounding).
Old option names work in both trees (the CLI rewrites them, see grpo_lab/renames.py); a case whose
meaning needs today's names gives both spellings.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FAST = [
    "task.max_operand=9",
    "task.eval_size=20",
    "sft.steps=20",
    "sft.num_examples=50",
    "train.rollouts=3",
    "train.prompts_per_step=4",
    "G=4",
    "train.eval_every=1",
    "train.eval_size=8",
    "train.checkpoint_every=1",
    "train.log_samples_every=1",
    "policy.hidden_size=32",
    "policy.intermediate_size=64",
    "trainer.enable_progress_bar=false",
    "num_threads=1",
]
PAPER = ["beta=0.04", "train.dynamic_sampling=false"]

# name -> (overrides before, overrides after); None after = the same overrides
CASES: dict[str, tuple[list[str], list[str] | None]] = {
    "defaults": ([], None),
    "paper": (PAPER, None),
    "G=2": ([*PAPER, "G=2"], None),
    "epsilon=0.1": ([*PAPER, "epsilon=0.1", "mu=2"], None),
    "kl=k1": ([*PAPER, "kl=k1"], None),
    "kl=k2": ([*PAPER, "kl=k2"], None),
    "kl.mode=reward": ([*PAPER, "kl.mode=reward"], None),
    "kl=none beta>0": ([*PAPER, "kl=none"], None),
    "advantage=group_mean": ([*PAPER, "advantage=group_mean"], None),
    "advantage=batch_std": ([*PAPER, "advantage=batch_std"], None),
    "advantage=rloo": ([*PAPER, "advantage=rloo"], None),
    "advantage.unbiased_std": ([*PAPER, "advantage.unbiased_std=true"], None),
    "loss=token_mean": ([*PAPER, "loss=token_mean"], ["aggregation=token_mean", *PAPER]),
    "loss=seq_mean_token_sum_norm": (
        [*PAPER, "loss=seq_mean_token_sum_norm"],
        [*PAPER, "aggregation=seq_mean_token_sum_norm"],
    ),
    "epsilon_high=0.28 dual_clip=3 mu=2": (
        [*PAPER, "loss.epsilon_high=0.28", "loss.dual_clip=3", "mu=2"],
        [*PAPER, "surrogate.epsilon_high=0.28", "surrogate.dual_clip=3", "mu=2"],
    ),
    "ratio_level=sequence mu=2": (
        [*PAPER, "loss.ratio_level=sequence", "mu=2"],
        [
            *PAPER,
            "surrogate=gspo",
            "surrogate.epsilon_low=0.2",
            "surrogate.epsilon_high=0.2",
            "mu=2",
        ],
    ),
    "entropy_coef=0.01": ([*PAPER, "loss.entropy_coef=0.01"], None),
    "mask_truncated": ([*PAPER, "loss.mask_truncated=true", "sampler.max_new_tokens=3"], None),
    "mu=2 num_minibatches=2": ([*PAPER, "mu=2", "train.num_minibatches=2"], None),
    "minibatch 8 micro 4": ([*PAPER, "train.minibatch_size=8", "train.microbatch_size=4"], None),
    "token_mean micro 2 unshared": (
        [*PAPER, "loss=token_mean", "train.microbatch_size=2", "train.shared_prefix=false"],
        [*PAPER, "aggregation=token_mean", "train.microbatch_size=2", "train.shared_prefix=false"],
    ),
    "dynamic_sampling": (["beta=0.04", "train.dynamic_sampling=true"], None),
    "ref_sync": ([*PAPER, "train.ref_sync_every=1", "train.ref_sync_mix=0.5"], None),
    "scheduler=cosine warmup": ([*PAPER, "train.scheduler=cosine", "train.warmup_steps=2"], None),
    "max_grad_norm=null": ([*PAPER, "train.max_grad_norm=null"], None),
    "sampler=generate": ([*PAPER, "sampler=generate"], None),
    "top_k top_p": ([*PAPER, "sampler.top_k=5", "sampler.top_p=0.9"], None),
    "model_impl=transformers": ([*PAPER, "policy.model_impl=transformers"], None),
    "lora": ([*PAPER, "policy.lora.enabled=true"], None),
    "experiment=dapo": (["experiment=dapo"], None),
    "experiment=dr_grpo": (["experiment=dr_grpo"], None),
    "experiment=grpo_paper": (["experiment=grpo_paper", "train.dynamic_sampling=false"], None),
    "experiment=gspo": (["experiment=gspo"], None),
}


def run_case(tree: Path, overrides: list[str], workdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Train in ``tree`` and return metric -> [(step, value)] from its MLflow store."""
    from mlflow import MlflowClient

    workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {
        **os.environ,
        "PYTHONPATH": str(tree / "src"),
        "MLFLOW_TRACKING_URI": uri,
        "GRPO_LAB_CACHE": str(workdir / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_lab.cli", "train", *FAST, *overrides],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"{tree}: {' '.join(overrides)}\n{proc.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("grpo_lab")
    (run,) = client.search_runs([exp.experiment_id])
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
        if not key.startswith("perf/")
    }


def compare(a: dict, b: dict, rtol: float) -> tuple[int, float, list[str]]:
    """(values compared, largest relative difference, problems)."""
    problems = [f"only before: {k}" for k in sorted(set(a) - set(b))]
    problems += [f"only after: {k}" for k in sorted(set(b) - set(a))]
    n, worst = 0, 0.0
    for key in sorted(set(a) & set(b)):
        if [s for s, _ in a[key]] != [s for s, _ in b[key]]:
            problems.append(f"{key}: steps differ")
            continue
        for (step, x), (_, y) in zip(a[key], b[key]):
            n += 1
            if math.isnan(x) and math.isnan(y):
                continue
            diff = abs(x - y) / max(1e-8, abs(x), abs(y))
            worst = max(worst, diff)
            if diff > rtol:
                problems.append(f"{key} at step {step}: {x!r} vs {y!r}")
    return n, worst, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cases = {k: v for k, v in CASES.items() if not args.only or k in args.only}
    tmp = Path(tempfile.mkdtemp(prefix="grpo-equivalence-"))

    def one(item):
        name, (before, after) = item
        slug = "".join(c if c.isalnum() else "_" for c in name)
        a = run_case(args.before.resolve(), before, tmp / slug / "before")
        b = run_case(args.after.resolve(), before if after is None else after, tmp / slug / "after")
        return name, before, after, compare(a, b, args.rtol)

    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for name, before, after, (n, worst, problems) in pool.map(one, cases.items()):
            verdict = "equal" if not problems else f"DIFFERENT: {'; '.join(problems[:3])}"
            print(f"{name:40s} {n:5d} values  max rel diff {worst:.2e}  {verdict}", flush=True)
            rows.append((name, before, after, n, worst, verdict))
    lines = [
        "| case | overrides (before) | after, where spelled differently | values | max rel. diff | verdict |",
        "|---|---|---|---:|---:|---|",
    ]
    for name, before, after, n, worst, verdict in rows:
        spelled = " ".join(after) if after is not None else ""
        lines.append(
            f"| {name} | `{' '.join(before) or '(defaults)'}` | {f'`{spelled}`' if spelled else ''} "
            f"| {n} | {worst:.1e} | {verdict} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(
            "# Before/after equivalence of the logged metrics\n\n"
            f"`python benchmarks/equivalence.py --before {args.before} --jobs {args.jobs}`: every "
            "metric but perf/* at every step, relative tolerance "
            f"{args.rtol:g}.\n\n{table}\n"
        )
    if any(r[5] != "equal" for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
