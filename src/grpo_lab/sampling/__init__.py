"""Sampling completions and scoring their log-probs: the two interfaces the GRPO step needs.

``Sampler.sample`` draws G completions per prompt. Scoring given completions under a model (the
training forward) is the policy's: ``grpo_lab.policy.forward.completion_logprobs``.
"""

from grpo_lab.sampling.base import (
    Completions,
    Sampler,
    filter_logits,
    sampling_logp_gap,
    trim_at_eos,
)
from grpo_lab.sampling.generate import GenerateSampler
from grpo_lab.sampling.kv_cache import KVCacheSampler

__all__ = [
    "Completions",
    "GenerateSampler",
    "KVCacheSampler",
    "Sampler",
    "filter_logits",
    "sampling_logp_gap",
    "trim_at_eos",
]
