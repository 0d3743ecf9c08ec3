"""Tasks: countdown (and its safe parser), compare, jsonl; one CLI run per task option."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from decimal import Decimal
from fractions import Fraction

import pytest
from mlflow import MlflowClient

from grpo_lab.tasks import CompareTask, CountdownTask, Example, JsonlTask, Task
from grpo_lab.tasks.compare import trap_kind
from grpo_lab.tasks.safe_expr import ExprError, evaluate, reaches_target
from helpers import FAST

# FAST without its arithmetic-only keys, and one rollout: the runs check wiring, not learning.
FAST_ANY_TASK = [o for o in FAST if not o.startswith(("task.", "train.rollouts="))] + [
    "train.rollouts=1"
]


# ---------------------------------------------------------------- safe expression parser


@pytest.mark.parametrize(
    ("text", "value", "numbers"),
    [
        ("(25-3)*7/2", Fraction(77), (25, 3, 7, 2)),
        ("50 + 25", Fraction(75), (50, 25)),
        ("-(3-10)", Fraction(7), (3, 10)),
        ("7/2", Fraction(7, 2), (7, 2)),
        ("((4))", Fraction(4), (4,)),
    ],
)
def test_safe_expr_computes_exact_values(text, value, numbers):
    result = evaluate(text)
    assert result.value == value
    assert result.numbers == numbers


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",  # call and name
        "x + 1",  # unknown name
        "(3).real",  # attribute access
        "2**100000",  # no exponent at all
        "[1, 2][0]",  # subscript
        "0x19",  # 25 in hex: literals must be plain decimal
        "1_000",
        "3.5 + 1",  # float literal
        "True + 1",
        "+3",  # only unary minus
        "7 // 2",
        "1; 2",
        "",
        "9" * 13,  # literal longer than 12 digits
        "1+" * 200 + "1",  # over the length limit
    ],
)
def test_safe_expr_rejects_anything_outside_the_whitelist(text):
    with pytest.raises(ExprError):
        evaluate(text)


def test_safe_expr_division_by_zero_is_an_error_not_a_crash():
    with pytest.raises(ExprError, match="division by zero"):
        evaluate("5/(3-3)")
    assert reaches_target("5/(3-3)", [5, 3, 3], 5) is False


def test_safe_expr_bounds_intermediate_values():
    with pytest.raises(ExprError, match="exceeds"):
        evaluate("999999999*999999999*999999999", max_abs=10**15)


def test_reaches_target_counts_each_given_number_at_most_once():
    # 25 - 3 = 22, 22 * 7 = 154, 154 / 2 = 77
    assert reaches_target("(25-3)*7/2", [2, 3, 7, 25], 77)
    assert not reaches_target("(25-3)*7/2", [2, 3, 7, 25], 78)  # wrong value
    assert not reaches_target("7*7+28", [7, 28, 3], 77)  # 7 used twice, given once
    assert reaches_target("7*7+28", [7, 7, 28], 77)  # given twice: fine
    assert not reaches_target("25+50+2", [25, 50], 77)  # 2 not given
    assert reaches_target("50+25", [3, 7, 25, 50], 75)  # at most once: 3 and 7 unused
    assert not reaches_target("50+25", [3, 7, 25, 50], 75, use_all=True)
    assert reaches_target("50+25+(7-3)*0", [3, 7, 25, 50, 0], 75, use_all=True)
    assert not reaches_target("import os", [1], 1)


# ---------------------------------------------------------------- countdown


def test_countdown_prompts_are_reachable_by_their_demonstrations():
    task = CountdownTask(num_numbers=4, max_number=25, train_size=300, eval_size=50, seed=3)
    assert isinstance(task, Task)
    assert len(task.train()) == 300 and len(task.eval()) == 50
    for ex in task.train() + task.eval():
        numbers, target = ex.meta["numbers"], ex.meta["target"]
        assert ex.prompt == f"Use {' '.join(map(str, numbers))} to make {target}:"
        assert ex.answer == str(target)
        assert 1 <= target <= 1000
        assert task.is_correct(ex.demonstration, ex), ex
    assert not {ex.prompt for ex in task.train()} & {ex.prompt for ex in task.eval()}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_countdown_eval_problems_are_not_in_train_in_another_order(seed):
    # "Use 3 7 25 to make 66:" and "Use 25 3 7 to make 66:" pose the same problem. Small
    # numbers make such reorderings common enough that every seed draws some.
    task = CountdownTask(num_numbers=3, max_number=6, train_size=400, eval_size=100, seed=seed)

    def problem(ex):
        numbers, target = ex.prompt.removeprefix("Use ").removesuffix(":").split(" to make ")
        return tuple(sorted(int(n) for n in numbers.split())), int(target)

    train_problems = {problem(ex) for ex in task.train()}
    assert not [ex.prompt for ex in task.eval() if problem(ex) in train_problems]
    assert len({problem(ex) for ex in task.train()}) == len(task.train())


def test_countdown_use_all_demonstrations_use_every_number_once():
    task = CountdownTask(num_numbers=3, max_number=9, use_all=True, train_size=60, eval_size=10)
    for ex in task.train():
        assert sorted(evaluate(ex.demonstration).numbers) == sorted(ex.meta["numbers"])
        assert task.is_correct(ex.demonstration, ex)


def test_countdown_is_deterministic_in_its_seed():
    a = CountdownTask(train_size=50, eval_size=10, seed=1)
    b = CountdownTask(train_size=50, eval_size=10, seed=1)
    c = CountdownTask(train_size=50, eval_size=10, seed=2)
    assert [e.prompt for e in a.train()] == [e.prompt for e in b.train()]
    assert [e.prompt for e in a.train()] != [e.prompt for e in c.train()]


def test_countdown_scores_completions_by_the_rules():
    task = CountdownTask(train_size=5, eval_size=1)
    ex = Example(
        prompt="Use 3 7 25 50 to make 75:",
        answer="75",
        meta={"numbers": [3, 7, 25, 50], "target": 75},
    )
    assert task.is_correct("50+25", ex)
    assert task.is_correct(" 50 + 25 = 75\nbecause", ex)  # "= result" and later lines ignored
    assert not task.is_correct("50/(7-3+3)*7+25", ex)  # = 50/7*7 + 25 = 75, but 7 and 3 reused
    assert not task.is_correct("75", ex)  # 75 is not a given number
    assert not task.is_correct("50+25+3-3", ex)  # 3 reused
    assert not task.is_correct("50+25+__import__('os').getpid()*0", ex)
    assert not task.is_correct("50/(7-7)", ex)
    assert task.parse_answer("(25-3)*7/2") == "77"
    assert task.parse_answer("7/2") is None  # not an integer
    assert task.parse_answer("so the answer is 5") is None


def test_countdown_rejects_bad_config():
    with pytest.raises(ValueError, match=r"task.ops=\['\*\*'\].*allowed"):
        CountdownTask(ops=["**"])
    with pytest.raises(ValueError, match="task.num_numbers=1"):
        CountdownTask(num_numbers=1)


# ---------------------------------------------------------------- compare


@pytest.mark.parametrize(
    ("a", "b", "kind"),
    [
        ("9.11", "9.9", "decimal_length"),
        ("3.45", "3.5", "decimal_length"),
        ("9.5", "10.2", "lexicographic"),  # "9.5" > "10.2" as strings
        ("2.5", "7.25", None),
        ("12.3", "12.4", None),
    ],
)
def test_trap_kind_names_the_shortcut_a_pair_defeats(a, b, kind):
    assert trap_kind(a, b) == kind
    assert trap_kind(b, a) == kind


def test_compare_has_the_configured_share_of_traps():
    task = CompareTask(train_size=180, eval_size=20, trap_fraction=0.3, seed=5)
    examples = task.train() + task.eval()
    traps = [ex for ex in examples if ex.meta["trap"]]
    assert len(traps) == 60  # 0.3 * 200
    assert {ex.meta["trap"] for ex in traps} == {"decimal_length", "lexicographic"}
    for ex in examples:
        a, b = ex.meta["a"], ex.meta["b"]
        assert ex.prompt == f"Which is bigger, {a} or {b}?"
        assert ex.answer == max(a, b, key=float)
        assert (trap_kind(a, b) is not None) == bool(ex.meta["trap"])
    pairs = [frozenset((ex.meta["a"], ex.meta["b"])) for ex in examples]
    assert len(set(pairs)) == len(pairs)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_compare_eval_pairs_are_not_in_train_in_any_order_or_notation(seed):
    # a narrow range (integer parts 0..3) so that redrawn pairs are frequent
    task = CompareTask(train_size=400, eval_size=100, max_int=3, max_decimals=2, seed=seed)

    def pair(ex):
        return frozenset(Decimal(n) for n in re.findall(r"\d+(?:\.\d+)?", ex.prompt))

    train_pairs = {pair(ex) for ex in task.train()}
    assert not [ex.prompt for ex in task.eval() if pair(ex) in train_pairs]


def test_compare_reads_the_last_number():
    task = CompareTask(train_size=5, eval_size=1)
    ex = Example(prompt="Which is bigger, 9.11 or 9.9?", answer="9.9")
    assert task.parse_answer("9.11 has more digits, but 9.9 is bigger") == "9.9"
    assert task.is_correct("9.11 has more digits, but 9.9 is bigger", ex)
    assert task.is_correct("9.90", ex)  # equal in value
    assert not task.is_correct("9.9 or 9.11? I say 9.11", ex)
    assert task.parse_answer("no idea") is None and not task.is_correct("no idea", ex)


def test_compare_rejects_bad_config():
    with pytest.raises(ValueError, match="task.trap_fraction=1.5"):
        CompareTask(trap_fraction=1.5)
    with pytest.raises(ValueError, match="task.max_decimals=1"):
        CompareTask(max_decimals=1)


# ---------------------------------------------------------------- jsonl


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_reads_configured_fields_and_holds_out_a_seeded_fraction(tmp_path):
    records = [{"q": f"{i}+1=", "a": i + 1, "why": f"{i}+1={i + 1}"} for i in range(20)]
    path = _write_jsonl(tmp_path / "data.jsonl", records)
    task = JsonlTask(
        str(path),
        eval_fraction=0.25,
        prompt_field="q",
        answer_field="a",
        demonstration_field="why",
        seed=0,
    )
    assert len(task.eval()) == 5 and len(task.train()) == 15
    prompts = [e.prompt for e in task.train() + task.eval()]
    assert sorted(prompts) == sorted(r["q"] for r in records)
    ex = next(e for e in task.train() + task.eval() if e.prompt == "4+1=")
    assert ex.answer == "5" and ex.target == "4+1=5"
    again = JsonlTask(str(path), eval_fraction=0.25, prompt_field="q", answer_field="a", seed=0)
    assert [e.prompt for e in again.eval()] == [e.prompt for e in task.eval()]
    assert task.is_correct(" 5 ", ex) and not task.is_correct("6", ex)


def test_jsonl_eval_file_and_answer_pattern(tmp_path):
    train = _write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": "p1", "answer": "x"}, {"prompt": "p2", "answer": "y"}]
    )
    test = _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "p3", "answer": "42"}])
    task = JsonlTask(
        str(train), eval_path=str(test), answer_pattern=r"answer: (\d+)", system_prompt="Be brief."
    )
    assert [e.prompt for e in task.train()] == ["p1", "p2"]
    assert [e.prompt for e in task.eval()] == ["p3"]
    assert task.system_prompt == "Be brief."
    assert task.parse_answer("answer: 7, no wait, answer: 42") == "42"
    assert task.is_correct("answer: 42", task.eval()[0])
    assert task.parse_answer("42") is None


def test_jsonl_error_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "solution": "2"}\n')
    with pytest.raises(ValueError) as err:
        JsonlTask(str(path))
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "'answer'" in msg and "task.answer_field" in msg
    path.write_text('{"prompt": "a", "answer": "1"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        JsonlTask(str(path))
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(ValueError, match=r"suffix '.csv'; allowed: .jsonl"):
        JsonlTask(str(csv))


def test_jsonl_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(
        pa.table({"prompt": ["a", "b", "c", "d"], "answer": ["1", "2", None, "4"]}), path
    )
    with pytest.raises(ValueError, match=r"data.parquet, row 3: record has no field 'answer'"):
        JsonlTask(str(path))
    pq.write_table(pa.table({"prompt": ["a", "b", "c", "d"], "answer": [1, 2, 3, 4]}), path)
    task = JsonlTask(str(path), eval_fraction=0.5)
    assert sorted((e.prompt, e.answer) for e in task.train() + task.eval()) == [
        ("a", "1"),
        ("b", "2"),
        ("c", "3"),
        ("d", "4"),
    ]


def test_jsonl_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install grpo-lab\[parquet\]"):
        JsonlTask(str(path))


# ---------------------------------------------------------------- one training run per task option
# countdown and compare train in tests/test_rewards_extra.py, in the runs that log the rewards.


def _metrics(tracking_uri: str) -> dict[str, float]:
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("grpo_lab").experiment_id])
    assert run.info.status == "FINISHED"
    return run.data.metrics


@pytest.mark.slow
def test_cli_trains_on_jsonl_with_field_names(run_cli, tracking_uri, tmp_path):
    records = [
        {"question": f"{i}+{j}=", "solution": str(i + j)} for i in range(5) for j in range(5)
    ]
    path = _write_jsonl(tmp_path / "sums.jsonl", records)
    run_cli(
        "train",
        *FAST_ANY_TASK,
        "task=jsonl",
        f"task.path={path}",
        "task.prompt_field=question",
        "task.answer_field=solution",
        "task.eval_fraction=0.3",
        "sft.steps=3",
    )
    m = _metrics(tracking_uri)
    assert 0.0 <= m["eval/accuracy"] <= 1.0
    assert "rewards/accuracy/mean" in m


USER_TASK = '''
from grpo_lab.tasks import Example


class EchoTask:
    """Repeat the letter: "say q:" -> "q"."""

    name = "echo"

    def __init__(self, letters="abcdefghijklmnop", eval_size=4):
        examples = [Example(prompt=f"say {c}:", answer=c) for c in letters]
        self._eval, self._train = examples[:eval_size], examples[eval_size:]

    def train(self):
        return self._train

    def eval(self):
        return self._eval

    def parse_answer(self, completion):
        return completion.strip() or None

    def is_correct(self, completion, example):
        return self.parse_answer(completion) == example.answer
'''


@pytest.mark.slow
def test_cli_trains_on_a_task_from_the_users_own_module(run_cli, tracking_uri, tmp_path):
    (tmp_path / "my_task.py").write_text(textwrap.dedent(USER_TASK))
    run_cli(
        "train",
        *FAST_ANY_TASK,
        "task=custom",
        "task._target_=my_task.EchoTask",
        "+task.eval_size=6",
        "sft.steps=3",
        "reward=[accuracy]",
        env={"PYTHONPATH": str(tmp_path)},
    )
    m = _metrics(tracking_uri)
    assert 0.0 <= m["eval/accuracy"] <= 1.0 and "rewards/accuracy/mean" in m
