"""Sampler protocol, the completions it returns, and per-token log-probs of completions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from grpo_lab.objective import selective_log_softmax, token_entropy


@dataclass
class Completions:
    """G completions for each of B prompts, rows grouped by prompt (N = B*G).

    prompt_ids:      (N, P) left-padded prompt tokens, each prompt repeated G times
    prompt_mask:     (N, P) 1 on real prompt tokens
    completion_ids:  (N, T) sampled tokens, padded after EOS
    completion_mask: (N, T) 1 on tokens up to and including EOS
    truncated:       (N,)   True where no EOS came within max_new_tokens
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    truncated: Tensor

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(dim=1)


class Sampler(Protocol):
    """Draws completions from a policy. Implementations live in ``grpo_lab.sampling``."""

    temperature: float
    max_new_tokens: int

    def sample(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        num_samples: int,
        *,
        greedy: bool = False,
    ) -> Completions: ...


def trim_at_eos(
    completion_ids: Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Mask and pad everything after the first EOS.

    completion_ids: (N, T). Returns (ids (N, T) padded after EOS, mask (N, T) 1 up to and
    including EOS, truncated (N,) True where no EOS appears).
    """
    is_eos = completion_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    # index of first EOS, or T when there is none
    first = torch.where(
        has_eos,
        is_eos.int().argmax(dim=1),
        completion_ids.new_full(has_eos.shape, completion_ids.shape[1]),
    )
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).long()
    ids = torch.where(mask.bool(), completion_ids, torch.full_like(completion_ids, pad_token_id))
    return ids, mask, ~has_eos


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: the first real token of each row is at 0."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def completion_logprobs(
    model: nn.Module,
    completions: Completions,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log pi(o_t | q, o_<t) of every completion token, and optionally the entropy there.

    Returns logp (N, T) float32 and entropy (N, T) or None. Logits are divided by the
    sampling temperature so that pi_old matches the distribution the tokens came from.
    Only the T positions that predict completion tokens are projected to the vocabulary.
    """
    T = completions.completion_ids.shape[1]
    input_ids = torch.cat([completions.prompt_ids, completions.completion_ids], dim=1)
    attention_mask = torch.cat([completions.prompt_mask, completions.completion_mask], dim=1)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=T + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]  # (N, T, V): position t predicts completion token t
    if temperature != 1.0:
        logits = logits / temperature
    logp = selective_log_softmax(logits, completions.completion_ids)
    entropy = token_entropy(logits) if with_entropy else None
    return logp, entropy
