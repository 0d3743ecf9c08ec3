"""Synthetic integer arithmetic: ``"37+45="`` -> ``"82"``.

Every operand pair is enumerated once and split into train and held-out eval by a seeded
permutation, so eval prompts are never seen in SFT or GRPO.
"""

from __future__ import annotations

import random
import re

from grpo_lab.tasks.base import Example

_INT = re.compile(r"-?\d+")


def parse_int_answer(completion: str) -> str | None:
    """The integer a completion states, or None.

    The format is the bare integer (optionally signed, surrounding spaces ignored); anything
    else, e.g. ``"8 2"`` or ``"82abc"``, gives None. Model text is only matched, never run.
    """
    text = completion.strip()
    return str(int(text)) if _INT.fullmatch(text) else None


class ArithmeticTask:
    """Integer arithmetic over operands in [min_operand, max_operand].

    ops: operators drawn from ``+ - *``; each (a, op, b) appears once.
    eval_size: how many examples are held out for eval (taken before train).
    """

    name = "arithmetic"
    OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

    def __init__(
        self,
        min_operand: int = 0,
        max_operand: int = 99,
        ops: tuple[str, ...] | list[str] = ("+",),
        eval_size: int = 500,
        seed: int = 0,
    ) -> None:
        unknown = [op for op in ops if op not in self.OPS]
        if unknown:
            raise ValueError(f"task.ops={list(ops)!r} has {unknown}; allowed: {list(self.OPS)}")
        if max_operand < min_operand:
            raise ValueError(
                f"task.max_operand={max_operand} is below task.min_operand={min_operand}"
            )
        examples = [
            Example(prompt=f"{a}{op}{b}=", answer=str(self.OPS[op](a, b)))
            for op in ops
            for a in range(min_operand, max_operand + 1)
            for b in range(min_operand, max_operand + 1)
        ]
        if not 0 < eval_size < len(examples):
            raise ValueError(
                f"task.eval_size={eval_size} must be between 1 and {len(examples) - 1} "
                f"(the task has {len(examples)} examples)"
            )
        random.Random(seed).shuffle(examples)
        self._eval, self._train = examples[:eval_size], examples[eval_size:]

    def train(self) -> list[Example]:
        return self._train

    def eval(self) -> list[Example]:
        return self._eval

    def parse_answer(self, completion: str) -> str | None:
        return parse_int_answer(completion)

    def is_correct(self, completion: str, example: Example) -> bool:
        return self.parse_answer(completion) == example.answer
