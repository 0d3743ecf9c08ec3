"""Rule-based rewards: exact-match accuracy and format."""

from __future__ import annotations

import re
from typing import Any

from grpo_lab.tasks.base import Example


def accuracy_reward(
    completions: list[str], examples: list[Example], task: Any = None, **_: Any
) -> list[float]:
    """1.0 when the task marks the completion correct, else 0.0.

    Correctness is the task's (``task.is_correct``: e.g. the parsed integer equals the
    answer, or a countdown expression reaches its target with the given numbers); without a
    task, the stripped completion must equal the answer text.
    """
    if task is None:
        return [
            1.0 if c.strip() == ex.answer else 0.0
            for c, ex in zip(completions, examples, strict=True)
        ]
    return [
        1.0 if task.is_correct(c, ex) else 0.0 for c, ex in zip(completions, examples, strict=True)
    ]


def format_reward(
    completions: list[str],
    examples: list[Example],
    pattern: str | None = r"^\s*-?[0-9]+\s*$",
    truncated: list[bool] | None = None,
    task: Any = None,
    **_: Any,
) -> list[float]:
    """1.0 when the completion is well-formed and ended by itself (not truncated).

    Well-formed: fully matches ``pattern``; with ``pattern=None``, the task's own format
    (``task.parse_answer`` finds an answer).
    """
    if pattern is None and task is None:
        raise ValueError(
            "format_reward: pattern=None uses the task's format, but no task was given"
        )
    regex = re.compile(pattern, re.DOTALL) if pattern is not None else None
    truncated = truncated or [False] * len(completions)
    return [
        1.0
        if not cut and (regex.fullmatch(c) if regex else task.parse_answer(c) is not None)
        else 0.0
        for c, cut in zip(completions, truncated, strict=True)
    ]


# R1's completion form: <think> reasoning </think> then <answer> answer </answer>.
R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_R1_FORM = re.compile(r"\s*<think>.*</think>\s*<answer>.*</answer>\s*", re.DOTALL)


def r1_format_reward(completions: list[str], examples: list[Example], **_: Any) -> list[float]:
    """1.0 when a completion has DeepSeek-R1's form, else 0.0.

    The form: ``<think>...</think>`` then ``<answer>...</answer>``, each tag exactly once, with
    only whitespace before ``<think>``, between ``</think>`` and ``<answer>``, and after
    ``</answer>``; anything (empty included) inside the tags. open-r1's ``format_reward``
    checks the same structure with ``^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$``
    under ``re.MULTILINE``; this one lets any whitespace (or none) stand for its newlines,
    and is stricter where that pattern leaks: ``$`` under MULTILINE accepts text after a
    newline that follows ``</answer>``, and ``.*?`` accepts a second ``<answer>`` block.
    Counting the tags first keeps the regex linear on hostile text.
    """
    return [
        1.0
        if all(c.count(tag) == 1 for tag in R1_TAGS) and _R1_FORM.fullmatch(c) is not None
        else 0.0
        for c in completions
    ]
