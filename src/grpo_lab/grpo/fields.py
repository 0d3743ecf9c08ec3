"""Ranges of the algorithm parts' fields, kept in dataclass field metadata.

A part's dataclass is its schema: ``config.validate`` reads each field's type and range from here
and names the key, the value and what is allowed; ``check`` applies the same ranges when a part is
built by hand, so a part never holds a value its config would refuse.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
from dataclasses import field
from typing import Any


@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric value's type (``integer`` or any number) and range; ``config.RULES`` bounds the
    other numeric keys of ``conf/`` with it too.

    ge/gt: lower limit, inclusive/exclusive; le/lt: upper limit (None = no limit on that side).
    nullable: null is allowed; special: values allowed outside the range (-1 = no limit);
    infinite: inf (not NaN) is meaningful (e.g. no upper clip); why: what an end or a special
    value means, shown after the range in an error.
    """

    integer: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    nullable: bool = False
    special: tuple[int, ...] = ()
    infinite: bool = False
    why: str = ""

    def __call__(self, v: Any) -> bool:
        if v is None:
            return self.nullable
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return False
        if self.integer and not isinstance(v, numbers.Integral):
            return False
        if math.isnan(v) or (math.isinf(v) and not self.infinite):
            return False
        if v in self.special:
            return True
        return (
            (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
        )

    @property
    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a number"
        lo = self.ge if self.ge is not None else self.gt
        hi = self.le if self.le is not None else self.lt
        if lo is not None and hi is not None:
            left, right = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
            text = f"{kind} in {left}{_fmt(lo)}, {_fmt(hi)}{right}"
        elif lo is not None:
            text = f"{kind} {'>=' if self.ge is not None else '>'} {_fmt(lo)}"
        elif hi is not None:
            text = f"{kind} {'<=' if self.le is not None else '<'} {_fmt(hi)}"
        else:
            text = kind
        if self.special:
            text += " or " + " or ".join(_fmt(s) for s in self.special)
        if self.nullable:
            text = "null or " + text
        return f"{text} ({self.why})" if self.why else text


def _fmt(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Choice:
    """A string field with a fixed set of values."""

    options: tuple[str, ...]

    def __call__(self, v: Any) -> bool:
        return v in self.options

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(self.options)


class Lazy:
    """A module imported on first use. The parts' modules reach torch and ``objective`` through
    it: ``config.validate`` reads the parts' dataclasses (their fields are the config schema)
    before torch is imported, so that a typo fails in a second."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


def ranged(default: Any, rule: Range | Choice) -> Any:
    """A dataclass field with a default and the rule its values must meet."""
    return field(default=default, metadata={"rule": rule})


def rule_of(f: dataclasses.Field) -> Range | Choice | None:
    return f.metadata.get("rule")


def errors(part: Any, prefix: str) -> list[str]:
    """``prefix.field=value is invalid: expected ...`` for each field of ``part`` out of range."""
    out = []
    for f in dataclasses.fields(part):
        rule = rule_of(f)
        value = getattr(part, f.name)
        if rule is not None and not rule(value):
            out.append(f"{prefix}{f.name}={value!r} is invalid: expected {rule.allowed}")
    return out


def check(part: Any, prefix: str) -> None:
    """Raise ValueError when a part built by hand holds a value its config would refuse."""
    found = errors(part, prefix)
    if found:
        raise ValueError("; ".join(found))
