"""Per-token log-probs of given completions under a model: the forwards of the GRPO step.

Two ways to run the model, the same numbers up to float rounding:
  plain (group_size=None): every row is prompt + completion, one forward over (N, P + T);
  shared prefix (group_size=G): rows come in groups of G that share a prompt. The B unique
      prompts run once (B, P) with a KV cache; the cache is repeated G times and the N = B*G
      completions run on top of it. The repeat is a differentiable op, so the prompt's
      activations receive the sum of the G completions' gradients: the exact gradient.

Either way only the hidden states at real completion tokens are projected to the vocabulary,
in chunks (``head_logprobs``): no (tokens x vocabulary) float32 copy is held at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from grpo_lab.policy import native

if TYPE_CHECKING:
    from grpo_lab.sampling.base import Completions

# transformers 5 renamed the cache argument and output field from ``past_key_values`` to ``cache``.
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# Logit elements (rows x vocabulary) one chunk may hold: 2**24 float32 = 64 MiB, 512 tokens of a
# 32k vocabulary. A small vocabulary fits a whole batch in one chunk, which then needs no
# recomputation in the backward.
CHUNK_ELEMENTS = 2**24

# Config attributes of architectures whose logits are not lm_head(hidden) (Gemma 2/3 soft-cap,
# Cohere and Granite scale): those run the model's own forward and keep its full logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: the first real token of each row is at 0."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def completion_logprobs(
    model: nn.Module,
    completions: Completions,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    group_size: int | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
    model_impl: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """log pi(o_t | q, o_<t) of every completion token, and optionally the entropy there.

    Returns logp (N, T) float32, 0 on padding, and entropy (N, T) or None (differentiable only
    with entropy_grad, for an entropy bonus). Logits are divided by the sampling temperature so
    that pi_old matches the distribution the tokens came from.
    group_size: None runs each row's prompt with it; G runs each group's prompt once (rows
    g*G .. g*G+G-1 must hold the same prompt, as every sampler returns them).
    model_impl: "auto" runs grpo_lab's own forward where the architecture is supported
    (``policy.native``: real tokens only), "transformers" always runs the model's forward.
    """
    mask = completions.completion_mask.bool()  # (N, T)
    features, head = _completion_features(model, completions, group_size, model_impl)
    logp, entropy = head_logprobs(
        features[mask],
        head,
        completions.completion_ids[mask],
        temperature=temperature,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
        chunk_elements=chunk_elements,
    )
    zeros = features.new_zeros(mask.shape, dtype=torch.float32)
    entropy = None if entropy is None else zeros.masked_scatter(mask, entropy)
    return zeros.masked_scatter(mask, logp), entropy


def head_logprobs(
    features: Tensor,
    head: nn.Module,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(head(features) / temperature)[token], chunk by chunk over the M rows.

    features: (M, F); tokens: (M,). Returns logp (M,) float32 and entropy (M,) or None.
    log p(x) = z_x - logsumexp(z); H = logsumexp(z) - sum_v p_v z_v. Under autograd each chunk
    is checkpointed when there is more than one: its logits are recomputed in the backward
    rather than kept, so the peak holds one chunk's logits, not all of them.
    """
    vocab = _vocab_size(head, features)
    rows = max(1, chunk_elements // vocab)
    # An empty batch still gives one (empty) chunk, so the result stays in the autograd graph.
    chunks = list(zip(features.split(rows), tokens.split(rows)))
    track = torch.is_grad_enabled()
    keep_entropy_graph = entropy_grad and track

    def piece(f: Tensor, tok: Tensor) -> tuple[Tensor, ...]:
        logits = head(f).float()  # (m, V)
        if temperature != 1.0:
            logits = logits / temperature
        lse = torch.logsumexp(logits, dim=-1)  # (m,)
        logp = logits.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - lse
        if not with_entropy:
            return (logp,)
        # The full-vocabulary softmax behind the entropy stays out of the autograd graph
        # unless an entropy bonus needs its gradient.
        with torch.set_grad_enabled(keep_entropy_graph):
            probs = torch.exp(logits - lse.unsqueeze(-1))
            entropy = lse - (probs * logits).sum(dim=-1)
        return logp, entropy

    checkpointed = track and len(chunks) > 1
    outs = [
        torch.utils.checkpoint.checkpoint(piece, f, tok, use_reentrant=False)
        if checkpointed
        else piece(f, tok)
        for f, tok in chunks
    ]
    logp = torch.cat([o[0] for o in outs])
    entropy = torch.cat([o[1] for o in outs]) if with_entropy else None
    return logp, entropy


def _completion_features(
    model: nn.Module, completions: Completions, group_size: int | None, model_impl: str = "auto"
) -> tuple[Tensor, nn.Module]:
    """What the head turns into the logits that predict each completion token, and that head.

    Returns features (N, T, F) where position t predicts completion token t, and the head:
    the hidden states and lm_head where the logits are lm_head(hidden), else the model's full
    logits (F = V) and an identity head.
    """
    if group_size is not None:
        _check_groups(completions.prompt_ids, completions.prompt_mask, group_size)
    parts = native.llama_parts(model) if model_impl == "auto" else None
    if parts is not None:
        features = native.completion_features(
            parts,
            completions.prompt_ids,
            completions.prompt_mask,
            completions.completion_ids,
            completions.completion_mask,
            group_size,
        )
        return features, parts.head
    plain_head = _logits_are_linear_head(model)
    body = model.get_decoder() if plain_head else model
    head = model.get_output_embeddings() if plain_head else nn.Identity()

    def run(keep: int, **kwargs) -> tuple[Tensor, object]:
        if not plain_head:
            kwargs["logits_to_keep"] = keep  # the model's head projects only these positions
        out = body(**kwargs)
        feats = out.last_hidden_state[:, -keep:] if plain_head else out.logits
        return feats, getattr(out, _CACHE, None)

    prompt_ids, prompt_mask = completions.prompt_ids, completions.prompt_mask
    completion_ids = completions.completion_ids
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    mask = torch.cat([prompt_mask, completions.completion_mask], dim=1)  # (N, P + T)
    positions = position_ids_from_mask(mask)  # (N, P + T)
    # transformers switches its cache off under gradient checkpointing in training mode: with
    # no cache to share, each row runs its own prompt.
    checkpointing = getattr(body, "gradient_checkpointing", False) and body.training
    if group_size is None or checkpointing:
        input_ids = torch.cat([prompt_ids, completion_ids[:, :-1]], dim=1)
        feats, _ = run(
            T,
            input_ids=input_ids,
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :-1],
            use_cache=False,
        )
        return feats, head  # (N, T, F)

    G = group_size
    # One forward per unique prompt; its last position predicts completion token 0.
    last_feat, cache = run(
        1,
        input_ids=prompt_ids[::G],
        attention_mask=prompt_mask[::G],
        position_ids=positions[::G, :P],
        use_cache=True,
    )
    first = last_feat.repeat_interleave(G, dim=0)  # (N, 1, F)
    if T == 1:
        return first, head
    cache.batch_repeat_interleave(G)  # (B, ...) -> (N, ...); gradients flow through the repeat
    rest, _ = run(
        T - 1,
        input_ids=completion_ids[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=positions[:, P:-1],
        use_cache=True,
        **{_CACHE: cache},
    )
    return torch.cat([first, rest], dim=1), head  # (N, T, F)


def _check_groups(prompt_ids: Tensor, prompt_mask: Tensor, G: int) -> None:
    """Rows g*G .. g*G+G-1 must hold one prompt, or sharing its forward would be wrong."""
    N = prompt_ids.shape[0]
    if N % G:
        raise ValueError(
            f"train.shared_prefix=true needs whole groups: {N} rows is not a multiple of G={G}"
        )
    ids = prompt_ids.view(N // G, G, -1)
    m = prompt_mask.view(N // G, G, -1)
    if not ((ids == ids[:, :1]).all() and (m == m[:, :1]).all()):
        raise ValueError(
            "train.shared_prefix=true needs the G rows of each group to hold the same prompt "
            "(rows g*G .. g*G+G-1); got different prompts within a group"
        )


def _logits_are_linear_head(model: nn.Module) -> bool:
    """Whether logits = get_output_embeddings()(get_decoder()(...)) with nothing in between."""
    try:
        decoder = model.get_decoder()
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    if decoder is None or decoder is model or not isinstance(head, nn.Linear):
        return False
    config = getattr(model, "config", None)
    return not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


def _vocab_size(head: nn.Module, features: Tensor) -> int:
    return head.out_features if isinstance(head, nn.Linear) else features.shape[-1]
