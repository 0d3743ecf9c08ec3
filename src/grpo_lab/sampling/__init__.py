"""Sampling completions and scoring their log-probs: the two interfaces the GRPO step needs.

``Sampler.sample`` draws G completions per prompt; ``completion_logprobs`` (``forward.py``)
scores given completions under a model, each row's prompt with it or, with ``group_size``, each
group's prompt once behind a shared KV cache.
"""

from grpo_lab.sampling.base import (
    Completions,
    Sampler,
    completion_logprobs,
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
    "completion_logprobs",
    "filter_logits",
    "sampling_logp_gap",
    "trim_at_eos",
]
