"""Tasks: prompt sources with reference answers, split into train and held-out eval."""

from grpo_lab.tasks.base import Example, Task
from grpo_lab.tasks.arithmetic import ArithmeticTask

__all__ = ["ArithmeticTask", "Example", "Task"]
