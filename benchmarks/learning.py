"""Does the default experiment learn, and more than "just train longer"? Runs `grpo-lab train`
per seed, then a continued-SFT baseline, and tabulates both.

    python benchmarks/learning.py --seeds 0 1 2 [--jobs 3] [--out benchmarks/RESULTS.md] [overrides...]

Each run goes to its own temporary MLflow store and SFT cache. The table gives greedy accuracy on
held-out prompts at the SFT start and after GRPO, and the wall and CPU time of the whole command
(SFT included). The baseline starts from the same cached warm start and trains on the same
(flawed) demonstrations, at the learning rate the SFT ended on, for as much CPU time as the GRPO
stage took (its evals included); its greedy held-out accuracy stands beside GRPO's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from grpo_lab.evaluate import greedy_accuracy
from grpo_lab.instantiate import instantiate
from grpo_lab.paths import config_dir
from grpo_lab.sft import demonstration_batch


def run_once(seed: int, overrides: list[str], workdir: Path) -> dict[str, float]:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "GRPO_LAB_CACHE": str(workdir / "cache")}
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo_lab.cli",
            "train",
            f"seed={seed}",
            "trainer.enable_progress_bar=false",
            *overrides,
        ],
        cwd=workdir,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the command: unlike wall time, hardly moved by other processes on the machine
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("grpo_lab")
    run = client.search_runs([exp.experiment_id])[0]
    m = run.data.metrics
    # the GRPO stage: from the start eval's metric to the final eval's (SFT and startup excluded)
    (start,) = client.get_metric_history(run.info.run_id, "eval/accuracy_start")
    (final,) = client.get_metric_history(run.info.run_id, "eval/accuracy_final")
    curve = client.get_metric_history(run.info.run_id, "eval/accuracy")
    return {
        "seed": seed,
        "start": m["eval/accuracy_start"],
        "final": m["eval/accuracy_final"],
        "rollouts": m["rollout"],
        "wall_s": wall,
        "cpu_s": cpu,
        "grpo_s": (final.timestamp - start.timestamp) / 1000,
        "warm_start": run.data.tags["grpo_lab.sft_warm_start"],
        "curve": [(p.step, p.value) for p in sorted(curve, key=lambda p: p.step)],
    }


def continued_sft(seed: int, overrides: list[str], warm_start: str, cpu_seconds: float) -> float:
    """Greedy held-out accuracy after training the warm start on its own demonstrations for
    ``cpu_seconds`` more of this process's CPU time: the SFT recipe's pool and batch size, at
    the learning rate its cosine schedule ended on (10% of ``sft.lr``, see
    ``grpo_lab.sft.fit_demonstrations``)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"seed={seed}", *overrides])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = instantiate(cfg.task)
    policy = instantiate(cfg.policy, init_from=warm_start)
    rng = random.Random(seed + 1)  # not the warm start's own order: these are further epochs
    pool = list(task.train())
    random.Random(seed).shuffle(pool)  # the same pool as fit_demonstrations draws from
    pool = pool[: cfg.sft.num_examples] if cfg.sft.num_examples else pool
    model = policy.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1 * cfg.sft.lr, weight_decay=0.0)
    # CPU time, not wall time: other processes on the machine slow both arms alike
    deadline = time.process_time() + cpu_seconds
    while time.process_time() < deadline:
        examples = rng.sample(pool, min(cfg.sft.batch_size, len(pool)))
        batch = demonstration_batch(policy, examples, getattr(task, "system_prompt", None))
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return greedy_accuracy(
        policy, task.eval()[: cfg.train.eval_size], task, instantiate(cfg.sampler)
    )


def one_seed(seed: int, overrides: list[str]) -> dict:
    """GRPO run, then the baseline for as much CPU time as the GRPO stage used: its wall time
    times the command's CPU share (on an idle machine and one thread, just its wall time)."""
    with tempfile.TemporaryDirectory() as tmp:
        r = run_once(seed, overrides, Path(tmp))
        r["grpo_cpu_s"] = r["grpo_s"] * r["cpu_s"] / r["wall_s"]
        r["baseline"] = continued_sft(seed, overrides, r["warm_start"], r["grpo_cpu_s"])
    print(
        f"seed {seed}: {r['start']:.3f} -> {r['final']:.3f} in {r['wall_s']:.0f} s wall, "
        f"{r['cpu_s']:.0f} s CPU (GRPO stage {r['grpo_s']:.0f} s); continued SFT for as long: "
        f"{r['baseline']:.3f}",
        flush=True,
    )
    return r


def cpu_model() -> str:
    """The CPU's name: the same seed samples differently on another CPU model (float reductions
    differ), so the figures are tied to it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        steps, values = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot((0, *steps), (r["start"], *values), marker=".", label=f"seed {r['seed']}")
        ax.axhline(r["baseline"], linestyle=":", color=ax.lines[-1].get_color())
    ax.set_xlabel("GRPO rollout")
    ax.set_ylabel("greedy held-out accuracy")
    ax.set_title("GRPO (lines) vs continued SFT for the same time (dotted)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument(
        "--jobs", type=int, default=1, help="seeds run at once (each with its own processes)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        rows = list(pool.map(one_seed, args.seeds, [args.overrides] * len(args.seeds)))
    load_after = os.getloadavg()[0]
    figure = args.out.with_name("learning_curves.png")
    plot_curves(rows, figure)
    gains = [r["final"] - r["start"] for r in rows]
    over = [r["final"] - r["baseline"] for r in rows]
    cmd = (
        "python benchmarks/learning.py --seeds "
        + " ".join(map(str, args.seeds))
        + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
        + (" " + " ".join(args.overrides) if args.overrides else "")
    )
    lines = [
        "# Benchmark: the default experiment learns",
        "",
        f"Command: `{cmd}` (each run: `grpo-lab train seed=S`, SFT warm start trained from scratch).",
        f"Machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} CPU cores, torch {torch.__version__}; "
        f"load average {load_before:.1f} at the start, {load_after:.1f} at the end.",
        "",
        "Greedy accuracy on the held-out prompts. *Continued SFT*: the same warm start trained on the "
        "same demonstrations, at the learning rate the SFT ended on, for as long as the GRPO stage "
        "took (in CPU time). *CPU time*: user + "
        "system seconds of the whole `grpo-lab train` command, SFT included; with one thread "
        "(`num_threads=1`) it is the wall time the command takes when it has a core to itself.",
        "",
        "| seed | SFT start | after GRPO | gain (points) | continued SFT | GRPO over it (points) "
        "| rollouts | GRPO stage (s) | wall time (s) | CPU time (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['start']:.3f} | {r['final']:.3f} | {100 * (r['final'] - r['start']):+.1f} "
            f"| {r['baseline']:.3f} | {100 * (r['final'] - r['baseline']):+.1f} "
            f"| {r['rollouts']:.0f} | {r['grpo_s']:.0f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |"
        )
    lines += [
        "",
        f"Mean gain: {100 * sum(gains) / len(gains):+.1f} points over {len(rows)} seeds "
        f"(min {100 * min(gains):+.1f}); over continued SFT: {100 * sum(over) / len(over):+.1f} "
        f"(min {100 * min(over):+.1f}).",
        *(
            [
                "",
                f"The load average was above the {os.cpu_count()} cores: other jobs shared the "
                "machine, so the wall times measure them too; compare the CPU times.",
            ]
            if max(load_before, load_after) > (os.cpu_count() or 1)
            else []
        ),
        "",
        f"![eval accuracy against rollout]({figure.name})",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
