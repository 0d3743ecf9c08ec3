"""Does the default experiment learn, and more than "just train longer"? Runs `grpo-lab train`
per seed, then a continued-SFT baseline, and tabulates both.

    python benchmarks/learning.py --seeds 0 1 2 [--jobs 3] [--workload chain_sum]
        [--out benchmarks/RESULTS.md] [overrides...]

Each run goes to its own temporary MLflow store and SFT cache. The table gives, on the held-out
prompts, greedy accuracy and sampled accuracy (the mean over ``--samples`` completions a prompt at
``sampler.temperature``, the training temperature) of the SFT warm start, of the policy after
GRPO and of the baseline, and the wall and CPU time of the whole command (SFT included). The
baseline starts from the same cached warm start and trains on the same (flawed) demonstrations, at
the learning rate the SFT ended on, for as much CPU time as the GRPO stage took (its evals
included). Greedy accuracy alone can hide a gain (a warm start that answers well greedily but
samples poorly, which is what GRPO trains on) or the lack of one, so both stand side by side.

``--workload`` picks what is trained: ``arithmetic`` (the default experiment) or a reasoning-gym
dataset written to JSONL and scored by its own ``score_answer`` (``rg_workload.py``; the runs
get ``benchmarks/`` on ``PYTHONPATH``, as a user's own task module would be). The table replaces
the workload's section of ``--out`` (between its markers) and leaves the rest of the file as is.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from grpo_lab.evaluate import load_checkpoint_policy, score
from grpo_lab.instantiate import instantiate
from grpo_lab.paths import config_dir
from grpo_lab.policy.build import Policy
from grpo_lab.sft import demonstration_batch

BENCHMARKS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Workload:
    """What the benchmark trains: overrides of the defaults, and JSONL files to write first.

    overrides: ``{data}`` in them becomes the folder the files were written to.
    data: ``rg_workload.make_files`` arguments (None: the task needs no files).
    """

    title: str
    overrides: tuple[str, ...] = ()
    data: dict[str, Any] | None = None
    notes: str = ""


RG_TASK = (
    "task=jsonl",
    "task._target_=rg_workload.ReasoningGymJsonl",
    "task.path={data}/train.jsonl",
    "task.eval_path={data}/eval.jsonl",
    "task.demonstration_field=demonstration",
)
WORKLOADS = {
    "arithmetic": Workload("the default experiment learns"),
    # Phase 1 of issue 14's "learning result on a task nobody here wrote" (RESULTS.md lists
    # what else was tried): 2-digit a+b and a-b, 60% of the demonstrations 10 too high.
    "chain_sum": Workload(
        "reasoning-gym chain_sum, scored by its score_answer",
        overrides=(*RG_TASK, "+task.dataset=chain_sum"),
        data={
            "dataset": "chain_sum",
            "config": {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2},
            "num_train": 9000,
            "num_eval": 500,
            "flawed_fraction": 0.6,
            "offsets": [10],
        },
        notes=(
            "Data: `rg_workload.make_files` with the `data` of `WORKLOADS['chain_sum']` in "
            "`benchmarks/learning.py`: reasoning-gym `chain_sum` with exactly 2 terms of 2 digits "
            "(`a+b` or `a-b`, 10 <= a, b <= 99), 9000 training entries (seed 1) and 500 held-out "
            "ones (seed 2, disjoint by expression, `a+b` and `b+a` as one). The prompt is the "
            "expression without spaces and reasoning-gym's instruction (`42-25=`); 60% of the "
            "demonstrations are the answer plus 10. Correct = `score_answer(completion, entry) "
            "== 1.0` in the GRPO reward and every eval (`rg_workload.ReasoningGymJsonl`)."
        ),
    ),
}


def run_once(seed: int, overrides: list[str], workdir: Path) -> dict[str, float]:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "GRPO_LAB_CACHE": str(workdir / "cache"),
        # a workload's own task module (rg_workload.py), as a user's would be
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")])
        ),
    }
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
    (ckpt,) = workdir.glob("outputs/**/checkpoints/last.ckpt")  # written when training ends
    return {
        "seed": seed,
        "run_start": m["eval/accuracy_start"],
        "run_final": m["eval/accuracy_final"],
        "rollouts": m["rollout"],
        "wall_s": wall,
        "cpu_s": cpu,
        "grpo_s": (final.timestamp - start.timestamp) / 1000,
        "warm_start": run.data.tags["grpo_lab.sft_warm_start"],
        "ckpt": ckpt,
        "curve": [(p.step, p.value) for p in sorted(curve, key=lambda p: p.step)],
    }


def compose_config(seed: int, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[f"seed={seed}", *overrides])


def accuracies(policy: Policy, task, cfg, samples: int) -> tuple[float, float]:
    """Greedy accuracy and sampled accuracy on the held-out prompts the run evaluates.

    Sampled: the mean correctness of ``samples`` completions a prompt drawn at the run's
    sampler settings (``sampler.temperature``, the training temperature), i.e. unbiased pass@1.
    Both come from ``grpo_lab.evaluate.score``, with the run's eval size and batch size, so the
    greedy figure is the run's own ``eval/accuracy`` for the same weights.
    """
    torch.manual_seed(cfg.seed)
    examples = task.eval()[: cfg.train.eval_size]
    sampler = instantiate(cfg.sampler)
    m = score(policy, examples, task, sampler, samples, 1, cfg.train.eval_batch_size)["metrics"]
    return m["eval/accuracy"], m["eval/pass_at_1"]


def continued_sft(cfg, task, policy: Policy, cpu_seconds: float) -> Policy:
    """The warm start ``policy`` trained on its own demonstrations for ``cpu_seconds`` more of
    this process's CPU time: the SFT recipe's pool and batch size, at the learning rate its
    cosine schedule ended on (10% of ``sft.lr``, see ``grpo_lab.sft.fit_demonstrations``)."""
    rng = random.Random(cfg.seed + 1)  # not the warm start's own order: these are further epochs
    pool = list(task.train())
    random.Random(cfg.seed).shuffle(pool)  # the same pool as fit_demonstrations draws from
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
    model.eval()
    return policy


def one_seed(seed: int, overrides: list[str], samples: int) -> dict:
    """GRPO run, then the baseline for as much CPU time as the GRPO stage used: its wall time
    times the command's CPU share (on an idle machine and one thread, just its wall time).
    Greedy and sampled accuracy of the warm start, the GRPO policy and the baseline."""
    with tempfile.TemporaryDirectory() as tmp:
        r = run_once(seed, overrides, Path(tmp))
        r["grpo_cpu_s"] = r["grpo_s"] * r["cpu_s"] / r["wall_s"]
        cfg = compose_config(seed, overrides)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        task = instantiate(cfg.task)
        grpo = load_checkpoint_policy(cfg, r.pop("ckpt"))
        r["final"], r["final_sampled"] = accuracies(grpo, task, cfg, samples)
        warm = instantiate(cfg.policy, init_from=r["warm_start"])
        r["start"], r["start_sampled"] = accuracies(warm, task, cfg, samples)
        for arm in ("start", "final"):  # the same weights and prompts as the run's own eval
            if abs(r[arm] - r[f"run_{arm}"]) > 1e-6:
                print(f"seed {seed}: {arm} greedy {r[arm]:.3f} != the run's {r[f'run_{arm}']:.3f}")
        sft = continued_sft(cfg, task, warm, r["grpo_cpu_s"])
        r["baseline"], r["baseline_sampled"] = accuracies(sft, task, cfg, samples)
    print(
        f"seed {seed}: greedy {r['start']:.3f} -> {r['final']:.3f}, sampled "
        f"{r['start_sampled']:.3f} -> {r['final_sampled']:.3f} in {r['wall_s']:.0f} s wall, "
        f"{r['cpu_s']:.0f} s CPU (GRPO stage {r['grpo_s']:.0f} s); continued SFT for as long: "
        f"{r['baseline']:.3f} greedy, {r['baseline_sampled']:.3f} sampled",
        flush=True,
    )
    return r


def cpu_model() -> str:
    """The CPU's name: the same seed samples differently on another CPU model (float reductions
    differ), so the figures are tied to it."""
    try:
        info = dict(
            (k.strip(), v.strip())
            for k, _, v in (
                line.partition(":") for line in Path("/proc/cpuinfo").read_text().splitlines()
            )
            if k.strip() in ("model name", "cpu family", "model")
        )
    except OSError:
        info = {}
    if "model name" not in info:
        return platform.processor() or "unknown CPU"
    # a generic name ("Intel(R) Xeon(R) Processor" under KVM) says little: lscpu's family and model
    extra = f" (family {info['cpu family']}, model {info['model']})" if "model" in info else ""
    return info["model name"] + extra


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        steps, values = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot((0, *steps), (r["start"], *values), marker=".", label=f"seed {r['seed']}")
        color = ax.lines[-1].get_color()
        ax.axhline(r["baseline"], linestyle=":", color=color)
        # sampled accuracy is measured at the start and after GRPO only: two marks, no line
        last = steps[-1] if steps else 0
        ax.plot((0, last), (r["start_sampled"], r["final_sampled"]), "x", color=color, ms=8)
    ax.set_xlabel("GRPO rollout")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(
        f"{title}\ngreedy during GRPO (lines), sampled at start and end (x),\n"
        "continued SFT for the same time, greedy (dotted)",
        fontsize=9,
    )
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markers(workload: str) -> tuple[str, str]:
    return (
        f"<!-- benchmarks/learning.py --workload {workload}: begin -->",
        f"<!-- benchmarks/learning.py --workload {workload}: end -->",
    )


def replace_section(text: str, workload: str, section: str) -> str:
    """``text`` with the workload's section (between its markers) replaced by ``section``;
    appended when the markers are not there yet. Hand-written notes outside them stay."""
    begin, end = markers(workload)
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def report(
    rows: list[dict], workload: str, cmd: str, figure: Path, load: tuple[float, float]
) -> str:
    """The markdown section: machine, command, the per-seed table of greedy and sampled accuracy."""
    w = WORKLOADS[workload]
    heading = "#" if workload == "arithmetic" else "##"  # the default experiment opens the file
    lines = [
        f"{heading} Benchmark: {w.title}",
        "",
        f"Command: `{cmd}` (each run: `grpo-lab train seed=S` with the workload's overrides, "
        "SFT warm start trained from scratch).",
        f"Machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
        *(["", w.notes] if w.notes else []),
        "",
        "Held-out accuracy, greedy / sampled (sampled: the mean over "
        f"{rows[0]['samples']} completions a prompt at the training temperature, "
        "`sampler.temperature`). *Continued SFT*: the same warm start trained on the same "
        "demonstrations, at the learning rate the SFT ended on, for as long as the GRPO stage "
        "took (in CPU time). *CPU time*: user + system seconds of the whole `grpo-lab train` "
        "command, SFT included; with one thread (`num_threads=1`) it is the wall time the "
        "command takes when it has a core to itself.",
        "",
        "| seed | SFT start | after GRPO | continued SFT | GRPO gain (points) | GRPO over "
        "continued SFT (points) | rollouts | GRPO stage (s) | wall time (s) | CPU time (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pair(r: dict, arm: str) -> str:
        return f"{r[arm]:.3f} / {r[arm + '_sampled']:.3f}"

    def diff(r: dict, a: str, b: str) -> str:
        return f"{100 * (r[a] - r[b]):+.1f} / {100 * (r[a + '_sampled'] - r[b + '_sampled']):+.1f}"

    for r in rows:
        lines.append(
            f"| {r['seed']} | {pair(r, 'start')} | {pair(r, 'final')} | {pair(r, 'baseline')} "
            f"| {diff(r, 'final', 'start')} | {diff(r, 'final', 'baseline')} "
            f"| {r['rollouts']:.0f} | {r['grpo_s']:.0f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |"
        )
    avg = {
        k: mean([r[k] for r in rows])
        for k in (
            "start",
            "final",
            "baseline",
            *(f"{a}_sampled" for a in ("start", "final", "baseline")),
        )
    }
    lines.append(
        f"| mean | {pair(avg, 'start')} | {pair(avg, 'final')} | {pair(avg, 'baseline')} "
        f"| {diff(avg, 'final', 'start')} | {diff(avg, 'final', 'baseline')} | | | "
        f"{mean([r['wall_s'] for r in rows]):.0f} | {mean([r['cpu_s'] for r in rows]):.0f} |"
    )
    for kind, suffix in (("greedy", ""), ("sampled", "_sampled")):
        gains = [r["final" + suffix] - r["start" + suffix] for r in rows]
        over = [r["final" + suffix] - r["baseline" + suffix] for r in rows]
        lines += [
            "",
            f"Mean {kind} gain: {100 * mean(gains):+.1f} points over {len(rows)} seeds "
            f"(min {100 * min(gains):+.1f}); over continued SFT: {100 * mean(over):+.1f} "
            f"(min {100 * min(over):+.1f}).",
        ]
    if max(load) > (os.cpu_count() or 1):
        lines += [
            "",
            f"The load average was above the {os.cpu_count()} cores: other jobs shared the "
            "machine, so the wall times measure them too; compare the CPU times.",
        ]
    lines += ["", f"![eval accuracy against rollout]({figure.name})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument(
        "--jobs", type=int, default=1, help="seeds run at once (each with its own processes)"
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="arithmetic")
    parser.add_argument(
        "--samples", type=int, default=8, help="completions a prompt for the sampled accuracy"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after the workload's")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error(f"--samples={args.samples} is invalid: expected at least 1")
    workload = WORKLOADS[args.workload]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as data:
        if workload.data is not None:
            from rg_workload import make_files

            make_files(Path(data), **workload.data)
        overrides = [o.format(data=data) for o in workload.overrides] + args.overrides
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            n = len(args.seeds)
            rows = list(pool.map(one_seed, args.seeds, [overrides] * n, [args.samples] * n))
    for r in rows:
        r["samples"] = args.samples
    load_after = os.getloadavg()[0]
    suffix = "" if args.workload == "arithmetic" else f"_{args.workload}"
    figure = args.out.with_name(f"learning_curves{suffix}.png")
    plot_curves(rows, figure, workload.title)
    cmd = (
        "python benchmarks/learning.py --seeds "
        + " ".join(map(str, args.seeds))
        + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
        + (f" --workload {args.workload}" if args.workload != "arithmetic" else "")
        + (f" --samples {args.samples}" if args.samples != 8 else "")
        + (" " + " ".join(args.overrides) if args.overrides else "")
    )
    section = report(rows, args.workload, cmd, figure, (load_before, load_after))
    old = args.out.read_text() if args.out.is_file() else ""
    args.out.write_text(replace_section(old, args.workload, section))
    print(section)


if __name__ == "__main__":
    main()
