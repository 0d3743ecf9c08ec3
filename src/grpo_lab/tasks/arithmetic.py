"""Synthetic integer arithmetic: ``"37+45="`` -> ``"82"``.

Every operand pair is enumerated once and split into train and held-out eval by a seeded
permutation of *unordered* pairs: ``37+45=`` and ``45+37=`` always land on the same side, so
neither an eval prompt nor its commuted twin is seen in SFT or GRPO.
"""

from __future__ import annotations

import random
import re

from grpo_lab.tasks.base import Example

_INT = re.compile(r"-?[0-9]+")  # ASCII digits only: "\u0668\u0662" (Arabic-Indic 82) is not 82


def parse_int_answer(completion: str) -> str | None:
    """The integer a completion states, in canonical form ("007" -> "7", "-0" -> "0"), or None.

    The format is the bare integer in ASCII digits (optionally signed, surrounding spaces
    ignored); anything else, e.g. ``"8 2"`` or ``"82abc"``, gives None. Model text is only
    matched, never run. The canonical form is made from the text, not with ``int()``, which
    raises past 4300 digits and takes quadratic time on long digit strings.
    """
    text = completion.strip()
    if not _INT.fullmatch(text):
        return None
    negative = text.startswith("-")
    digits = text.lstrip("-").lstrip("0")
    if not digits:
        return "0"
    return f"-{digits}" if negative else digits


def carry_free_sum(a: int, b: int) -> int:
    """a + b with every carry dropped (digit-wise sum mod 10): 38+45 -> 73, not 83.

    The classic mistake of someone who has not learned to carry; used to make flawed
    demonstrations that a verifier-based reward can correct.
    """
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


class ArithmeticTask:
    """Integer arithmetic over operands in [min_operand, max_operand].

    ops: operators drawn from ``+ - *``; each (a, op, b) appears once.
    eval_size: how many examples are held out for eval. The split is by ``split_key``
      (operator and unordered operand pair), so ``a+b=`` and ``b+a=`` (and ``a-b=``,
      ``b-a=``, which differ only in sign) are both in train or both in eval.
    flawed_demo_fraction: fraction of training examples whose SFT demonstration of an
      addition drops its carries (``carry_free_sum``). It models imperfect SFT data: the
      warm start learns the mistake and GRPO, whose reward checks the true answer, has to
      unlearn it. Answers (what rewards and eval check) are always correct; 0 = clean demos.
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
        flawed_demo_fraction: float = 0.0,
    ) -> None:
        if not 0.0 <= flawed_demo_fraction <= 1.0:
            raise ValueError(f"task.flawed_demo_fraction={flawed_demo_fraction} must be in [0, 1]")
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
        rng = random.Random(seed)
        self._eval, self._train = _split_by_key(examples, eval_size, rng)
        if flawed_demo_fraction:
            self._train = [
                _with_flawed_demo(ex) if rng.random() < flawed_demo_fraction else ex
                for ex in self._train
            ]

    def train(self) -> list[Example]:
        return self._train

    def eval(self) -> list[Example]:
        return self._eval

    def parse_answer(self, completion: str) -> str | None:
        return parse_int_answer(completion)

    def is_correct(self, completion: str, example: Example) -> bool:
        return self.parse_answer(completion) == example.answer


def split_key(prompt: str) -> tuple[str, int, int]:
    """(op, smaller operand, larger operand): the key that train and eval must not share."""
    a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", prompt).groups()
    return op, min(int(a), int(b)), max(int(a), int(b))


def _split_by_key(
    examples: list[Example], eval_size: int, rng: random.Random
) -> tuple[list[Example], list[Example]]:
    """(eval, train): whole groups of ``split_key`` go to eval, in a seeded order, until it
    holds exactly ``eval_size`` examples.

    A group has 2 examples (a+b, b+a) or 1 (a+a). A pair that would overshoot goes to
    train and a later single fills the last place; if every single was already taken, one
    of them is traded back for a pair, which always exists because train is not empty.
    """
    groups: dict[tuple[str, int, int], list[Example]] = {}
    for ex in examples:
        groups.setdefault(split_key(ex.prompt), []).append(ex)
    order = list(groups.values())
    rng.shuffle(order)
    held, kept, room = [], [], eval_size
    for group in order:
        if len(group) <= room:
            held.append(group)
            room -= len(group)
        else:
            kept.append(group)
    if room:  # room == 1: every single is in eval and only pairs are left in train
        single = next(g for g in reversed(held) if len(g) == 1)
        pair = next(g for g in kept if len(g) == 2)
        held.remove(single)
        kept.remove(pair)
        held.append(pair)
        kept.append(single)
    held_out, train = [ex for g in held for ex in g], [ex for g in kept for ex in g]
    # twins would otherwise sit side by side, and a prefix of eval (train.eval_size) would
    # hold fewer distinct pairs than it could
    rng.shuffle(held_out)
    rng.shuffle(train)
    return held_out, train


def _with_flawed_demo(ex: Example) -> Example:
    a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", ex.prompt).groups()
    if op != "+":
        return ex
    return Example(
        prompt=ex.prompt,
        answer=ex.answer,
        demonstration=str(carry_free_sum(int(a), int(b))),
        meta=ex.meta,
    )
