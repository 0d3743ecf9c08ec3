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


def unordered_pair(prompt: str) -> tuple[str, frozenset[int]]:
    """(op, {a, b}) of "a<op>b=", parsed here so the test does not trust the task's own key."""
    for op in "+-*":
        if op in prompt:
            a, b = prompt.rstrip("=").split(op)
            return op, frozenset((int(a), int(b)))
    raise AssertionError(prompt)


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
@pytest.mark.parametrize("ops", [["+"], ["-"], ["*"], ["+", "-", "*"]])
def test_no_eval_prompt_shares_its_unordered_operand_pair_with_train(ops, seed):
    # 37+45= in eval and 45+37= in train would make "held-out" accuracy partly recall: with
    # a per-prompt split about half the eval prompts of 0..20 have their twin in train.
    task = ArithmeticTask(min_operand=0, max_operand=20, ops=ops, eval_size=101, seed=seed)
    train_pairs = {unordered_pair(e.prompt) for e in task.train()}
    leaked = [e.prompt for e in task.eval() if unordered_pair(e.prompt) in train_pairs]
    assert leaked == []
    assert len(task.eval()) == 101  # odd: a twin pair cannot fill it alone, a square a+a must
    assert len(task.train()) + 101 == len(ops) * 21 * 21


def test_the_default_task_holds_out_whole_pairs():
    # the default experiment's split (conf/task/arithmetic.yaml: 0..99, 1000 held out)
    task = ArithmeticTask(min_operand=0, max_operand=99, eval_size=1000, seed=0)
    train_pairs = {unordered_pair(e.prompt) for e in task.train()}
    assert not [e.prompt for e in task.eval() if unordered_pair(e.prompt) in train_pairs]


def test_eval_size_is_met_exactly_when_only_squares_can_fill_the_last_place():
    # 0..1 with "+": groups {0+0}, {1+1} (one prompt each) and {0+1, 1+0}. Any eval_size
    # from 1 to 3 is reachable by whole groups; the split must find it for every seed.
    for seed in range(20):
        for eval_size in (1, 2, 3):
            task = ArithmeticTask(min_operand=0, max_operand=1, eval_size=eval_size, seed=seed)
            assert len(task.eval()) == eval_size
            train_pairs = {unordered_pair(e.prompt) for e in task.train()}
            assert not [e for e in task.eval() if unordered_pair(e.prompt) in train_pairs]


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
