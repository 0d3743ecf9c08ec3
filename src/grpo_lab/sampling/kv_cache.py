"""The project's own batched sampler: one prompt forward, a shared KV cache, a decode loop."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from grpo_lab.policy import native
from grpo_lab.policy.forward import _CACHE, position_ids_from_mask
from grpo_lab.sampling.base import (
    Completions,
    SamplingSettings,
    completes_stop_string,
    draw_tokens,
    eos_and_pad_ids,
    stop_window,
)


class KVCacheSampler(SamplingSettings):
    """Ancestral sampling with the prompt encoded once and its KV cache shared by G samples.

    The B left-padded prompts go through one forward; the cache is then repeated to B*G rows
    (``DynamicCache.batch_repeat_interleave``) and every step decodes one token per row.
    temperature, top_k (0 = off), top_p (1 = off), min_p (0 = off) as in ``filter_logits``;
    every EOS id of the model's generation config ends a row;
    a row ends at EOS or at the token that completes any of ``stop_strings`` (not truncated
    then; needs the tokenizer, which ``configure`` gives); the loop ends when every row has.

    model_impl (``policy.model_impl``, given by ``configure``): "auto" decodes supported
    architectures with grpo_lab's own forward (``policy.native``: a preallocated cache
    written in place, finished rows leave the batch); "transformers" runs the model's forward
    with a ``DynamicCache``. Both draw the same random numbers and give the same tokens and
    log-probs up to float rounding.
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
        eos_ids = torch.tensor(eos, dtype=torch.long, device=prompt_ids.device)  # (E,)
        # Greedy completions of a prompt are all the same: decode one row, repeat it at the end.
        G = 1 if greedy else num_samples
        B = prompt_ids.shape[0]
        parts = native.llama_parts(model) if self.model_impl == "auto" else None
        if parts is not None:
            ids, logps, end = native.decode(
                parts,
                prompt_ids,
                prompt_mask,
                G,
                self.max_new_tokens,
                lambda logits, rows: self._next_token(logits.float(), greedy, rows, B * G),
                lambda tokens, token, live: self._ends(tokens, token, live, eos_ids),
                pad,
            )
            return self._completions(
                ids, logps, end, prompt_ids, prompt_mask, num_samples, greedy, pad
            )
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids_from_mask(prompt_mask),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = getattr(out, _CACHE)
        if G > 1:
            cache.batch_repeat_interleave(G)  # the B prompts were encoded once, not G times
        logits = out.logits[:, -1].float().repeat_interleave(G, dim=0)  # (N, V)
        mask = prompt_mask.repeat_interleave(G, dim=0)  # (N, P + t)
        position = mask.sum(dim=1, keepdim=True)  # (N, 1) position of the next token
        N = mask.shape[0]
        finished = torch.zeros(N, dtype=torch.bool, device=mask.device)  # (N,)
        end = torch.full((N,), -1, dtype=torch.long, device=mask.device)  # (N,) last token
        tokens: list[Tensor] = []  # T x (N,)
        logps: list[Tensor] = []  # T x (N,)
        for t in range(self.max_new_tokens):
            token, logp = self._next_token(logits, greedy)
            token = token.masked_fill(finished, pad)
            tokens.append(token)
            logps.append(logp)
            done = self._ends(tokens, token, ~finished, eos_ids)
            end[done] = t
            finished |= done
            if finished.all() or t == self.max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(N, 1)], dim=1)
            out = model(
                input_ids=token.unsqueeze(1),
                attention_mask=mask,
                position_ids=position,
                use_cache=True,
                **{_CACHE: cache},
            )
            cache = getattr(out, _CACHE)
            logits = out.logits[:, -1].float()
            position = position + 1
        ids, logps = torch.stack(tokens, dim=1), torch.stack(logps, dim=1)  # (N, T)
        return self._completions(ids, logps, end, prompt_ids, prompt_mask, num_samples, greedy, pad)

    def _ends(self, tokens: list[Tensor], token: Tensor, live: Tensor, eos_ids: Tensor) -> Tensor:
        """(N,) rows whose newest token ends them: an EOS id, or a completed stop string."""
        done = torch.isin(token, eos_ids) & live
        if self.stop_strings:
            done |= self._completes_stop(tokens, live & ~done)
        return done

    def _completions(
        self,
        ids: Tensor,
        logps: Tensor,
        end: Tensor,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        num_samples: int,
        greedy: bool,
        pad: int,
    ) -> Completions:
        """Completions from the (N, T) tokens and log-probs and each row's last index (-1: none)."""
        T = ids.shape[1]
        truncated = end < 0
        last = torch.where(truncated, torch.full_like(end, T - 1), end)
        completion_mask = (torch.arange(T, device=ids.device) <= last.unsqueeze(1)).long()
        ids = ids.masked_fill(completion_mask == 0, pad)
        sampling_logp = None if greedy else logps * completion_mask
        repeat = num_samples if greedy else 1
        return Completions(
            prompt_ids=prompt_ids.repeat_interleave(num_samples, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(num_samples, dim=0),
            completion_ids=ids.repeat_interleave(repeat, dim=0),
            completion_mask=completion_mask.repeat_interleave(repeat, dim=0),
            truncated=truncated.repeat_interleave(repeat, dim=0),
            sampling_logp=sampling_logp,
        )

    def _next_token(
        self, logits: Tensor, greedy: bool, rows: Tensor | None = None, n_rows: int = 0
    ) -> tuple[Tensor, Tensor]:
        """One token per row, and its log-prob under the distribution it was drawn from.

        rows: which of n_rows rows the logits are (None: all of them). Uniforms are drawn for
        all n_rows, so the random stream does not depend on how many rows are still decoding.
        """
        if greedy:
            token = logits.argmax(dim=-1)
            return token, torch.zeros_like(token, dtype=logits.dtype)
        logp = self.sampling_logits(logits).log_softmax(dim=-1)  # (n, V)
        u = None
        if rows is not None:
            u = torch.rand(n_rows, 1, device=logits.device, dtype=logp.dtype)[rows]
        token = draw_tokens(logp, u)
        return token, logp.gather(1, token.unsqueeze(1)).squeeze(1)

    def _completes_stop(self, tokens: list[Tensor], live: Tensor) -> Tensor:
        """(N,) True where the last token of a live row completed a stop string."""
        hit = torch.zeros_like(live)
        rows = live.nonzero().squeeze(1)
        if not len(rows):
            return hit
        window = torch.stack(tokens[-stop_window(self.stop_strings) :], dim=1)[rows]
        found = completes_stop_string(self.tokenizer, window.tolist(), self.stop_strings)
        hit[rows] = torch.tensor(found, device=live.device)
        return hit
