"""A safe parser for integer arithmetic written by a model: never ``eval``.

The text is parsed with ``ast`` and walked over a whitelist: decimal integer literals,
binary ``+ - * /``, unary minus and parentheses. Anything else (names, calls, attributes,
``**``, subscripts, ``0x19``, ``1_000``) is rejected. Values are ``Fraction`` so division is
exact; dividing by zero, oversized input and oversized values raise ``ExprError``.
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class ExprError(ValueError):
    """The text is not an allowed expression, or its value cannot be computed."""


@dataclass(frozen=True)
class Evaluated:
    """value: the exact value; numbers: the integer literals used, in reading order."""

    value: Fraction
    numbers: tuple[int, ...]


def evaluate(
    text: str,
    *,
    max_chars: int = 256,
    max_nodes: int = 64,
    max_digits: int = 12,
    max_abs: int = 10**15,
) -> Evaluated:
    """Parse and compute ``text`` over the whitelist.

    max_chars: longest text accepted; max_nodes: most AST nodes; max_digits: longest literal;
    max_abs: largest magnitude any intermediate value may reach. Raises ExprError otherwise.
    """
    if len(text) > max_chars:
        raise ExprError(f"expression is {len(text)} characters; at most {max_chars} allowed")
    if "\n" in text.strip():
        raise ExprError("expression must be on one line")
    source = text.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise ExprError(f"not an expression: {err}") from None
    n_nodes = sum(1 for _ in ast.walk(tree))
    if n_nodes > max_nodes:
        raise ExprError(f"expression has {n_nodes} syntax nodes; at most {max_nodes} allowed")
    numbers: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant):
            literal = ast.get_source_segment(source, node) or ""
            if type(node.value) is not int or not literal.isascii() or not literal.isdigit():
                raise ExprError(f"only decimal integer literals are allowed, got {literal!r}")
            if len(literal) > max_digits:
                raise ExprError(f"literal {literal[:20]}... has more than {max_digits} digits")
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ExprError("division by zero")
            value = _BINOPS[type(node.op)](left, right)
            if abs(value) > max_abs:
                raise ExprError(f"an intermediate value exceeds {max_abs} in magnitude")
            return value
        what = (
            type(node.op).__name__
            if isinstance(node, (ast.BinOp, ast.UnaryOp))
            else type(node).__name__
        )
        raise ExprError(
            f"{what} is not allowed; allowed: integers, + - * /, unary minus, parentheses"
        )

    value = walk(tree.body)
    return Evaluated(value=value, numbers=tuple(numbers))


def uses_numbers(used: Iterable[int], given: Iterable[int], *, use_all: bool) -> bool:
    """Whether ``used`` draws each given number at most once (``use_all``: exactly once)."""
    used_c, given_c = Counter(used), Counter(given)
    if use_all:
        return used_c == given_c
    return all(given_c[n] >= k for n, k in used_c.items())


def reaches_target(
    text: str, numbers: Iterable[int], target: int, *, use_all: bool = False
) -> bool:
    """True when ``text`` is an allowed expression over ``numbers`` whose value is ``target``.

    Anything unparsable, disallowed or undefined (e.g. division by zero) is simply not correct.
    """
    try:
        result = evaluate(text)
    except ExprError:
        return False
    return result.value == target and uses_numbers(result.numbers, numbers, use_all=use_all)
