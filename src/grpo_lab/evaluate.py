"""Scoring a policy: greedy accuracy (and, for ``grpo-lab eval``, pass@k)."""

from __future__ import annotations

import torch

from grpo_lab.policy.build import Policy
from grpo_lab.tasks.base import Example, Task


@torch.no_grad()
def greedy_accuracy(policy: Policy, examples: list[Example], task: Task, sampler, batch_size: int = 256) -> float:
    """Fraction of examples whose greedy completion the task marks correct."""
    model, tok = policy.model, policy.tokenizer
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        enc = tok([ex.prompt for ex in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        comp = sampler.sample(model, enc["input_ids"], enc["attention_mask"], 1, greedy=True)
        texts = tok.batch_decode(comp.completion_ids, skip_special_tokens=True)
        correct += sum(task.is_correct(t, ex) for t, ex in zip(texts, batch))
    return correct / max(1, len(examples))
