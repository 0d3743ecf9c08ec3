"""Decimal comparison with traps: ``"Which is bigger, 9.11 or 9.9?"`` -> ``"9.9"``.

A trap is a pair where a shortcut gives the wrong answer: the smaller number has the longer
decimal part (9.11 < 9.9, 3.45 < 3.5) or is the lexicographically larger string
(9.5 < 10.2 although "9.5" > "10.2"). ``trap_fraction`` of the prompts are traps; the rest
are ordinary pairs on which neither shortcut misleads.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal

from grpo_lab.tasks.base import Example

_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")  # ASCII digits only, as the prompts write them


def _decimals(text: str) -> int:
    return len(text.partition(".")[2])


def trap_kind(a: str, b: str) -> str | None:
    """Which shortcut the pair (a, b) defeats: "decimal_length", "lexicographic" or None."""
    small, big = sorted((a, b), key=Decimal)
    if _decimals(small) > _decimals(big):
        return "decimal_length"
    if small > big:
        return "lexicographic"
    return None


def split_key(a: str, b: str) -> frozenset[Decimal]:
    """The pair a prompt compares, in either order and whatever the notation ("9.9", "9.90")."""
    return frozenset((Decimal(a), Decimal(b)))


def _fmt(integer: int, frac: int, digits: int) -> str:
    return f"{integer}.{frac:0{digits}d}" if digits else str(integer)


class CompareTask:
    """Pairs of decimals with integer parts in [0, max_int] and up to max_decimals digits.

    trap_fraction: share of prompts that are traps (half decimal-length traps, half
    lexicographic ones when max_int >= 10, else all decimal-length).
    The answer is the bigger number's text; a completion's answer is its last number.
    """

    name = "compare"

    def __init__(
        self,
        train_size: int = 5000,
        eval_size: int = 500,
        trap_fraction: float = 0.5,
        max_int: int = 20,
        max_decimals: int = 2,
        template: str = "Which is bigger, {a} or {b}?",
        seed: int = 0,
    ) -> None:
        if not 0.0 <= trap_fraction <= 1.0:
            raise ValueError(
                f"task.trap_fraction={trap_fraction} is invalid; allowed: a number in [0, 1]"
            )
        if max_decimals < 1 or (trap_fraction > 0 and max_decimals < 2):
            raise ValueError(
                f"task.max_decimals={max_decimals} is invalid; allowed: >= 2 when trap_fraction > 0 "
                "(a decimal-length trap needs a 1-digit and a 2-digit decimal), else >= 1"
            )
        if max_int < 1:
            raise ValueError(f"task.max_int={max_int} is invalid; allowed: an integer >= 1")
        if "{a}" not in template or "{b}" not in template:
            raise ValueError(
                f"task.template={template!r} is invalid; it must contain {{a}} and {{b}}"
            )
        if train_size < 1 or eval_size < 1:
            raise ValueError(
                f"task.train_size={train_size}, task.eval_size={eval_size}: both must be >= 1"
            )
        self.max_int, self.max_decimals = max_int, max_decimals
        rng = random.Random(seed)
        total = train_size + eval_size
        n_traps = round(trap_fraction * total)
        kinds = ["decimal_length", "lexicographic"] if max_int >= 10 else ["decimal_length"]
        plan = [kinds[i % len(kinds)] for i in range(n_traps)] + [None] * (total - n_traps)
        rng.shuffle(plan)
        # each pair once, so no eval pair is in train in the other order or as another draw
        seen: set[frozenset[Decimal]] = set()
        examples: list[Example] = []
        for kind in plan:
            for _ in range(1000):
                small, big = self._pair(rng, kind)
                if split_key(small, big) not in seen:
                    break
            else:
                raise ValueError(
                    f"task.train_size + task.eval_size = {total} distinct pairs could not be drawn "
                    f"from max_int={max_int}, max_decimals={max_decimals}; lower the sizes or widen the ranges"
                )
            seen.add(split_key(small, big))
            a, b = (small, big) if rng.random() < 0.5 else (big, small)
            examples.append(
                Example(
                    prompt=template.format(a=a, b=b),
                    answer=big,
                    meta={"a": a, "b": b, "trap": kind},
                )
            )
        self._eval, self._train = examples[:eval_size], examples[eval_size:]

    def _number(self, rng: random.Random, integer: int, digits: int) -> str:
        if digits == 0:
            return str(integer)
        frac = rng.randrange(1, 10**digits)
        while frac % 10 == 0:  # no trailing zero: "3.50" would be a 1-digit decimal
            frac = rng.randrange(1, 10**digits)
        return _fmt(integer, frac, digits)

    def _pair(self, rng: random.Random, kind: str | None) -> tuple[str, str]:
        """(smaller, bigger) texts of the requested trap kind (None = no trap)."""
        D = self.max_decimals
        if kind == "decimal_length":
            integer = rng.randint(0, self.max_int)
            k = rng.randint(1, D - 1)
            big = self._number(rng, integer, k)
            m = rng.randint(k + 1, D)
            limit = int(big.partition(".")[2]) * 10 ** (m - k)  # small's digits < big's, scaled
            frac = rng.randrange(1, limit)
            while frac % 10 == 0:
                frac = rng.randrange(1, limit)
            return _fmt(integer, frac, m), big
        if kind == "lexicographic":
            lead_ok = [i for i in range(10, self.max_int + 1) if int(str(i)[0]) < 9]
            big_int = rng.choice(lead_ok)
            small_int = rng.randint(int(str(big_int)[0]) + 1, 9)
            big = self._number(rng, big_int, rng.randint(0, D))
            small = self._number(rng, small_int, rng.randint(0, D))
            return small, big
        while True:
            x = self._number(rng, rng.randint(0, self.max_int), rng.randint(0, D))
            y = self._number(rng, rng.randint(0, self.max_int), rng.randint(0, D))
            if Decimal(x) != Decimal(y) and trap_kind(x, y) is None:
                return tuple(sorted((x, y), key=Decimal))  # type: ignore[return-value]

    def train(self) -> list[Example]:
        return self._train

    def eval(self) -> list[Example]:
        return self._eval

    def parse_answer(self, completion: str) -> str | None:
        """The last number (ASCII digits) in the completion, or None when it has none."""
        found = _NUMBER.findall(completion)
        return found[-1] if found else None

    def is_correct(self, completion: str, example: Example) -> bool:
        """The last number equals the bigger one in value ("9.90" counts as "9.9")."""
        given = self.parse_answer(completion)
        return given is not None and Decimal(given) == Decimal(example.answer)
