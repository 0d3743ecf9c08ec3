"""The GRPO algorithm: typed parts (advantages, kl, surrogates, aggregation, corrections), the
loss they make, how a rollout is batched, and ``step.py``, the recipe that runs them."""
