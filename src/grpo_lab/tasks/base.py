"""The task protocol: what the data module, rewards and SFT need from a task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer.

    prompt: the text the policy continues.
    answer: the reference answer as text (what accuracy compares with).
    demonstration: a reference completion for SFT (defaults to ``answer``).
    meta: task-specific fields handed to reward functions (e.g. countdown's numbers).
    """

    prompt: str
    answer: str
    demonstration: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.demonstration if self.demonstration is not None else self.answer


@runtime_checkable
class Task(Protocol):
    """A source of examples. ``train`` and ``eval`` must not overlap."""

    name: str

    def train(self) -> list[Example]: ...

    def eval(self) -> list[Example]: ...

    def parse_answer(self, completion: str) -> str | None:
        """The answer a completion gives, or None when it gives none in the task's format."""
        ...

    def is_correct(self, completion: str, example: Example) -> bool: ...
