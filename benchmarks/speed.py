"""Seconds per GRPO step: grpo_lab against TRL's GRPOTrainer and a plain-PyTorch loop, in one run.

    python benchmarks/speed.py [--quick] [--workloads tiny small small_long] [--out benchmarks/SPEED.md]
    nox -s bench                     # the same, with the `bench` extra (TRL, datasets) installed

Every runner gets the same weights (one saved initial model per workload, loaded by each), the
same prompts, the same exact-match reward and the same settings: 8 prompts x G=8 completions,
up to 32 new tokens at temperature 1, lr 1e-5 (constant), gradient clipping at 1.0, one
optimizer step per rollout, fp32 on the CPU. Each configuration runs `--warmup` steps that are
not timed, then `--steps` timed steps; the table gives the median.

Runners:
  grpo_lab[kv_cache]                      GRPOModule under a real Lightning Trainer with the project's
                                          defaults: its own sampler, policy.model_impl=auto (its
                                          own forward), train.shared_prefix on
  grpo_lab[generate]                      the same with transformers' generate as the sampler
  grpo_lab[kv_cache,transformers,unshared]  the defaults before this benchmark's changes:
                                          transformers' forward, each prompt run G times in training
  grpo_lab[kv_cache,compile]              the defaults with train.compile=true (not run unless
                                          named: it slows the runners after it)
  trl                                     trl.GRPOTrainer (loss_type="grpo", use_cpu, no gradient
                                          checkpointing, bf16 off, 64 completions per optimizer
                                          step, one optimizer step per generation)
  plain                                   a minimal loop written in torch: KV-cache decode, reward,
                                          reference forward, forward/backward, AdamW
The FLOP-bound limit is the step's FLOP count at the lengths sampled, divided by this machine's
fp32 matmul rate (measured here): a step cannot be faster unless it computes less.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from grpo_lab.policy import tiny_llama
from grpo_lab.policy.build import load_pretrained
from grpo_lab.tasks import ArithmeticTask
from grpo_lab.tasks.base import Example

PHASES = ("sample", "reward", "ref_logprobs", "old_logprobs", "update")
# A fixed instruction before every prompt of the long-prompt workload: long shared prompts
# (system prompt, instructions, few-shot examples) are the usual case in real GRPO.
INSTRUCTION = (
    "Add the two whole numbers given below and answer with the sum only: "
    "in digits, no spaces, no words, no signs, nothing after it.\n"
)
assert len(INSTRUCTION) == 128, len(INSTRUCTION)
# transformers 5 renamed the cache argument and output field from past_key_values to cache.
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass(frozen=True)
class Workload:
    """A model built in code (Llama architecture, character tokenizer) and the prompts' prefix."""

    name: str
    layers: int
    width: int
    heads: int
    mlp: int
    instruction: str = ""


WORKLOADS = {
    "tiny": Workload("tiny", layers=2, width=128, heads=4, mlp=512),
    "small": Workload("small", layers=6, width=384, heads=6, mlp=1536),
    "small_long": Workload(
        "small_long", layers=6, width=384, heads=6, mlp=1536, instruction=INSTRUCTION
    ),
}


@dataclass(frozen=True)
class Settings:
    prompts: int = 8  # B
    G: int = 8
    max_new_tokens: int = 32
    lr: float = 1e-5
    warmup: int = 2  # steps run before timing starts
    steps: int = 6  # timed steps
    seed: int = 0


@dataclass
class Result:
    """One runner on one workload at one beta: per timed step, its seconds and what it made.

    step_s: (steps,) wall seconds of each step; tokens: (steps,) completion tokens sampled
    (EOS included, padding not); phases: name -> (steps,) seconds; peak_rss_mib: the process's
    peak resident memory during the timed steps; rss_growth_mib: that peak minus the resident
    memory when the runner started (what the runner itself added).
    """

    runner: str
    workload: str
    beta: float
    step_s: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    peak_rss_mib: float = math.nan
    rss_growth_mib: float = math.nan

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(n / s for n, s in zip(self.tokens, self.step_s))

    def pool(self, other: Result) -> None:
        """Add another round's timed steps of the same runner, workload and beta."""
        self.step_s += other.step_s
        self.tokens += other.tokens
        for name, values in other.phases.items():
            self.phases.setdefault(name, []).extend(values)
        self.peak_rss_mib = max(self.peak_rss_mib, other.peak_rss_mib)
        self.rss_growth_mib = max(self.rss_growth_mib, other.rss_growth_mib)

    def phase_median(self, name: str) -> float | None:
        values = self.phases.get(name)
        return statistics.median(values) if values else None


# --------------------------------------------------------------------------- shared inputs


def benchmark_prompts(workload: Workload, n: int, seed: int) -> list[Example]:
    """n training prompts of the arithmetic task ("37+45="), each after the workload's prefix."""
    task = ArithmeticTask(eval_size=100, seed=seed)
    return [
        Example(prompt=workload.instruction + ex.prompt, answer=ex.answer)
        for ex in task.train()[:n]
    ]


class FixedPrompts:
    """A task whose training prompts are the benchmark's, judged as the arithmetic task judges."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples
        self.judge = ArithmeticTask(eval_size=100)

    def train(self) -> list[Example]:
        return self.examples

    def eval(self) -> list[Example]:
        return self.examples

    def is_correct(self, completion: str, example: Example) -> bool:
        return self.judge.is_correct(completion, example)


def save_initial_model(workload: Workload, directory: Path, seed: int) -> Path:
    """The workload's initial weights and tokenizer, saved once; every runner loads them."""
    policy = tiny_llama(
        hidden_size=workload.width,
        num_layers=workload.layers,
        num_heads=workload.heads,
        intermediate_size=workload.mlp,
        max_position_embeddings=256,  # 128-character instruction + prompt + 32 new tokens
        seed=seed,
    )
    path = directory / workload.name
    policy.save(path)
    return path


class PeakRSS:
    """Samples the process's resident memory every 20 ms on a thread, while inside the block."""

    def __init__(self) -> None:
        self.start = self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mib())

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the process's peak so far (KiB on Linux, bytes on macOS)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# --------------------------------------------------------------------------- grpo_lab


GRPO_LAB_RUNNERS = (
    "grpo_lab[kv_cache]",
    "grpo_lab[generate]",
    "grpo_lab[kv_cache,transformers,unshared]",
)
# Not among the default runners: after torch.compile has run, later runners in the same
# process ran up to 1.6x slower (TRL's tiny step 0.19 -> 0.32 s), so it is measured on its own:
# `--runners grpo_lab[kv_cache] grpo_lab[kv_cache,compile]`.
OPTIONAL_RUNNERS = ("grpo_lab[kv_cache,compile]",)


def parse_grpo_lab_runner(name: str) -> tuple[str, dict]:
    """ "grpo_lab[sampler,flag,...]" -> (sampler, run_grpo_lab keywords). Flags: transformers
    (policy.model_impl=transformers), unshared (train.shared_prefix=false), compile."""
    sampler, *flags = name.removeprefix("grpo_lab[").removesuffix("]").split(",")
    unknown = set(flags) - {"transformers", "unshared", "compile"}
    if sampler not in ("kv_cache", "generate") or unknown:
        raise ValueError(f"unknown grpo_lab runner {name!r}")
    return sampler, {
        "model_impl": "transformers" if "transformers" in flags else "auto",
        "shared_prefix": "unshared" not in flags,
        "compile": "compile" in flags,
    }


def run_grpo_lab(
    sampler_name: str,
    model_dir: Path,
    prompts,
    beta: float,
    s: Settings,
    profile,
    shared_prefix: bool = True,
    model_impl: str = "auto",
    compile: bool = False,
):
    """GRPOModule under a real Lightning Trainer; phases from its perf/<phase>_s metrics."""
    import lightning as L
    from hydra import compose, initialize_config_dir

    from grpo_lab.data import TaskDataModule
    from grpo_lab.paths import config_dir
    from grpo_lab.train import build_module

    task = FixedPrompts(prompts)
    # The module as `grpo-lab train` builds it, from the composed config with these settings
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"G={s.G}",
                f"beta={beta}",
                "mu=1",
                f"seed={s.seed}",
                "reward=accuracy",
                f"sampler={sampler_name}",
                f"sampler.max_new_tokens={s.max_new_tokens}",
                "sampler.temperature=1.0",
                f"train.prompts_per_step={s.prompts}",
                f"train.rollouts={s.warmup + s.steps}",
                f"train.lr={s.lr}",
                "train.warmup_steps=0",
                "train.scheduler=constant",
                "train.max_grad_norm=1.0",
                "train.dynamic_sampling=false",
                f"train.shared_prefix={str(shared_prefix).lower()}",
                f"train.compile={str(compile).lower()}",
            ],
        )
    module = build_module(
        cfg, policy=load_pretrained(str(model_dir), model_impl=model_impl), task=task
    )
    out = Result("grpo_lab", "", beta)  # the caller names the runner

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == s.warmup and profile is not None:
                profile.start()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            elapsed = time.perf_counter() - self.t0
            if batch_idx == s.warmup and profile is not None:
                profile.stop()
            if batch_idx < s.warmup:
                return
            out.step_s.append(elapsed)
            out.tokens.append(float(pl_module.last_rollout.completions.completion_mask.sum()))
            for name in PHASES:
                value = float(trainer.callback_metrics[f"perf/{name}_s"])
                out.phases.setdefault(name, []).append(value)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=s.warmup + s.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Timer()],
    )
    torch.manual_seed(s.seed)
    trainer.fit(module, datamodule=TaskDataModule(task, s.prompts, 0, seed=s.seed))
    return out


# --------------------------------------------------------------------------- TRL


def run_trl(model_dir: Path, prompts, beta: float, s: Settings, workdir: Path) -> Result:
    """trl.GRPOTrainer on the same weights, prompts, reward and settings; step = one optimizer step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_lab.policy.build import load_tokenizer

    judge = ArithmeticTask(eval_size=100)

    def accuracy(completions, answer, **_):
        return [
            1.0 if judge.is_correct(c, Example("", a)) else 0.0 for c, a in zip(completions, answer)
        ]

    n = s.prompts * s.G
    args = GRPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=n,  # 64 completions per optimizer step
        generation_batch_size=n,  # one optimizer step per generation
        gradient_accumulation_steps=1,
        num_generations=s.G,
        num_iterations=1,
        max_completion_length=s.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        beta=beta,
        epsilon=0.2,
        loss_type="grpo",
        use_cpu=True,
        gradient_checkpointing=False,
        bf16=False,
        max_steps=s.warmup + s.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        shuffle_dataset=False,
        seed=s.seed,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict(
        {"prompt": [ex.prompt for ex in prompts], "answer": [ex.answer for ex in prompts]}
    )
    out = Result("trl", "", beta)
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            out.step_s.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"] * n)

    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=accuracy,
        args=args,
        train_dataset=dataset,
        processing_class=load_tokenizer(str(model_dir)),
        callbacks=[Timer()],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every step's log dict
    trainer.train()
    out.step_s = out.step_s[s.warmup :]
    out.tokens = lengths[s.warmup :]
    return out


# --------------------------------------------------------------------------- plain PyTorch


def run_plain(model_dir: Path, prompts, beta: float, s: Settings) -> Result:
    """The same GRPO step written directly in torch, as a user would without a framework."""
    policy = load_pretrained(str(model_dir))
    model, tok = policy.model, policy.tokenizer
    model.eval()
    ref = copy.deepcopy(model).requires_grad_(False) if beta else None
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.99), weight_decay=0.0)
    judge = ArithmeticTask(eval_size=100)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    out = Result("plain", "", beta)
    torch.manual_seed(s.seed)

    def logprobs(m, ids, mask, T):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits = m(
            input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=T + 1
        ).logits
        logits = logits[:, :-1]  # (N, T, V)
        picked = logits.gather(-1, ids[:, -T:, None]).squeeze(-1)
        return picked - logits.logsumexp(-1)  # (N, T)

    for step in range(s.warmup + s.steps):
        batch = prompts[step * s.prompts : (step + 1) * s.prompts]
        phases = dict.fromkeys(PHASES, 0.0)
        t_step = time.perf_counter()
        enc = tok(
            [ex.prompt for ex in batch], return_tensors="pt", padding=True, add_special_tokens=False
        )
        prompt_ids = enc["input_ids"].repeat_interleave(s.G, 0)  # (N, P)
        prompt_mask = enc["attention_mask"].repeat_interleave(s.G, 0)

        t = time.perf_counter()
        with torch.no_grad():
            mask = prompt_mask
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            o = model(
                input_ids=prompt_ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
            )
            done = torch.zeros(len(prompt_ids), dtype=torch.bool)
            drawn = []
            for _ in range(s.max_new_tokens):
                token = torch.multinomial(o.logits[:, -1].softmax(-1), 1).squeeze(1)
                token = torch.where(done, pad, token)
                drawn.append(token)
                done |= token == eos
                if done.all():
                    break
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
                pos = pos[:, -1:] + 1
                o = model(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=pos,
                    use_cache=True,
                    **{_CACHE: getattr(o, _CACHE)},
                )
            completion = torch.stack(drawn, 1)  # (N, T)
            is_eos = completion == eos
            after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
            completion_mask = (~after_eos).long()
            completion = torch.where(after_eos, pad, completion)
        phases["sample"] = time.perf_counter() - t

        t = time.perf_counter()
        texts = tok.batch_decode(completion, skip_special_tokens=True)
        rows = [ex for ex in batch for _ in range(s.G)]
        rewards = torch.tensor([float(judge.is_correct(c, ex)) for c, ex in zip(texts, rows)])
        grouped = rewards.view(-1, s.G)
        advantages = (
            (grouped - grouped.mean(1, keepdim=True))
            / (grouped.std(1, unbiased=False, keepdim=True) + 1e-6)
        ).view(-1)
        phases["reward"] = time.perf_counter() - t

        ids = torch.cat([prompt_ids, completion], 1)
        full_mask = torch.cat([prompt_mask, completion_mask], 1)
        T = completion.shape[1]
        ref_logp = None
        if ref is not None:
            t = time.perf_counter()
            with torch.no_grad():
                ref_logp = logprobs(ref, ids, full_mask, T)
            phases["ref_logprobs"] = time.perf_counter() - t

        t = time.perf_counter()
        logp = logprobs(model, ids, full_mask, T)
        ratio = torch.exp(logp - logp.detach())  # one step per rollout: pi_old = pi_theta
        A = advantages[:, None]
        per_token = torch.min(ratio * A, ratio.clamp(0.8, 1.2) * A)
        if ref_logp is not None:
            d = ref_logp - logp
            per_token = per_token - beta * (torch.exp(d) - d - 1)  # k3
        m = completion_mask.float()
        loss = -((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        phases["update"] = time.perf_counter() - t
        elapsed = time.perf_counter() - t_step

        if step >= s.warmup:
            out.step_s.append(elapsed)
            out.tokens.append(float(completion_mask.sum()))
            for name, value in phases.items():
                out.phases.setdefault(name, []).append(value)
    return out


# --------------------------------------------------------------------------- FLOPs and the limit


def matmul_gflops(n: int, repeats: int) -> float:
    """This machine's fp32 matmul rate: the best of `repeats` (n x n) @ (n x n) products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def forward_flops(w: Workload, vocab: int, prompt: int, completion: float, rows: int) -> float:
    """FLOPs of one forward over `rows` sequences of `prompt` + `completion` tokens.

    Per token and layer: the q, k, v, o and the three MLP projections (4 d^2 + 3 d f
    multiply-adds) plus attention over the tokens before it (2 d x context); the vocabulary
    projection only where a completion token is predicted. 2 FLOPs per multiply-add.
    """
    d, f, L = w.width, w.mlp, w.layers
    n = prompt + completion
    linear = L * (4 * d * d + 3 * d * f) * n
    attention = L * 2 * d * n * (n + 1) / 2
    head = d * vocab * completion
    return 2 * rows * (linear + attention + head)


def step_flops(w, vocab, prompt, completion, s: Settings, beta: float, shared_prompt: bool):
    """FLOPs of one GRPO step at these lengths: sampling, reference (beta > 0), forward + backward
    (3 forwards). shared_prompt: each prompt computed once per group, not G times."""
    N = s.prompts * s.G
    rollout = forward_flops(w, vocab, prompt, completion, N)
    if shared_prompt:
        per_row_prompt = forward_flops(w, vocab, prompt, 0, N)
        rollout -= per_row_prompt * (1 - 1 / s.G)
    return rollout * (1 + (1 if beta else 0) + 3)


# --------------------------------------------------------------------------- report


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip()
            for line in lscpu.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def versions() -> str:
    names = ["torch", "transformers", "lightning", "trl", "datasets", "grpo-lab"]
    found = []
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{name} {importlib.metadata.version(name)}")
    return f"Python {platform.python_version()}; " + ", ".join(found)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}g}" if x < 1000 else f"{x:.0f}"


def write_report(path: Path, results, limits, rate, s: Settings, args, profiles) -> str:
    lines = ["# Speed of one GRPO step: grpo_lab, TRL, plain PyTorch", ""]
    done = list(dict.fromkeys(r.workload for r in results))
    if len(done) < len(args.workloads):  # written after each workload, so a long run leaves some
        lines += [
            f"> **Partial:** {len(done)} of the {len(args.workloads)} workloads measured "
            f"({', '.join(done)}); the run was still going or was stopped.",
            "",
        ]
    if args.quick:
        lines += [
            "> **Smoke run (`--quick`) on a loaded machine, not the figures.** "
            f"{s.warmup} warm-up and {s.steps} timed steps per configuration; the machine was "
            "shared with other jobs. It shows the format and that every runner runs.",
            "",
        ]
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    lines += [
        f"- command: `{command.strip()}`",
        f"- machine: {machine()}",
        f"- fp32 matmul rate: {rate:.0f} GFLOP/s (best of square {args.matmul_size} products)",
        f"- versions: {versions()}",
        f"- settings: {s.prompts} prompts x G={s.G}, up to {s.max_new_tokens} new tokens, "
        f"temperature 1, lr {s.lr:g}, clip 1.0, one optimizer step per rollout, fp32; "
        f"median of {s.steps} steps after {s.warmup} warm-up steps, pooled over rounds "
        f"({', '.join(f'{k} {v}' for k, v in args.rounds.items()) or 'one each'}) in "
        "alternating runner order",
        "- memory: peak resident memory of the process during the timed steps, and in brackets "
        "how much of it the runner added over what the process held when it started",
        "",
        "## Seconds per step",
        "",
        "| workload | beta | runner | s/step | completion tokens/s | peak RSS MiB (added) "
        "| sample | reward | ref_logprobs | old_logprobs | update |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        phases = " | ".join(fmt(r.phase_median(p)) for p in PHASES)
        lines.append(
            f"| {r.workload} | {r.beta:g} | {r.runner} | {fmt(r.median_s)} | "
            f"{fmt(r.tokens_per_s)} | {r.peak_rss_mib:.0f} ({r.rss_growth_mib:+.0f}) | {phases} |"
        )
    lines += [
        "",
        "Phases are medians in seconds (TRL logs only a step time). `–`: not measured.",
        "",
        "## Ratios (s/step of grpo_lab over the other; below 1 = grpo_lab is faster)",
        "",
        "| workload | beta | grpo_lab runner | / TRL | / plain | / FLOP-bound limit, prompt per row "
        "| / limit, prompt once per group |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    by_key = {(r.workload, r.beta, r.runner): r for r in results}
    for r in results:
        if not r.runner.startswith("grpo_lab"):
            continue
        trl = by_key.get((r.workload, r.beta, "trl"))
        plain = by_key.get((r.workload, r.beta, "plain"))
        per_row, per_group = limits[(r.workload, r.beta)]
        lines.append(
            f"| {r.workload} | {r.beta:g} | {r.runner} | "
            f"{fmt(r.median_s / trl.median_s) if trl else '–'} | "
            f"{fmt(r.median_s / plain.median_s) if plain else '–'} | "
            f"{fmt(r.median_s / per_row)} | {fmt(r.median_s / per_group)} |"
        )
    lines += [
        "",
        "## FLOP-bound limit",
        "",
        "The step's FLOPs at the mean prompt length and the mean completion length the first "
        "runner sampled, "
        "over the fp32 matmul rate above: sampling + reference forward (beta > 0) + forward and "
        "backward (3 forwards); attention included, the vocabulary projection only where a "
        "completion token is predicted. A runner far above the limit is bound by overhead "
        "(Python per generated token, per-step setup, host work between phases), not by FLOPs.",
        "",
        "| workload | beta | prompt tokens | mean completion tokens | GFLOP, prompt per row "
        "| limit s | GFLOP, prompt once per group | limit s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, beta), (per_row, per_group) in limits.items():
        p, c = args.lengths[(name, beta)]
        lines.append(
            f"| {name} | {beta:g} | {p:.1f} | {c:.1f} | {per_row * rate:.1f} | {fmt(per_row)} | "
            f"{per_group * rate:.1f} | {fmt(per_group)} |"
        )
    lines += target_lines(results, limits)
    if args.notes and args.notes.is_file():
        lines += ["", args.notes.read_text().strip()]
    for name, table in profiles.items():
        lines += [
            "",
            f"## Profile: {name}, one step, top operators by self CPU time",
            "",
            "```",
            table,
            "```",
        ]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


# The targets for the default runner: workload -> (times faster than TRL at least,
# times the FLOP-bound limit (prompt once per group) at most, or None).
TARGETS = {"tiny": (2.4, None), "small": (1.4, 1.2), "small_long": (3.0, None)}
DEFAULT_RUNNER = "grpo_lab[kv_cache]"


def target_lines(results: list[Result], limits) -> list[str]:
    """The targets table: each workload's measured TRL/grpo_lab and grpo_lab/limit ratios."""
    by_key = {(r.workload, r.beta, r.runner): r for r in results}
    rows = []
    for r in results:
        if r.runner != DEFAULT_RUNNER or r.workload not in TARGETS:
            continue
        faster, within = TARGETS[r.workload]
        trl = by_key.get((r.workload, r.beta, "trl"))
        if trl is None:
            continue
        speedup = trl.median_s / r.median_s
        over_limit = r.median_s / limits[(r.workload, r.beta)][1]
        met = speedup >= faster and (within is None or over_limit <= within)
        goal = f">= {faster:g}x faster than TRL" + (f", <= {within:g}x the limit" if within else "")
        rows.append(
            f"| {r.workload} | {r.beta:g} | {goal} | {speedup:.2f}x | {over_limit:.2f}x | "
            f"{'met' if met else 'not met'} |"
        )
    if not rows:
        return []
    return [
        "",
        f"## Targets ({DEFAULT_RUNNER}: the project's defaults)",
        "",
        "| workload | beta | target | TRL s/step over grpo_lab's | grpo_lab over the limit "
        "(prompt once per group) | |",
        "|---|---:|---|---:|---:|---|",
        *rows,
    ]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument(
        "--runners",
        nargs="+",
        default=[*GRPO_LAB_RUNNERS, "trl", "plain"],
        choices=[*GRPO_LAB_RUNNERS, *OPTIONAL_RUNNERS, "trl", "plain"],
    )
    parser.add_argument("--betas", nargs="+", type=float, default=[0.04, 0.0])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (>= 6 for the figures)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 warm-up and 2 timed steps, a small matmul probe",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="add a torch.profiler table of one grpo_lab[kv_cache] step per workload",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--rounds",
        nargs="+",
        default=["tiny=3", "small=3", "small_long=1"],
        help="workload=N: run its runners N times in alternating order and pool the steps",
    )
    parser.add_argument(
        "--long-runners",
        nargs="+",
        default=[DEFAULT_RUNNER, "grpo_lab[kv_cache,transformers,unshared]", "trl"],
        help="the runners of small_long (each of its steps takes seconds)",
    )
    parser.add_argument(
        "--notes",
        type=Path,
        default=Path(__file__).with_name("SPEED_NOTES.md"),
        help="a markdown file copied into the report after the tables (what bounds each target)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("SPEED.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 2
        args.rounds = []
    try:
        args.rounds = {k: int(v) for k, v in (item.split("=") for item in args.rounds)}
    except ValueError:
        parser.error(f"--rounds takes workload=N items, got {args.rounds}")
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup={args.warmup} and --steps={args.steps} must both be >= 1")
    if "trl" in args.runners:
        try:
            import datasets  # noqa: F401
            import trl  # noqa: F401
        except ImportError as e:
            parser.error(f"the trl runner needs TRL and datasets: pip install -e '.[bench]' ({e})")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings(warmup=args.warmup, steps=args.steps)
    args.matmul_size = 512 if args.quick else 2048
    rate = matmul_gflops(args.matmul_size, 3 if args.quick else 10)
    print(f"fp32 matmul: {rate:.0f} GFLOP/s", flush=True)

    results: list[Result] = []
    limits: dict[tuple[str, float], tuple[float, float]] = {}
    args.lengths = {}
    profiles: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="grpo-speed-") as tmp:
        for name in args.workloads:
            w = WORKLOADS[name]
            model_dir = save_initial_model(w, Path(tmp), s.seed)
            prompts = benchmark_prompts(w, s.prompts * (s.warmup + s.steps), s.seed)
            vocab = load_pretrained(str(model_dir)).model.config.vocab_size
            runners = [r for r in args.runners if name != "small_long" or r in args.long_runners]
            rounds = args.rounds.get(name, 1)
            for beta in args.betas:
                by_runner: dict[str, Result] = {}
                # Rounds alternate the runners' order, so that a slow spell of the machine falls
                # on every runner alike; each runner's timed steps are pooled over the rounds.
                for round_ in range(rounds):
                    for runner in runners if round_ % 2 == 0 else runners[::-1]:
                        profile = None
                        if (
                            args.profile
                            and runner == DEFAULT_RUNNER
                            and beta == args.betas[0]
                            and round_ == 0
                        ):
                            profile = torch.profiler.profile(
                                activities=[torch.profiler.ProfilerActivity.CPU]
                            )
                        with PeakRSS() as rss:
                            if runner.startswith("grpo_lab"):
                                sampler, options = parse_grpo_lab_runner(runner)
                                r = run_grpo_lab(
                                    sampler, model_dir, prompts, beta, s, profile, **options
                                )
                            elif runner == "trl":
                                r = run_trl(model_dir, prompts, beta, s, Path(tmp))
                            else:
                                r = run_plain(model_dir, prompts, beta, s)
                        r.workload, r.runner = name, runner
                        r.peak_rss_mib, r.rss_growth_mib = rss.peak, rss.peak - rss.start
                        if profile is not None:
                            profiles[f"{name}, beta {beta:g}"] = profile.key_averages().table(
                                sort_by="self_cpu_time_total", row_limit=15
                            )
                        print(
                            f"{name:<11} beta={beta:<5g} {runner:<19} round {round_ + 1}/{rounds} "
                            f"{r.median_s:7.3f} s/step {r.tokens_per_s:8.0f} completion tok/s",
                            flush=True,
                        )
                        if runner in by_runner:
                            by_runner[runner].pool(r)
                        else:
                            by_runner[runner] = r
                results += [by_runner[runner] for runner in runners]
                # lengths as the first runner sampled them (grpo_lab unless --runners says otherwise)
                lab = next(r for r in results if r.workload == name and r.beta == beta)
                # the character tokenizer makes one token of each character
                prompt_len = statistics.mean(len(ex.prompt) for ex in prompts)
                completion = statistics.mean(lab.tokens) / (s.prompts * s.G)
                args.lengths[(name, beta)] = (prompt_len, completion)
                limits[(name, beta)] = tuple(
                    step_flops(w, vocab, prompt_len, completion, s, beta, shared) / (rate * 1e9)
                    for shared in (False, True)
                )
                print(
                    f"{name:<11} beta={beta:<5g} FLOP-bound limit {limits[(name, beta)][0]:.3f} s "
                    f"(prompt per row), {limits[(name, beta)][1]:.3f} s (prompt once per group)",
                    flush=True,
                )
            write_report(args.out, results, limits, rate, s, args, profiles)
            print(f"wrote {args.out} ({name} done)", flush=True)


if __name__ == "__main__":
    main()
