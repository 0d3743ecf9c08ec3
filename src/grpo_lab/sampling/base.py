"""Sampler protocol, the completions it returns, and per-token log-probs of completions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass
class Completions:
    """G completions for each of B prompts, rows grouped by prompt (N = B*G).

    prompt_ids:      (N, P) left-padded prompt tokens, each prompt repeated G times
    prompt_mask:     (N, P) 1 on real prompt tokens
    completion_ids:  (N, T) sampled tokens, padded after EOS
    completion_mask: (N, T) 1 on tokens up to and including EOS
    truncated:       (N,)   True where neither EOS nor a stop string came within max_new_tokens
    sampling_logp:   (N, T) log-prob of each token under the distribution it was drawn from
                     (after temperature and filtering), 0 on padding; None for greedy
                     decoding (both samplers record it when they sample)
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    truncated: Tensor
    sampling_logp: Tensor | None = None

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(dim=1)


class Sampler(Protocol):
    """Draws completions from a policy. Implementations live in ``grpo_lab.sampling``.

    The module calls ``configure`` once with the policy's tokenizer and ``policy.model_impl``,
    and ``weights_changed`` after every optimizer step: a sampler that keeps its own copy of the
    weights (an inference engine such as vLLM) syncs it then; the in-process samplers read the
    live policy and ignore it.
    """

    temperature: float
    max_new_tokens: int

    def configure(self, tokenizer: Any, model_impl: str) -> None: ...

    def weights_changed(self) -> None: ...

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
    completion_ids: Tensor, eos_token_ids: int | Sequence[int], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Mask and pad everything after the first EOS; any of ``eos_token_ids`` is an EOS.

    Chat models end a turn with one of several ids (Qwen2.5: <|im_end|> and <|endoftext|>).
    completion_ids: (N, T). Returns (ids (N, T) padded after EOS, mask (N, T) 1 up to and
    including EOS, truncated (N,) True where no EOS appears).
    """
    eos = torch.as_tensor(eos_token_ids, device=completion_ids.device).reshape(-1)  # (E,)
    is_eos = torch.isin(completion_ids, eos)
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


def eos_and_pad_ids(model: nn.Module) -> tuple[list[int], int]:
    """(every EOS id, pad id) from the model's generation config; pad falls back to the first EOS."""
    config = model.generation_config
    eos = config.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, list | tuple) else [eos]
    pad = config.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return [int(e) for e in eos], int(pad)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Set to -inf every logit the sampling filters drop. logits: (N, V) -> (N, V).

    Applied in transformers' order, each on what the one before kept, and each keeps at
    least the most likely token:
      top_k: keep the k largest logits (0 = off; ties with the k-th are kept);
      top_p: keep the smallest set of most likely tokens whose probability sums to >= top_p,
             i.e. token i stays when the mass of the tokens more likely than it is < top_p;
      min_p: keep tokens with p >= min_p * max p (0 = off).
    Both samplers draw from softmax of this (after dividing by the temperature); the loss's
    pi_old and pi_theta are the unfiltered softmax at the same temperature.
    """
    out = logits
    if top_k and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (N, V) mass of the more likely tokens
        drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(
            -1, order, mass_before >= top_p
        )
        out = out.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = out.softmax(dim=-1)
        out = out.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return out


def draw_tokens(logp: Tensor, uniform: Tensor | None = None) -> Tensor:
    """One token per row from the distributions softmax(logp) (N, V) -> (N,), by inverting the
    cumulative distribution at a uniform draw (torch.multinomial draws V exponentials per row
    for one token). uniform: (N, 1) draws in [0, 1), or None to draw them here. A token of
    probability 0 is never drawn: 1 - u > 0 and the first index whose cumulative mass reaches
    it has mass of its own."""
    cdf = logp.exp().cumsum(dim=-1)  # (N, V)
    if uniform is None:
        uniform = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype)
    target = (1.0 - uniform) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(1).clamp(max=cdf.shape[1] - 1)


class SamplingSettings:
    """The knobs every sampler shares, checked once (errors name the ``sampler.*`` key).

    temperature, top_k (0 = off), top_p (1 = off), min_p (0 = off), max_new_tokens;
    stop_strings end a completion at the token that completes the first of them (such a
    completion is not truncated; needs the tokenizer, which ``configure`` gives).
    """

    def __init__(
        self,
        max_new_tokens: int = 8,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        stop_strings: list[str] | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"sampler.max_new_tokens={max_new_tokens}; must be >= 1")
        if temperature <= 0:
            raise ValueError(
                f"sampler.temperature={temperature}; must be > 0 (greedy eval is separate)"
            )
        if top_k < 0:
            raise ValueError(f"sampler.top_k={top_k}; must be >= 0 (0 = off)")
        if not 0 < top_p <= 1:
            raise ValueError(f"sampler.top_p={top_p}; must be in (0, 1]")
        if not 0 <= min_p < 1:
            raise ValueError(f"sampler.min_p={min_p}; must be in [0, 1) (0 = off)")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p
        self.stop_strings = list(stop_strings) if stop_strings else None
        self.tokenizer = None  # set by configure: stop strings need it
        self.model_impl = "auto"

    def configure(self, tokenizer: Any, model_impl: str) -> None:
        """The policy's tokenizer (to decode stop strings) and ``policy.model_impl``."""
        self.tokenizer = tokenizer
        self.model_impl = model_impl

    def weights_changed(self) -> None:
        """Nothing to do: this sampler reads the live policy's weights."""

    def sampling_logits(self, logits: Tensor) -> Tensor:
        """The logits of the distribution a token is drawn from: (N, V) -> (N, V), -inf = dropped."""
        return filter_logits(logits / self.temperature, self.top_k, self.top_p, self.min_p)


def stop_window(stop_strings: list[str]) -> int:
    """Trailing tokens to decode to see a stop string appear (a character can take 4 byte tokens)."""
    return 4 * max(len(s) for s in stop_strings) + 4


def completes_stop_string(
    tokenizer, windows: list[list[int]], stop_strings: list[str]
) -> list[bool]:
    """Whether each row's decoded trailing tokens contain any stop string.

    Called after every new token, so the first call that sees a stop string is at the token
    that completed it. Decoded as the rewards decode (special tokens skipped).
    """
    texts = tokenizer.batch_decode(windows, skip_special_tokens=True)
    return [any(s in text for s in stop_strings) for text in texts]


def trim_at_stop_strings(
    completion_ids: Tensor,
    completion_mask: Tensor,
    truncated: Tensor,
    tokenizer,
    stop_strings: list[str],
    pad_token_id: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """End each completion at the token that completes its first stop string.

    Takes and returns (ids (N, T), mask (N, T), truncated (N,)) as ``trim_at_eos`` makes them.
    A row ended by a stop string is not truncated; everything after that token is masked and
    padded.
    """
    N, T = completion_ids.shape
    end = torch.full((N,), -1, dtype=torch.long)
    window = stop_window(stop_strings)
    rows = completion_ids.tolist()
    for t in range(T):
        live = [i for i in range(N) if end[i] < 0 and completion_mask[i, t]]
        if not live:
            continue
        windows = [rows[i][max(0, t + 1 - window) : t + 1] for i in live]
        for i, hit in zip(live, completes_stop_string(tokenizer, windows, stop_strings)):
            if hit:
                end[i] = t
    stopped = (end >= 0).to(completion_ids.device)
    end = end.to(completion_ids.device)
    positions = torch.arange(T, device=completion_ids.device).unsqueeze(0)
    keep = ~stopped.unsqueeze(1) | (positions <= end.unsqueeze(1))
    mask = completion_mask * keep.long()
    ids = torch.where(mask.bool(), completion_ids, torch.full_like(completion_ids, pad_token_id))
    return ids, mask, truncated & ~stopped


def sampling_logp_gap(sampling_logp: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """|log q(o_t) - log pi_old(o_t)| per completion token, 0 on padding. All (N, T).

    q is the distribution the sampler drew o_t from (temperature, then top_k/top_p/min_p);
    pi_old is the unfiltered softmax at the same temperature that the loss uses. Without
    filtering the two are the same and the gap is float noise. With filtering q = p / m on the
    kept tokens, m the mass the filter kept, so the gap is -log m.
    """
    return torch.where(mask.bool(), (sampling_logp - logp).abs(), 0.0)
