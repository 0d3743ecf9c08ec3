"""Countdown: reach a target from given numbers, ``"Use 3 7 25 to make 66:"`` -> ``"(25-3)*3"``.

Each target is built from a random expression over the numbers, so every prompt is
reachable; that expression is the SFT demonstration. A completion is checked by the safe
parser in ``safe_expr`` (``ast`` over a whitelist, exact fractions), never by ``eval``.
"""

from __future__ import annotations

import random

from grpo_lab.tasks.base import Example
from grpo_lab.tasks.safe_expr import ExprError, evaluate, reaches_target


def _combine(
    rng: random.Random, a: tuple[str, int], b: tuple[str, int], ops: list[str]
) -> tuple[str, int]:
    """One random operation on two sub-expressions, kept to non-negative exact integers."""
    (ea, va), (eb, vb) = a, b
    choices = [
        op for op in ops if op != "/" or (vb != 0 and va % vb == 0) or (va != 0 and vb % va == 0)
    ]
    op = rng.choice(choices)
    if (op == "-" and vb > va) or (op == "/" and (vb == 0 or va % vb)):
        (ea, va), (eb, vb) = (eb, vb), (ea, va)
    wrap = lambda e: e if e.isdigit() else f"({e})"  # noqa: E731
    value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va // vb if vb else 0}[op]
    return f"{wrap(ea)}{op}{wrap(eb)}", value


def split_key(numbers: list[int], target: int) -> tuple[tuple[int, ...], int]:
    """The problem a prompt poses, whatever the order its numbers are listed in."""
    return tuple(sorted(numbers)), target


class CountdownTask:
    """Countdown prompts over ``num_numbers`` numbers drawn from [1, max_number].

    ops: operators the generator uses (a completion may use any of ``+ - * /``).
    use_all: true = every given number exactly once; false = each at most once.
    train_size / eval_size: distinct problems generated. A problem is its multiset of numbers
      and its target (``split_key``): "Use 3 7 25 to make 66:" and "Use 25 3 7 to make 66:"
      are the same problem, so each appears once and never on both sides of the split.
    max_target: largest target kept (expressions giving more, or less than 1, are redrawn).
    """

    name = "countdown"
    OPS = ("+", "-", "*", "/")

    def __init__(
        self,
        num_numbers: int = 4,
        max_number: int = 25,
        ops: tuple[str, ...] | list[str] = ("+", "-", "*", "/"),
        use_all: bool = False,
        train_size: int = 5000,
        eval_size: int = 500,
        max_target: int = 1000,
        seed: int = 0,
    ) -> None:
        unknown = [op for op in ops if op not in self.OPS]
        if unknown or not ops:
            raise ValueError(
                f"task.ops={list(ops)!r} is invalid; allowed: a non-empty subset of {list(self.OPS)}"
            )
        if not 2 <= num_numbers <= 6:
            raise ValueError(f"task.num_numbers={num_numbers} is invalid; allowed: 2 to 6")
        if max_number < 2:
            raise ValueError(f"task.max_number={max_number} is invalid; allowed: an integer >= 2")
        if train_size < 1 or eval_size < 1:
            raise ValueError(
                f"task.train_size={train_size}, task.eval_size={eval_size}: both must be >= 1"
            )
        self.use_all = use_all
        rng = random.Random(seed)
        seen: set[tuple[tuple[int, ...], int]] = set()
        examples: list[Example] = []
        total = train_size + eval_size
        attempts = 0
        while len(examples) < total:
            attempts += 1
            if attempts > 50 * total:
                raise ValueError(
                    f"task.train_size + task.eval_size = {total} distinct countdown prompts could not be "
                    f"generated from num_numbers={num_numbers}, max_number={max_number}, "
                    f"max_target={max_target}; lower the sizes or widen the ranges"
                )
            numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
            k = num_numbers if use_all else rng.randint(2, num_numbers)
            parts = [(str(n), n) for n in rng.sample(numbers, k)]
            while len(parts) > 1:
                a = parts.pop(rng.randrange(len(parts)))
                b = parts.pop(rng.randrange(len(parts)))
                parts.append(_combine(rng, a, b, list(ops)))
            expr, target = parts[0]
            if not 1 <= target <= max_target:
                continue
            key = split_key(numbers, target)
            if key in seen:
                continue
            seen.add(key)
            prompt = f"Use {' '.join(map(str, numbers))} to make {target}:"
            examples.append(
                Example(
                    prompt=prompt,
                    answer=str(target),
                    demonstration=expr,
                    meta={"numbers": numbers, "target": target},
                )
            )
        self._eval, self._train = examples[:eval_size], examples[eval_size:]

    def train(self) -> list[Example]:
        return self._train

    def eval(self) -> list[Example]:
        return self._eval

    def parse_answer(self, completion: str) -> str | None:
        """The value of the completion's expression (first line, an optional ``= ...`` dropped)
        as an integer string, or None when it is not an allowed expression or not an integer."""
        expr = completion.strip().split("\n", 1)[0].split("=", 1)[0]
        try:
            value = evaluate(expr).value
        except ExprError:
            return None
        return str(value.numerator) if value.denominator == 1 else None

    def is_correct(self, completion: str, example: Example) -> bool:
        """The expression reaches the target using the given numbers as ``use_all`` requires."""
        expr = completion.strip().split("\n", 1)[0].split("=", 1)[0]
        return reaches_target(
            expr, example.meta["numbers"], example.meta["target"], use_all=self.use_all
        )
