"""Sampling completions and scoring their log-probs: the two interfaces the GRPO step needs.

``Sampler.sample`` draws G completions per prompt; ``completion_logprobs`` scores given
completions under a model. Both are small on purpose: faster implementations (a shared
prompt-prefix KV cache, say) replace them without touching the GRPO module.
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
