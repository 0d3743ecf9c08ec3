"""Reward functions and their weighted combination.

A reward function is any callable
    fn(completions: list[str], examples: list[Example], **ctx) -> list[float | None]
returning one score per completion; None means "not applicable" and is left out of that
function's mean (as in TRL) and counts as 0 in the weighted sum.

``ctx`` always holds: task (the Task), truncated (list[bool], no EOS within max_new_tokens),
lengths (list[int], completion tokens including EOS), max_new_tokens (int). Functions take
what they need and accept ``**_`` for the rest.
"""

from grpo_lab.rewards.basic import accuracy_reward, format_reward, r1_format_reward
from grpo_lab.rewards.combine import RewardError, RewardFunction, RewardSet
from grpo_lab.rewards.length import length_penalty, overlong_penalty
from grpo_lab.rewards.math_verify import MathVerifyReward
from grpo_lab.rewards.model import EmbeddingSimilarity, RewardModel
from grpo_lab.tasks.reasoning_gym import reasoning_gym_reward

__all__ = [
    "EmbeddingSimilarity",
    "MathVerifyReward",
    "RewardError",
    "RewardFunction",
    "RewardModel",
    "RewardSet",
    "accuracy_reward",
    "format_reward",
    "length_penalty",
    "overlong_penalty",
    "r1_format_reward",
    "reasoning_gym_reward",
]
