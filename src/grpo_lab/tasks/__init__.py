"""Tasks: prompt sources with reference answers, split into train and held-out eval."""

from grpo_lab.tasks.arithmetic import ArithmeticTask
from grpo_lab.tasks.base import Example, Task
from grpo_lab.tasks.chat import render_prompts
from grpo_lab.tasks.compare import CompareTask
from grpo_lab.tasks.countdown import CountdownTask
from grpo_lab.tasks.hf import HfTask
from grpo_lab.tasks.jsonl import JsonlTask
from grpo_lab.tasks.reasoning_gym import ReasoningGymTask

__all__ = [
    "ArithmeticTask",
    "CompareTask",
    "CountdownTask",
    "Example",
    "HfTask",
    "JsonlTask",
    "ReasoningGymTask",
    "Task",
    "render_prompts",
]
