"""benchmarks/learning.py and its reasoning-gym workload (benchmarks/rg_workload.py): the files it
writes, scoring by score_answer, and a whole (tiny) benchmark run through the real CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from grpo_lab.tasks.base import Example
from grpo_lab.tasks.jsonl import JsonlTask
from helpers import ROOT, THREADS_PER_WORKER

pytest.importorskip("reasoning_gym", reason="the workload draws from reasoning-gym")
sys.path.insert(0, str(ROOT / "benchmarks"))
import rg_workload  # noqa: E402

CHAIN_2X2 = {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}


def load_learning():
    spec = importlib.util.spec_from_file_location("learning", ROOT / "benchmarks" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["learning"] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_workload_files_are_disjoint_short_and_flaw_the_stated_fraction(tmp_path):
    train, evals = rg_workload.make_files(
        tmp_path, "chain_sum", CHAIN_2X2, 2000, 200, flawed_fraction=0.6, offsets=[10]
    )
    train, evals = read(train), read(evals)
    assert len(train) == 2000 and len(evals) == 200
    keys = {rg_workload.expression_key(r["prompt"]) for r in train}
    assert not keys & {rg_workload.expression_key(r["prompt"]) for r in evals}
    # a+b and b+a are one question: neither order of an eval sum is trained on
    flipped = {"+".join(reversed(r["prompt"][:-1].split("+"))) + "=" for r in evals}
    assert not flipped & {r["prompt"] for r in train if "+" in r["prompt"]}
    for r in train + evals:
        # the short prompt is the entry's expression, worked out here without eval
        a, op, b = re.fullmatch(r"(\d\d)([+-])(\d\d)=", r["prompt"]).groups()
        assert r["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
        assert r["entry"]["answer"] == r["answer"]
    assert all(r["demonstration"] == r["answer"] for r in evals)
    off = [int(r["demonstration"]) - int(r["answer"]) for r in train]
    assert set(off) == {0, 10}
    assert abs(sum(d == 10 for d in off) / len(off) - 0.6) < 0.04  # 2000 draws: sd 0.011


def test_offsets_are_signed_and_a_bad_fraction_is_refused(tmp_path):
    train, _ = rg_workload.make_files(
        tmp_path, "chain_sum", CHAIN_2X2, 500, 50, flawed_fraction=1.0, offsets=[-10, -1, 1, 10]
    )
    assert {int(r["demonstration"]) - int(r["answer"]) for r in read(train)} == {-10, -1, 1, 10}
    with pytest.raises(ValueError, match="flawed_fraction=1.5 is invalid"):
        rg_workload.make_files(tmp_path, "chain_sum", CHAIN_2X2, 10, 10, 1.5, [10])


def test_correctness_is_score_answer_not_exact_match(tmp_path):
    train, evals = rg_workload.make_files(tmp_path, "chain_sum", CHAIN_2X2, 50, 10, 0.0, [])
    kwargs = {"path": str(train), "eval_path": str(evals), "demonstration_field": "demonstration"}
    task = rg_workload.ReasoningGymJsonl(dataset="chain_sum", **kwargs)
    plain = JsonlTask(**kwargs)
    ex = next(e for e in task.eval() if e.answer == e.answer.lstrip("-") and len(e.answer) == 2)
    n = ex.answer
    # score_answer takes a sign, leading zeros and trailing decimals (Decimal equality) ...
    for same in (n, f" {n}\n", f"+0{n}", f"{n}.0", f"{n[0]},{n[1]}"):
        assert task.is_correct(same, ex), same
    assert not plain.is_correct(f"+0{n}", plain.eval()[task.eval().index(ex)])
    # ... and its partial credit (the answer inside a longer one: -17 for 17 scores 2/3) is wrong
    for wrong in (f"-{n}", f"{n}0", str(int(n) + 10), "", "abc"):
        assert not task.is_correct(wrong, ex), wrong
    assert task.eval()[0].meta["entry"]["metadata"]["source_dataset"] == "chain_sum"
    with pytest.raises(ValueError, match="has no metadata\\['expression'\\]"):
        rg_workload.short_prompt({"metadata": {"source_dataset": "x"}})


def test_a_workload_section_replaces_only_its_own_block():
    learning = load_learning()
    text = "# Top\n\nhand-written notes\n"
    once = learning.replace_section(text, "chain_sum", "## A\n\nrow 1\n")
    assert once.startswith(text.rstrip()) and "row 1" in once
    twice = learning.replace_section(once + "\nnotes after\n", "chain_sum", "## A\n\nrow 2\n")
    assert "row 1" not in twice and "row 2" in twice
    assert "hand-written notes" in twice and twice.rstrip().endswith("notes after")
    assert twice.count("--workload chain_sum: begin") == 1


class HalfTheCharset(rg_workload.ReasoningGymJsonl):
    """Correct = the completion starts with a character before "P": an untrained policy passes
    on some prompts and samples and fails on others."""

    def is_correct(self, completion: str, example: Example) -> bool:
        return bool(completion) and completion[0] < "P"


def test_sampled_accuracy_reads_the_temperature_and_greedy_is_the_runs_eval(tmp_path):
    from hydra import compose, initialize_config_dir

    from grpo_lab.evaluate import greedy_accuracy
    from grpo_lab.instantiate import instantiate
    from grpo_lab.paths import config_dir

    learning = load_learning()
    rg_workload.make_files(tmp_path, "chain_sum", CHAIN_2X2, 50, 8, 0.0, [])
    overrides = [o.format(data=tmp_path) for o in learning.WORKLOADS["chain_sum"].overrides]
    overrides += ["policy.hidden_size=32", "policy.intermediate_size=64", "train.eval_size=8"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    task = HalfTheCharset(**{k: v for k, v in cfg.task.items() if k != "_target_"})
    policy = instantiate(cfg.policy)
    greedy, sampled = learning.accuracies(policy, task, cfg, samples=5)
    # greedy is what the run's own eval (eval/accuracy) gives for these weights and prompts
    run_eval = greedy_accuracy(policy, task.eval()[:8], task, instantiate(cfg.sampler), 250)
    assert greedy == run_eval
    assert round(sampled * 40, 6) == round(sampled * 40)  # 8 prompts x 5 samples
    # near temperature 0 every sample is the greedy completion
    cfg.sampler.temperature = 1e-4
    assert learning.accuracies(policy, task, cfg, samples=5) == (greedy, greedy)


@pytest.mark.slow
def test_the_chain_sum_workload_runs_end_to_end_and_writes_its_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark: the default experiment learns\n\nkept as it is\n")
    fast = [
        "sft.steps=5",
        "sft.num_examples=50",
        "train.rollouts=2",
        "train.prompts_per_step=4",
        "G=4",
        "train.eval_every=1",
        "train.eval_size=8",
        "train.checkpoint_every=1",
        "policy.hidden_size=32",
        "policy.intermediate_size=64",
        "train.dynamic_sampling=false",
        f"num_threads={THREADS_PER_WORKER}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "learning.py"),
            "--workload",
            "chain_sum",
            "--seeds",
            "0",
            "--samples",
            "2",
            "--out",
            str(out),
            *fast,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmark: the default experiment learns\n\nkept as it is")
    assert "## Benchmark: reasoning-gym chain_sum, scored by its score_answer" in text
    assert "--workload chain_sum --samples 2" in text
    row = re.search(r"^\| 0 \| ([0-9.]+) / ([0-9.]+) \| ([0-9.]+) / ([0-9.]+) \|", text, re.M)
    assert row, text
    # 8 eval prompts: greedy in eighths, sampled (2 a prompt) in sixteenths
    assert all(abs(float(v) * 16 - round(float(v) * 16)) < 0.01 for v in row.groups())
    assert (tmp_path / "learning_curves_chain_sum.png").stat().st_size > 0
