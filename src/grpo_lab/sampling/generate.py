"""Sampling with transformers' ``generate``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from grpo_lab.sampling.base import (
    Completions,
    SamplingSettings,
    trim_at_eos,
    trim_at_stop_strings,
)


class GenerateSampler(SamplingSettings):
    """Ancestral sampling through ``model.generate`` with its KV cache.

    temperature, top_k (0 = off), top_p (1.0 = off), min_p (0 = off), max_new_tokens,
    stop_strings (end a completion at the token that completes the first of these strings;
    such a completion is not truncated; needs the tokenizer, which the module sets).
    """

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        num_samples: int,
        *,
        greedy: bool = False,
    ) -> Completions:
        config = model.generation_config
        eos, pad = config.eos_token_id, config.pad_token_id
        if isinstance(eos, list):
            eos = eos[0]
        if pad is None:
            pad = eos
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            num_return_sequences=num_samples,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        if greedy:
            # generate refuses num_return_sequences > 1 without sampling; every copy of a
            # greedy completion is the same, so decode once and repeat the rows below.
            kwargs.update(
                do_sample=False, temperature=None, top_k=None, top_p=None, num_return_sequences=1
            )
        else:
            kwargs.update(
                do_sample=True,
                temperature=self.temperature,
                top_k=self.top_k or None,
                top_p=self.top_p if self.top_p < 1 else None,
                min_p=self.min_p or None,
            )
        if self.stop_strings:
            kwargs.update(stop_strings=self.stop_strings, tokenizer=self.tokenizer)
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
        raw = out[:, prompt_ids.shape[1] :]
        if greedy:
            raw = raw.repeat_interleave(num_samples, dim=0)
        ids, mask, truncated = trim_at_eos(raw, eos, pad)
        if self.stop_strings:
            # generate pads a row that hit a stop string; cut it at the stop string instead.
            ids, mask, truncated = trim_at_stop_strings(
                ids, mask, truncated, self.tokenizer, self.stop_strings, pad
            )
        return Completions(
            prompt_ids=prompt_ids.repeat_interleave(num_samples, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(num_samples, dim=0),
            completion_ids=ids,
            completion_mask=mask,
            truncated=truncated,
        )
