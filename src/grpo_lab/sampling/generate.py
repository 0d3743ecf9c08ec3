"""Sampling with transformers' ``generate``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from grpo_lab.sampling.base import (
    Completions,
    SamplingSettings,
    eos_and_pad_ids,
    trim_at_eos,
    trim_at_stop_strings,
)

# Every generate setting that changes the distribution, at its neutral value. generate fills a
# setting left None from its global defaults, and one of those is top_k=50.
_NEUTRAL = dict(
    num_beams=1,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    typical_p=1.0,
    epsilon_cutoff=0.0,
    eta_cutoff=0.0,
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0,
    length_penalty=1.0,
    min_length=0,
    remove_invalid_values=False,
    renormalize_logits=False,
)


class GenerateSampler(SamplingSettings):
    """Ancestral sampling through ``model.generate`` with its KV cache.

    temperature, top_k (0 = off), top_p (1.0 = off), min_p (0 = off), max_new_tokens,
    stop_strings (end a completion at the token that completes the first of these strings;
    such a completion is not truncated; needs the tokenizer, which ``configure`` gives).

    These settings are the whole sampling distribution: the model's own ``generation_config``
    (a checkpoint's repetition_penalty, top_k, bad_words_ids, ...) is not applied. Only its EOS
    and pad ids are read, and every EOS id ends a completion. The temperature and filters are
    ``filter_logits``, as in the KV-cache sampler, applied by a logits processor that also
    records each drawn token's log-prob (``Completions.sampling_logp``).
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
        if self.stop_strings and self.tokenizer is None:
            raise ValueError(
                "sampler.stop_strings needs the tokenizer: call sampler.configure(tokenizer, model_impl)"
            )
        eos, pad = eos_and_pad_ids(model)
        neutral = dict(_NEUTRAL)
        if greedy:
            # generate warns about a top_k set without sampling (where it does not apply)
            neutral.pop("top_k")
        config = GenerationConfig(
            **neutral,
            max_new_tokens=self.max_new_tokens,
            do_sample=not greedy,
            # generate refuses num_return_sequences > 1 without sampling; every copy of a
            # greedy completion is the same, so decode once and repeat the rows below.
            num_return_sequences=1 if greedy else num_samples,
            eos_token_id=eos or None,
            pad_token_id=pad,
            stop_strings=self.stop_strings,
        )
        draw = None if greedy else _DrawAndRecord(self)
        with _only_generation_config(model, config):
            out = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([draw] if draw else []),
                tokenizer=self.tokenizer if self.stop_strings else None,
            )
        raw = out[:, prompt_ids.shape[1] :]
        if greedy:
            raw = raw.repeat_interleave(num_samples, dim=0)
        ids, mask, truncated = trim_at_eos(raw, eos, pad)
        if self.stop_strings:
            # generate pads a row that hit a stop string; cut it at the stop string instead.
            ids, mask, truncated = trim_at_stop_strings(
                ids, mask, truncated, self.tokenizer, self.stop_strings, pad
            )
        sampling_logp = None
        if draw is not None:
            sampling_logp = torch.where(mask.bool(), draw.logp_of(raw), 0.0)
        return Completions(
            prompt_ids=prompt_ids.repeat_interleave(num_samples, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(num_samples, dim=0),
            completion_ids=ids,
            completion_mask=mask,
            truncated=truncated,
            sampling_logp=sampling_logp,
        )


class _DrawAndRecord(LogitsProcessor):
    """The sampler's temperature and filters, and the log-prob of every token drawn through them.

    The only processor generate runs (its own are neutral), so generate draws each token from
    softmax of what this returns. Processors see the tokens drawn so far, not the one about to
    be drawn: the log-prob of step t's token is read at step t + 1, or by ``logp_of`` at the
    end. Only one step's (N, V) log-probs are held, not the T steps ``output_scores`` keeps.
    """

    def __init__(self, settings: SamplingSettings) -> None:
        self.settings = settings
        self.drawn_logp: list[Tensor] = []  # T x (N,)
        self.last_logp: Tensor | None = None  # (N, V) log-probs of the latest step

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.last_logp is not None:  # input_ids now ends with the last step's token
            self._take(input_ids[:, -1])
        logits = self.settings.sampling_logits(scores)
        self.last_logp = logits.log_softmax(dim=-1)
        return logits

    def _take(self, tokens: Tensor) -> None:
        self.drawn_logp.append(self.last_logp.gather(1, tokens.unsqueeze(1)).squeeze(1))

    def logp_of(self, completion_ids: Tensor) -> Tensor:
        """(N, T) log-prob of each generated token under the distribution it was drawn from.

        On some devices (mps in transformers 5.24) generate decodes one step past the end and
        drops it; the processor saw that step too, so only the first T steps count.
        """
        T = completion_ids.shape[1]
        if len(self.drawn_logp) < T:
            self._take(completion_ids[:, len(self.drawn_logp)])
        return torch.stack(self.drawn_logp[:T], dim=1)


@contextlib.contextmanager
def _only_generation_config(model: nn.Module, config: GenerationConfig) -> Iterator[None]:
    """Within: the model's own generation_config is ``config``.

    generate fills every setting its argument leaves None from ``model.generation_config``, so a
    complete config is not enough: a checkpoint's bad_words_ids, suppress_tokens or min_p (whose
    neutral value is None) would still apply. peft's generate copies the wrapper's config onto
    the base model, so every module holding one is swapped, and each is restored after.
    """
    holders = [m for m in model.modules() if vars(m).get("generation_config") is not None]
    saved = [m.generation_config for m in holders]
    for m in holders:
        m.generation_config = config
    try:
        yield
    finally:
        for m, own in zip(holders, saved):
            m.generation_config = own
