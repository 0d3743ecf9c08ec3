"""The arithmetic task: a seeded train / eval split of every operand pair."""

from __future__ import annotations

import operator

import pytest

from grpo_lab.tasks import ArithmeticTask, Example, Task

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def all_examples(lo: int, hi: int, ops: str) -> dict[str, str]:
    """prompt -> answer for every (a, op, b), computed independently of the task."""
    return {
        f"{a}{op}{b}=": str(OPS[op](a, b))
        for op in ops
        for a in range(lo, hi + 1)
        for b in range(lo, hi + 1)
    }


def test_train_and_eval_are_disjoint_and_together_cover_every_pair():
    task = ArithmeticTask(min_operand=0, max_operand=9, ops=["+", "-", "*"], eval_size=40, seed=3)
    assert isinstance(task, Task)
    train = [(e.prompt, e.answer) for e in task.train()]
    held_out = [(e.prompt, e.answer) for e in task.eval()]
    assert len(held_out) == 40
    assert len(train) + len(held_out) == 3 * 10 * 10
    assert not {p for p, _ in train} & {p for p, _ in held_out}
    assert dict(train + held_out) == all_examples(0, 9, "+-*")


def test_split_is_fixed_by_the_seed():
    first = ArithmeticTask(max_operand=9, eval_size=20, seed=0)
    again = ArithmeticTask(max_operand=9, eval_size=20, seed=0)
    other = ArithmeticTask(max_operand=9, eval_size=20, seed=1)
    assert [e.prompt for e in first.eval()] == [e.prompt for e in again.eval()]
    assert {e.prompt for e in first.eval()} != {e.prompt for e in other.eval()}


def test_is_correct_uses_the_integer_parser():
    task = ArithmeticTask(min_operand=3, max_operand=5, eval_size=1)
    example = next(e for e in task.train() + task.eval() if e.prompt == "4+5=")
    assert example.answer == "9"
    assert task.is_correct(" 9\n", example)
    assert not task.is_correct("9 ", Example(prompt="4+5=", answer="10"))
    assert not task.is_correct("nine", example)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"ops": ["+", "/"]}, "task.ops"),
        ({"max_operand": 9, "eval_size": 100}, "task.eval_size"),
        ({"max_operand": 9, "eval_size": 0}, "task.eval_size"),
        ({"min_operand": 5, "max_operand": 4}, "task.max_operand"),
    ],
)
def test_bad_config_raises_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ArithmeticTask(**kwargs)


def test_unknown_op_error_lists_the_allowed_ops():
    with pytest.raises(ValueError, match=r"\['/'\]; allowed: \['\+', '-', '\*'\]"):
        ArithmeticTask(ops=["/"])
