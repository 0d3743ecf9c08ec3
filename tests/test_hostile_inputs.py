"""Model output is untrusted: every shipped task parser and reward answers hostile completions in
bounded time, never runs them, and returns a valid score.

Each completion is scored in a separate process (spawned once per module) with a deadline: a
parser that hangs is killed and reported instead of hanging the suite. Payloads that would create
a marker file if they were ever run check that nothing runs them; ``test_the_payloads_would_leave_
the_marker_if_they_were_run`` shows that they would.
"""

from __future__ import annotations

import math
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import BertConfig, BertForSequenceClassification, BertModel

from grpo_lab.paths import config_dir
from grpo_lab.policy.tokenizer import char_tokenizer
from grpo_lab.rewards import EmbeddingSimilarity, RewardModel, format_reward
from grpo_lab.tasks import ArithmeticTask, CompareTask, Example
from grpo_lab.tasks.arithmetic import parse_int_answer
from grpo_lab.train import build_rewards

# A hang guard, not a speed test: the slowest case here takes well under 0.5 s on one core.
DEADLINE_S = 3.0
STARTUP_S = 180.0  # the worker imports torch and builds every scorer once

MARKER = "{marker}"  # replaced by a path in the test's temporary directory
RUNNABLE = {
    "os_system": f"__import__('os').system('touch {MARKER}')",
    "pathlib_touch": f"__import__('pathlib').Path('{MARKER}').touch()",
    "eval_call": f"eval(\"__import__('os').system('touch {MARKER}')\")",
    "exec_open": f"exec(\"open('{MARKER}', 'w').close()\")",
    "lambda_call": f"(lambda: __import__('pathlib').Path('{MARKER}').touch())()",
}
HOSTILE = {
    **RUNNABLE,
    "subclasses": "().__class__.__base__.__subclasses__()",
    "power_tower": "9**9**9",
    "huge_power": "10**10**10+1",
    "digits_5000": "1" * 5000,  # past Python's 4300-digit limit of int(str)
    "digits_1M": "9" * 1_000_000,
    "minus_digits_1M": "-" + "0" * 999_999 + "7",
    "letters_1M": "a" * 1_000_000,
    "spaces_1M": " " * 1_000_000 + "1",
    "lines_100k": "1\n" * 100_000,
    "decimals_500k": "1." * 500_000,
    "sum_of_100k_ones": "+".join(["1"] * 100_000),
    "deep_parens_5000": "(" * 5000 + "1" + ")" * 5000,
    "parens_100": "(" * 100 + "1+2" + ")" * 100,  # within countdown's 256-character limit
    "unary_minus_250": "-" * 250 + "1",
    "nul_after": "82\x00",
    "nul_1000": "\x00" * 1000,
    "arabic_indic_digits": "\u0668\u0662",  # 82
    "fullwidth_digits": "\uff18\uff12",  # 82
    "math_bold_digits": "\U0001d7d6\U0001d7d0",  # 82
    "arabic_decimal": "\u0669.\u0669",  # 9.9
    "lone_surrogate": "\ud800",
    "rtl_override": "\u202e28",
    "emoji_1000": "\U0001f600" * 1000,
    "float_overflow": "1e999",
    "nan_word": "NaN",
    "json": '{"answer": 82, "__class__": "x"}',
    "format_string": "{0.__class__.__mro__}%s%n",
    "division_by_zero": "1/0",
    "ansi_escape": "\x1b[2J\x1b[31m82",
    "boxed_nested_100k": "\\boxed{" * 100_000 + "1" + "}" * 99_999,  # one brace short
    "answer_tags_unclosed_100k": "<answer>" * 100_000,
    "r1_tags_100k": "<think></think><answer>" * 100_000 + "</answer>",
    # parses at once, then sympy works on 9^(9^387420489): math_verify's deadline must stop it
    "latex_power_tower": r"\boxed{9^{9^{9^{9}}}}",
    "latex_deep_frac": r"$" + r"\frac{1}{" * 300 + "1" + "}" * 300 + "$",
}
assert len(HOSTILE) >= 20

TASKS = {
    "arithmetic": ["task=arithmetic", "task.max_operand=9", "task.eval_size=10"],
    "countdown": ["task=countdown", "task.train_size=20", "task.eval_size=5"],
    "compare": ["task=compare", "task.train_size=20", "task.eval_size=5"],
    "jsonl": ["task=jsonl", "task.path={jsonl}"],
    "jsonl_pattern": ["task=jsonl", "task.path={jsonl}", r"task.answer_pattern='answer:\s*(\S+)'"],
    **{
        f"hf_{fmt}": ["task=hf", "task.path={hf}", f"task.answer_format={fmt}"]
        for fmt in ("boxed", "answer_tag", "last_number")
    },
    "reasoning_gym": ["task=reasoning_gym", "task.train_size=20", "task.eval_size=5"],
    # countdown's own scorer runs sympy's parse_expr (eval) on the answer: the guard must hold
    "reasoning_gym_countdown": [
        "task=reasoning_gym",
        "task.dataset=countdown",
        "task.train_size=20",
        "task.eval_size=5",
    ],
    "reasoning_gym_boxed": [
        "task=reasoning_gym",
        "task.dataset=polynomial_multiplication",
        "task.answer_format=boxed",
        "task.train_size=20",
        "task.eval_size=5",
    ],
}
RULE_REWARDS = ["accuracy", "format", "length", "overlong", "accuracy_format", "r1_format"]
# Rewards that score one kind of task only: reward -> (overrides, the tasks it is built with).
# math_verify's deadline per completion is 1 s here, inside the worker's 3 s (DEADLINE_S).
TASK_REWARDS = {
    "embedding": (["reward=embedding", "reward.functions.embedding.model={embed}"], ["arithmetic"]),
    "model": (["reward=model", "reward.functions.model.model={rm}"], ["arithmetic"]),
    "math_verify": (
        ["reward=math_verify", "reward.functions.math_verify.timeout_s=1"],
        ["arithmetic", "reasoning_gym"],
    ),
    "reasoning_gym": (
        ["reward=reasoning_gym"],
        ["reasoning_gym", "reasoning_gym_countdown", "reasoning_gym_boxed"],
    ),
}
SCORERS = (
    [f"parse/{task}" for task in TASKS]
    + [f"reward/{reward}/{task}" for reward in RULE_REWARDS for task in TASKS]
    + [f"reward/{reward}/{task}" for reward, (_, tasks) in TASK_REWARDS.items() for task in tasks]
)


# ---------------------------------------------------------------- the worker process


def _build_scorers(paths: dict[str, str]) -> dict:
    """scorer id -> fn(completion) -> a description of the outcome, built from the real configs."""
    from hydra import compose, initialize_config_dir

    from grpo_lab.instantiate import instantiate
    from grpo_lab.paths import config_dir
    from grpo_lab.train import build_rewards

    def cfg(*overrides: str):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return compose("config", overrides=[o.format(**paths) for o in overrides])

    tasks = {name: instantiate(cfg(*overrides).task) for name, overrides in TASKS.items()}
    scorers = {}
    for name, task in tasks.items():
        example = task.eval()[0]
        scorers[f"parse/{name}"] = lambda c, t=task, ex=example: (
            "parse",
            t.parse_answer(c),
            t.is_correct(c, ex),
        )
    for reward in [*RULE_REWARDS, *TASK_REWARDS]:
        for name, overrides in TASKS.items():
            if reward in TASK_REWARDS and name not in TASK_REWARDS[reward][1]:
                continue
            extra = TASK_REWARDS[reward][0] if reward in TASK_REWARDS else [f"reward={reward}"]
            rewards, task = build_rewards(cfg(*overrides, *extra)), tasks[name]
            example = task.eval()[0]

            def score(c, rewards=rewards, task=task, ex=example):
                out = rewards(
                    [c], [ex], task=task, truncated=[False], lengths=[len(c)], max_new_tokens=6
                )
                return (
                    "reward",
                    out.total.tolist(),
                    {k: v.tolist() for k, v in out.per_fn.items()},
                )

            scorers[f"reward/{reward}/{name}"] = score
    for score in scorers.values():  # start math_verify's worker processes before the clock runs
        score("1")
    return scorers


def _serve(conn, paths: dict[str, str]) -> None:
    torch.set_num_threads(1)
    scorers = _build_scorers(paths)
    conn.send("ready")
    while True:
        scorer, completion = conn.recv()
        try:
            conn.send(("ok", scorers[scorer](completion)))
        except Exception as err:  # reported to the test, which fails naming it
            conn.send(("raised", f"{type(err).__name__}: {str(err)[:300]}"))


class Worker:
    """A spawned process that scores one completion per request. A request not answered within
    DEADLINE_S is a hang: the process is killed and a fresh one serves the next request."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.paths), daemon=True)
        self.proc.start()
        if not self.conn.poll(STARTUP_S):
            self.close()
            raise RuntimeError("the scoring worker did not start")
        assert self.conn.recv() == "ready"

    def score(self, scorer: str, completion: str) -> tuple[str, object, float]:
        """(status, result, seconds): status ok, raised, or timeout (the worker is restarted)."""
        t0 = time.perf_counter()
        self.conn.send((scorer, completion))
        if not self.conn.poll(DEADLINE_S):
            self.close()
            self._start()
            return "timeout", None, time.perf_counter() - t0
        status, result = self.conn.recv()
        return status, result, time.perf_counter() - t0

    def close(self) -> None:
        self.proc.kill()
        self.proc.join()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def marker(workdir) -> Path:
    return workdir / "PWNED"


@pytest.fixture(scope="module")
def model_dirs(workdir) -> dict[str, str]:
    """A tiny BertModel (embedding) and a num_labels=1 classifier (reward model), saved locally
    with a character tokenizer: the model rewards run offline."""
    tok = char_tokenizer()
    size = dict(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=600,  # the model reward's max_length is 512
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    paths = {"embed": str(workdir / "embed"), "rm": str(workdir / "rm")}
    for key, model in (
        ("embed", BertModel(BertConfig(**size))),
        ("rm", BertForSequenceClassification(BertConfig(num_labels=1, **size))),
    ):
        model.save_pretrained(paths[key])
        tok.save_pretrained(paths[key])
    return paths


@pytest.fixture(scope="module")
def worker(workdir, model_dirs):
    """The scoring worker over every scorer, with a JSONL task file."""
    paths = dict(model_dirs)
    jsonl = workdir / "data.jsonl"
    jsonl.write_text("".join(f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}\n' for i in range(20)))
    paths["jsonl"] = str(jsonl)
    import datasets

    paths["hf"] = str(workdir / "hf")
    datasets.Dataset.from_list(
        [{"question": f"{i}+1=", "answer": f"{i + 1}"} for i in range(20)]
    ).save_to_disk(paths["hf"])
    w = Worker(paths)
    yield w
    w.close()


def _valid(outcome) -> str | None:
    """Why an outcome is not a valid score, or None when it is."""
    kind, *values = outcome
    if kind == "parse":
        parsed, correct = values
        if not (parsed is None or isinstance(parsed, str)) or not isinstance(correct, bool):
            return f"parse_answer gave {parsed!r:.80}, is_correct gave {correct!r}"
        return None
    total, per_fn = values
    if not all(math.isfinite(v) for v in total):
        return f"total reward {total}"
    bad = {k: v for k, v in per_fn.items() if not all(math.isfinite(x) or math.isnan(x) for x in v)}
    return f"scores {bad}" if bad else None


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("scorer", SCORERS)
def test_hostile_completions_get_a_valid_score_in_bounded_time_and_never_run(
    worker, marker, scorer
):
    failures = {}
    for name, template in HOSTILE.items():
        completion = template.replace(MARKER, str(marker))
        status, result, seconds = worker.score(scorer, completion)
        if status == "timeout":
            failures[name] = f"no answer within {DEADLINE_S} s"
        elif status == "raised":
            failures[name] = f"raised {result}"
        elif why := _valid(result):
            failures[name] = f"invalid score: {why}"
        assert not marker.exists(), f"{scorer} ran the completion {name!r}"
    assert not failures, f"{scorer}: " + "; ".join(f"{k}: {v}" for k, v in failures.items())


def test_the_payloads_would_leave_the_marker_if_they_were_run(workdir):
    canary = workdir / "canary"
    for name, template in RUNNABLE.items():
        subprocess.run([sys.executable, "-c", template.replace(MARKER, str(canary))], check=True)
        assert canary.exists(), name
        canary.unlink()


# ---------------------------------------------------------------- what the fixes pin


def test_arithmetic_answers_past_pythons_int_limit_are_compared_as_canonical_text():
    assert parse_int_answer("0007") == "7" and parse_int_answer("-007") == "-7"
    assert parse_int_answer("-0") == "0" and parse_int_answer("000") == "0"
    big = "1" + "0" * 5000  # int(big) raises: more than 4300 digits
    assert parse_int_answer(f" 00{big}\n") == big
    task = ArithmeticTask(max_operand=9, eval_size=10)
    assert task.is_correct(big, Example(prompt="", answer=big))
    assert not task.is_correct(big + "1", Example(prompt="", answer=big))


def test_unicode_digits_are_not_answers_only_ascii_digits_are():
    arabic_82, fullwidth_82, arabic_9_9 = "\u0668\u0662", "\uff18\uff12", "\u0669.\u0669"
    assert parse_int_answer(arabic_82) is None and parse_int_answer(fullwidth_82) is None
    arithmetic = ArithmeticTask(max_operand=9, eval_size=10)
    assert not arithmetic.is_correct(arabic_82, Example(prompt="37+45=", answer="82"))
    compare = CompareTask(train_size=5, eval_size=1)
    ex = Example(prompt="Which is bigger, 9.11 or 9.9?", answer="9.9")
    assert compare.parse_answer(arabic_9_9) is None
    assert not compare.is_correct(arabic_9_9, ex) and compare.is_correct("9.9", ex)
    # the default format reward and the shipped accuracy_format's pattern agree with the parsers
    assert format_reward([arabic_82, "82"], [ex, ex]) == [0.0, 1.0]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        rewards = build_rewards(compose("config", overrides=["reward=accuracy_format"]))
    out = rewards([arabic_82, "82"], [Example(prompt="37+45=", answer="82")] * 2, task=arithmetic)
    assert out.per_fn["format"].tolist() == [0.0, 1.0]
    assert out.per_fn["accuracy"].tolist() == [0.0, 1.0]


def test_model_rewards_score_a_long_completion_by_its_first_max_length_tokens(model_dirs):
    ex = Example(prompt="1+1=", answer="2")
    long = "12" * 500_000  # one token per character with the character tokenizer
    for reward in (
        EmbeddingSimilarity(model_dirs["embed"], max_length=16),
        RewardModel(model_dirs["rm"], max_length=16),
    ):
        # 16 tokens cover 16 characters: the first 40 give the same tokens as all 10^6
        long_score, short_score = reward([long, long[:40]], [ex, ex])
        assert long_score == pytest.approx(short_score, abs=1e-6)
        (surrogate,) = reward(["\ud800 2"], [ex])  # not UTF-8: scored as "? 2"
        assert surrogate == pytest.approx(reward(["? 2"], [ex])[0], abs=1e-6)


# ---------------------------------------------------------------- the MLflow UI binds to localhost


def test_every_printed_and_documented_mlflow_ui_command_binds_to_localhost():
    from grpo_lab import sweep, tracking
    from helpers import ROOT

    assert tracking.ui_command("sqlite:///mlflow.db") == (
        "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000"
    )
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    shown = 0
    for source in (*docs, Path(sweep.__file__), Path(tracking.__file__)):
        lines = [line for line in source.read_text().splitlines() if "mlflow ui --" in line]
        assert all("--host 127.0.0.1" in line for line in lines), (source, lines)
        shown += len(lines) if source in docs else 0
    assert shown >= 2  # the README's tour and the tracking page show the command
