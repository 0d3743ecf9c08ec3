"""Rule-based rewards: exact-match accuracy and format."""

from __future__ import annotations

import re
from typing import Any

from grpo_lab.tasks.base import Example


def accuracy_reward(
    completions: list[str], examples: list[Example], task: Any = None, **_: Any
) -> list[float]:
    """1.0 when the parsed answer equals the reference, else 0.0.

    Parsing is the task's (``task.parse_answer``); without a task, the stripped completion
    must equal the answer text.
    """
    out = []
    for completion, example in zip(completions, examples, strict=True):
        given = task.parse_answer(completion) if task is not None else completion.strip()
        out.append(1.0 if given is not None and given == example.answer else 0.0)
    return out


def format_reward(
    completions: list[str],
    examples: list[Example],
    pattern: str = r"^\s*-?\d+\s*$",
    truncated: list[bool] | None = None,
    **_: Any,
) -> list[float]:
    """1.0 when the completion fully matches ``pattern`` and ended by itself (not truncated)."""
    regex = re.compile(pattern, re.DOTALL)
    truncated = truncated or [False] * len(completions)
    return [
        1.0 if (not cut and regex.fullmatch(c)) else 0.0
        for c, cut in zip(completions, truncated, strict=True)
    ]
