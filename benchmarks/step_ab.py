"""Seconds per GRPO step of two source trees (before and after a change), in one run.

    python benchmarks/step_ab.py --before /path/to/old/checkout [--after .] [--rounds 3]
        [--workloads tiny small small_long] [--betas 0.04 0] [--out benchmarks/STEP_AB.md]

Each measurement is one `grpo-lab train` through the real CLI with the tree's ``src`` first on
PYTHONPATH, no SFT, on speed.py's workloads (the same model sizes, 8 prompts x G=8, 32 new tokens,
lr 1e-5, one optimizer step per rollout, fp32); the step time is MLflow's ``perf/step_time_s``
(the whole GRPO step: sampling, rewards, log-probs, update, logging), the median over the timed
rollouts after ``--warmup``. Rounds alternate which tree goes first, so a slow spell of the machine
falls on both. Both trees take the same overrides (old option names are rewritten by the new CLI).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

from speed import INSTRUCTION, WORKLOADS  # noqa: E402


def workload_overrides(name: str, workdir: Path) -> list[str]:
    w = WORKLOADS[name]
    out = [
        f"policy.num_layers={w.layers}",
        f"policy.hidden_size={w.width}",
        f"policy.num_heads={w.heads}",
        f"policy.intermediate_size={w.mlp}",
        "policy.max_position_embeddings=256",
    ]
    if w.instruction:  # the long-prompt workload: a task file whose prompts carry the instruction
        path = workdir / "long.jsonl"
        rows = [
            {"prompt": f"{INSTRUCTION}{a}+{b}=", "answer": str(a + b)}
            for a in range(10, 100, 3)
            for b in range(10, 100, 7)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out += ["task=jsonl", f"task.path={path}", "reward=accuracy"]
    return out


def step_seconds(tree: Path, overrides: list[str], workdir: Path, warmup: int) -> float:
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_lab.cli", "train", *overrides],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"{tree} {' '.join(overrides)}\n{proc.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("grpo_lab")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]
    hist = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "perf/step_time_s")
    )
    return statistics.median(v for s, v in hist if s > warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--workloads", nargs="+", default=["tiny", "small", "small_long"])
    parser.add_argument("--betas", nargs="+", type=float, default=[0.04, 0.0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    common = [
        "sft.enabled=false",
        f"train.rollouts={args.rollouts}",
        "train.prompts_per_step=8",
        "G=8",
        "sampler.max_new_tokens=32",
        "train.lr=1e-5",
        "train.warmup_steps=0",
        "train.dynamic_sampling=false",
        "train.eval_every=100000",
        "train.eval_size=8",
        "train.checkpoint_every=100000",
        "train.log_samples_every=100000",
        "trainer.enable_progress_bar=false",
    ]
    results: dict[tuple[str, float, str], list[float]] = {}
    for name in args.workloads:
        for beta in args.betas:
            for r in range(args.rounds):
                order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                for which in order:
                    with tempfile.TemporaryDirectory() as tmp:
                        overrides = [*common, f"beta={beta}", *workload_overrides(name, Path(tmp))]
                        s = step_seconds(trees[which], overrides, Path(tmp), args.warmup)
                    results.setdefault((name, beta, which), []).append(s)
                    print(f"{name} beta={beta} round {r} {which}: {s:.3f} s/step", flush=True)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    lines = [
        f"CPU: {cpu}, {os.cpu_count()} cores. Median s/step over rollouts {args.warmup + 1}.."
        f"{args.rollouts}, best of {args.rounds} rounds (alternating order).",
        "",
        "| workload | beta | before (s/step) | after (s/step) | after / before |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in args.workloads:
        for beta in args.betas:
            b = min(results[(name, beta, "before")])
            a = min(results[(name, beta, "after")])
            lines.append(f"| {name} | {beta:g} | {b:.3f} | {a:.3f} | {a / b:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(
            "# The GRPO step before and after a change\n\n"
            f"`python benchmarks/step_ab.py --before {args.before} --rounds {args.rounds}`\n\n"
            f"{table}\n"
        )


if __name__ == "__main__":
    main()
