"""grpo_lab's own forward for Llama-family models (``policy.model_impl``): the same weights and
the same math as transformers' forward, less work.

transformers' forward is general: a cache object that grows by concatenation (copying every
key and value at every decoded token), masks rebuilt in Python per call, padding computed as
if it were tokens. For the architectures below, grpo_lab runs the model's own submodules
(embeddings, norms, projections, MLP, rotary embedding: LoRA adapters and biases included)
and does the attention itself:

  decode:   a preallocated key/value cache written in place; the prompt runs once per group
            and its keys and values are copied to the G rows; rows that finished (EOS or stop
            string) drop out of the batch, so they cost nothing in later steps.
  training: projections, norms and MLP run on real tokens only (no padding); each group's
            prompt runs once and its keys and values are gathered for its G completions (a
            differentiable index: the prompt receives the sum of the G gradients, exactly).

Supported: model_type llama, mistral, qwen2, qwen3 (q/k norms), without a sliding window in
effect, without gradient checkpointing. Anything else runs transformers' forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class LlamaParts:
    """The submodules the native forward calls, found on a (possibly peft-wrapped) model."""

    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module
    head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int


def llama_parts(model: nn.Module) -> LlamaParts | None:
    """The model's parts when grpo_lab's own forward computes exactly what transformers' does,
    else None (the callers then run transformers' forward)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return None
    name = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    if getattr(model, name, False):
        return None
    if _sliding_window_in_effect(config):
        return None
    # An attention kernel the user chose (policy.attn_implementation=flash_attention_2, ...)
    # is transformers'; eager and sdpa compute what the native attention (SDPA) computes.
    if getattr(config, "_attn_implementation", None) not in (None, "eager", "sdpa"):
        return None
    # The native attention has no dropout (GRPOModule keeps the policy in eval mode anyway).
    if model.training and getattr(config, "attention_dropout", 0.0):
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    try:
        decoder = model.get_decoder()
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, n) for n in needed):
        return None
    if not isinstance(head, nn.Linear):
        return None
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return LlamaParts(
        embed=decoder.embed_tokens,
        layers=decoder.layers[: config.num_hidden_layers],
        norm=decoder.norm,
        rotary=decoder.rotary_emb,
        head=head,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
    )


def compile_model(model: nn.Module, model_impl: str = "auto") -> None:
    """torch.compile what runs the model's forward (``train.compile``), in place (state_dict
    keys unchanged). With grpo_lab's own forward: the token-wise parts of every layer (norms
    and MLP, where elementwise work can fuse; the attention stays eager, its shapes change at
    every decoded token); else transformers' decoder. dynamic=True: token counts vary."""
    parts = llama_parts(model) if model_impl == "auto" else None
    if parts is None:
        model.get_decoder().compile(dynamic=True)
        return
    for layer in parts.layers:
        for part in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            part.compile(dynamic=True)
    parts.norm.compile(dynamic=True)


def _sliding_window_in_effect(config) -> bool:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return any(t != "full_attention" for t in layer_types)
    if config.model_type in ("qwen2", "qwen3"):
        return bool(getattr(config, "use_sliding_window", False))
    return True


def _norm(norm: nn.Module, x: Tensor) -> Tensor:
    """The model's RMSNorm of x. In float32 it is torch's fused ``rms_norm`` (one operator, not
    seven: the same numbers, bit for bit); otherwise, or when the module was compiled
    (``train.compile``) or is another kind of norm, the module itself (transformers' casts to
    float32 and back round differently from the fused operator in half precision)."""
    if (
        x.dtype == torch.float32
        and type(norm).__name__.endswith("RMSNorm")
        and getattr(norm, "_compiled_call_impl", None) is None
        and isinstance(getattr(norm, "variance_epsilon", None), float)
        and norm.weight.dtype == torch.float32
    ):
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(x)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., heads, D) rotated by cos/sin (..., D) of its positions."""
    return x * cos.unsqueeze(-2) + _rotate_half(x) * sin.unsqueeze(-2)


def _qkv(parts: LlamaParts, layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor):
    """Rotated queries (M, H, D), keys and values (M, Hkv, D) of M tokens' normed states h."""
    attn = layer.self_attn
    M = h.shape[0]
    q = attn.q_proj(h).view(M, parts.num_heads, parts.head_dim)
    k = attn.k_proj(h).view(M, parts.num_kv_heads, parts.head_dim)
    v = attn.v_proj(h).view(M, parts.num_kv_heads, parts.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's query and key before rotary
        q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
    return _rotary(q, cos, sin), _rotary(k, cos, sin), v


def _attend(parts: LlamaParts, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """SDPA over (n, H, Lq, D) queries and (n, Hkv, Lk, D) keys; allowed (n, 1, Lq, Lk) bool
    or additive float."""
    gqa = parts.num_heads != parts.num_kv_heads
    if gqa and q.is_cuda:
        # CUDA's fused kernels take no mask with enable_gqa: SDPA would fall back to its math
        # kernel, which holds every (Lq, Lk) score in float32. Repeat the keys instead, as
        # transformers does (integrations/sdpa_attention.py, use_gqa_in_sdpa).
        rep = parts.num_heads // parts.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, scale=parts.head_dim**-0.5, enable_gqa=gqa
    )


def _mlp_block(layer: nn.Module, x: Tensor, attn_out: Tensor) -> Tensor:
    x = x + layer.self_attn.o_proj(attn_out)
    return x + layer.mlp(_norm(layer.post_attention_layernorm, x))


def _positions_cos_sin(parts: LlamaParts, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin (M, D) for M tokens at ``positions`` (M,), from the model's rotary module."""
    cos, sin = parts.rotary(x, positions.unsqueeze(0))
    return cos[0], sin[0]


def _padded(values: Tensor, where: Tensor) -> Tensor:
    """Scatter M packed rows (M, ...) into a zero (n, L, ...) layout at the True cells of
    ``where`` (n, L); differentiable in ``values``."""
    shape = (*where.shape, *values.shape[1:])
    flat = values.new_zeros((where.numel(), *values.shape[1:]))
    flat = flat.index_copy(0, where.reshape(-1).nonzero().squeeze(1), values)
    return flat.view(shape)


def _self_or(allowed: Tensor) -> Tensor:
    """Let every query attend to at least its own position: a padding query that could see
    nothing would give NaN, and NaN values poison the real queries through 0 x NaN."""
    L = allowed.shape[-1]
    eye = torch.eye(L, dtype=torch.bool, device=allowed.device)
    return allowed | eye


# --------------------------------------------------------------------------- training forward


def completion_features(
    parts: LlamaParts,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    group_size: int | None,
) -> Tensor:
    """The final hidden states that predict each completion token: (N, T, F), zero where the
    completion mask is 0. What ``lm_head`` of them gives equals transformers' logits.

    prompt_ids/prompt_mask (N, P) left-padded; completion_ids/completion_mask (N, T).
    group_size G: rows g*G .. g*G+G-1 share one prompt, which then runs once (None: each row
    runs its own prompt). Only real tokens go through the projections and the MLP.
    """
    N, P = prompt_ids.shape
    T = completion_ids.shape[1]
    G = group_size or 1
    device = prompt_ids.device
    p_ids, p_mask = prompt_ids[::G], prompt_mask[::G].bool()  # (U, P)
    owner = torch.arange(N, device=device) // G  # (N,) the prompt row of each completion
    prompt_len = p_mask.sum(1)  # (U,)
    p_pos = (p_mask.long().cumsum(1) - 1).clamp(min=0)  # (U, P)
    # Completion token t (t < T - 1) is an input when token t + 1 is a real token to predict.
    c_in = completion_mask[:, 1:].bool()  # (N, T-1)
    c_ids = completion_ids[:, :-1]
    c_pos = prompt_len[owner].unsqueeze(1) + torch.arange(T - 1, device=device)  # (N, T-1)

    n_prompt = int(p_mask.sum())
    ids = torch.cat([p_ids[p_mask], c_ids[c_in]])  # (M,) packed real tokens
    positions = torch.cat([p_pos[p_mask], c_pos[c_in]])
    x = parts.embed(ids)  # (M, d)
    cos, sin = _positions_cos_sin(parts, x, positions)

    causal_p = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    allowed_p = _self_or(p_mask[:, None, :] & causal_p)[:, None]  # (U, 1, P, P)
    causal_c = torch.ones(T - 1, T - 1, dtype=torch.bool, device=device).tril()
    allowed_c = torch.cat(
        [
            p_mask[owner][:, None, :].expand(N, T - 1, P),
            _self_or(c_in[:, None, :] & causal_c),
        ],
        dim=2,
    )[:, None]  # (N, 1, T-1, P + T-1)

    for layer in parts.layers:
        q, k, v = _qkv(parts, layer, _norm(layer.input_layernorm, x), cos, sin)
        # prompt tokens attend within their prompt
        qp, kp, vp = (_padded(t[:n_prompt], p_mask).transpose(1, 2) for t in (q, k, v))
        out_p = _attend(parts, qp, kp, vp, allowed_p).transpose(1, 2)[p_mask]  # (Mp, H, D)
        pieces = [out_p]
        if T > 1:
            # completion tokens attend to their prompt (shared by the group) and to themselves
            qc, kc, vc = (_padded(t[n_prompt:], c_in).transpose(1, 2) for t in (q, k, v))
            keys = torch.cat([kp[owner], kc], dim=2)  # (N, Hkv, P + T-1, D)
            values = torch.cat([vp[owner], vc], dim=2)
            out_c = _attend(parts, qc, keys, values, allowed_c).transpose(1, 2)[c_in]
            pieces.append(out_c)
        x = _mlp_block(layer, x, torch.cat(pieces).flatten(1))
    h = _norm(parts.norm, x)
    F_ = h.shape[-1]
    last_prompt = h[:n_prompt][(prompt_len.cumsum(0) - 1)]  # (U, F) the last prompt token
    first = last_prompt[owner].unsqueeze(1)  # (N, 1, F): predicts completion token 0
    rest = _padded(h[n_prompt:], c_in) if T > 1 else h.new_zeros(N, 0, F_)  # (N, T-1, F)
    return torch.cat([first, rest], dim=1) * completion_mask.unsqueeze(-1).to(h.dtype)


# --------------------------------------------------------------------------- decoding


# Prompts at least this long keep their keys and values once per group in the decode (the
# G rows attend to them through one matmul per group); shorter ones are copied to each row, as
# the few extra operations per layer and token cost more than reading a short prompt G times.
SHARED_PROMPT_MIN_TOKENS = 32


class KVCache:
    """Keys and values of every layer, preallocated.

    k, v: per layer (n, Hkv, L, D), the n rows still decoding. rows (n,): the row (of B*G,
    grouped by prompt) each cache row holds.
    shared prompt (kp is not None): kp, vp per layer (B, Hkv, P, D) hold each prompt once,
    prompt_bias (B, P) is 0 on real prompt tokens and -inf on padding, and k, v hold only the
    completions (L = T). Otherwise k, v hold prompt and completion (L = P + T) and row_bias
    (n, L) masks the prompt's padding.
    """

    def __init__(
        self, parts: LlamaParts, B: int, G: int, P: int, T: int, like: Tensor, shared: bool
    ) -> None:
        Hkv, D = parts.num_kv_heads, parts.head_dim
        self.G, self.P = G, P
        self.kp = [like.new_zeros(B, Hkv, P, D) for _ in parts.layers] if shared else None
        self.vp = [like.new_zeros(B, Hkv, P, D) for _ in parts.layers] if shared else None
        self.prompt_bias = like.new_zeros(B, P)
        L = T if shared else P + T
        self.k = [like.new_zeros(B * G, Hkv, L, D) for _ in parts.layers]
        self.v = [like.new_zeros(B * G, Hkv, L, D) for _ in parts.layers]
        self.row_bias = None if shared else like.new_zeros(B * G, L)
        self.rows = torch.arange(B * G, device=like.device)

    def keep(self, rows: Tensor) -> None:
        """Drop every row not in ``rows`` (indices into the current rows, in order)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        if self.row_bias is not None:
            self.row_bias = self.row_bias.index_select(0, rows)
        self.rows = self.rows[rows]


@torch.no_grad()
def prefill(
    parts: LlamaParts, prompt_ids: Tensor, prompt_mask: Tensor, G: int, max_new_tokens: int
) -> tuple[Tensor, KVCache]:
    """Run the B prompts once; return the logits of their next token (B, V) and a cache that
    holds their keys and values (once per group, or per row for short prompts) with room for
    B*G completions."""
    B, P = prompt_ids.shape
    mask = prompt_mask.bool()
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    x = parts.embed(prompt_ids)  # (B, P, d)
    cos, sin = parts.rotary(x, positions)  # (B, P, D)
    causal = torch.ones(P, P, dtype=torch.bool, device=x.device).tril()
    allowed = _self_or(mask[:, None, :] & causal)[:, None]  # (B, 1, P, P)
    shared = G > 1 and P >= SHARED_PROMPT_MIN_TOKENS
    cache = KVCache(parts, B, G, P, max_new_tokens, x, shared)
    cache.prompt_bias.masked_fill_(~mask, float("-inf"))
    if not shared:
        cache.row_bias[:, :P] = cache.prompt_bias.repeat_interleave(G, 0)
    for i, layer in enumerate(parts.layers):
        h = _norm(layer.input_layernorm, x).reshape(B * P, -1)
        q, k, v = _qkv(parts, layer, h, cos.reshape(B * P, -1), sin.reshape(B * P, -1))
        q, k, v = (t.view(B, P, -1, parts.head_dim).transpose(1, 2) for t in (q, k, v))
        if shared:
            cache.kp[i].copy_(k)
            cache.vp[i].copy_(v)
        else:
            cache.k[i][:, :, :P] = k.repeat_interleave(G, 0)
            cache.v[i][:, :, :P] = v.repeat_interleave(G, 0)
        out = _attend(parts, q, k, v, allowed).transpose(1, 2).reshape(B, P, -1)
        x = _mlp_block(layer, x, out)
    logits = parts.head(_norm(parts.norm, x[:, -1]))  # left padding: the last position is real
    return logits, cache


def _by_group(x: Tensor, G: int) -> Tensor:
    """(B*G, Hkv, r, L) -> (B, Hkv, G*r, L): a group's rows side by side, per key head."""
    N, Hkv, r, L = x.shape
    return x.view(N // G, G, Hkv, r, L).transpose(1, 2).reshape(N // G, Hkv, G * r, L)


def _by_row(x: Tensor, G: int) -> Tensor:
    """The inverse of ``_by_group``: (B, Hkv, G*r, L) -> (B*G, Hkv, r, L)."""
    B, Hkv, Gr, L = x.shape
    return x.view(B, Hkv, G, Gr // G, L).transpose(1, 2).reshape(B * G, Hkv, Gr // G, L)


@torch.no_grad()
def decode_step(
    parts: LlamaParts, token: Tensor, position: Tensor, cache: KVCache, t: int
) -> Tensor:
    """One new token for each cache row, completion token index ``t``; returns next-token
    logits (n, V). token, position: (n,). Writes the token's keys and values in place.

    Attention by matmuls rather than SDPA for float32 models (for one query per row they are
    faster on the CPU, and grouped heads need no copy of the keys: queries are viewed per key
    head); by SDPA for half-precision ones, which keeps scores and probabilities in float32
    as the training forward does. With a
    shared prompt it comes in two parts whose scores share one softmax: against the prompt,
    per group (the G rows' queries against the prompt's keys in one matmul, so each prompt's
    keys and values are read once per group, not G times), and against the row's own
    completion so far.
    """
    n = token.shape[0]
    x = parts.embed(token)  # (n, d)
    cos, sin = _positions_cos_sin(parts, x, position)
    Hkv, D = parts.num_kv_heads, parts.head_dim
    rep = parts.num_heads // Hkv
    slot = t if cache.kp is not None else cache.P + t
    half = x.dtype in (torch.float16, torch.bfloat16)
    if cache.kp is None:
        cache.row_bias[:, slot] = 0.0
        bias = cache.row_bias[:, None, None, : slot + 1]  # (n, 1, 1, P + t + 1)
    for i, layer in enumerate(parts.layers):
        q, k, v = _qkv(parts, layer, _norm(layer.input_layernorm, x), cos, sin)
        cache.k[i][:, :, slot] = k
        cache.v[i][:, :, slot] = v
        keys, values = cache.k[i][:, :, : slot + 1], cache.v[i][:, :, : slot + 1]
        if cache.kp is not None:
            out = _shared_prompt_attention(q.view(n, Hkv, rep, D), keys, values, cache, i)
        elif half:
            # SDPA keeps scores and probabilities in float32, as the training forward does; a
            # matmul in bf16 would round every score to 3 significant digits
            out = _attend(parts, q.unsqueeze(2), keys, values, bias)  # (n, H, 1, D)
        else:
            scores = (q.view(n, Hkv, rep, D) * D**-0.5) @ keys.transpose(2, 3) + bias
            out = scores.softmax(dim=-1) @ values
        x = _mlp_block(layer, x, out.reshape(n, -1))
    return parts.head(_norm(parts.norm, x))


def _shared_prompt_attention(
    q: Tensor, keys: Tensor, values: Tensor, cache: KVCache, layer: int
) -> Tensor:
    """q (n, Hkv, rep, D); keys, values (n, Hkv, t + 1, D) of the rows' completions.
    Returns (n, Hkv, rep, D).

    Half-precision inputs are computed in float32: SDPA, which the training forward runs,
    keeps scores and probabilities in float32 for them, and a bf16 matmul would round each
    score to 3 significant digits."""
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q = q.to(work) * q.shape[-1] ** -0.5
    keys, values = keys.to(work), values.to(work)
    G, rows, P = cache.G, cache.rows, cache.P
    kp, vp = cache.kp[layer].to(work), cache.vp[layer].to(work)
    N = kp.shape[0] * G
    n, Hkv, rep, D = q.shape
    full = n == N  # no row has left yet: rows are 0..N-1 in order
    q_all = q if full else q.new_zeros(N, Hkv, rep, D).index_copy(0, rows, q)
    # per group: (B, Hkv, G*rep, P) scores, the prompt's padding masked by its (B, P) bias
    scores = _by_group(q_all, G) @ kp.transpose(2, 3) + cache.prompt_bias[:, None, None, :]
    to_prompt = _by_row(scores, G)  # (N, Hkv, rep, P)
    if not full:
        to_prompt = to_prompt[rows]
    to_self = q @ keys.transpose(2, 3)  # (n, Hkv, rep, t + 1)
    probs = torch.cat([to_prompt, to_self], dim=-1).softmax(dim=-1)
    p_prompt, p_self = probs.split([P, keys.shape[2]], dim=-1)
    if not full:
        p_prompt = p_prompt.new_zeros(N, Hkv, rep, P).index_copy(0, rows, p_prompt)
    out_prompt = _by_row(_by_group(p_prompt, G) @ vp, G)  # (N, Hkv, rep, D)
    if not full:
        out_prompt = out_prompt[rows]
    return (out_prompt + p_self @ values).to(dtype)


def decode(
    parts: LlamaParts,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    G: int,
    max_new_tokens: int,
    next_token: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    ends_row: Callable[[list[Tensor], Tensor, Tensor], Tensor],
    pad: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample up to max_new_tokens for B*G rows; finished rows leave the batch.

    next_token(logits (n, V) float32, rows (n,)) -> (token (n,), logp (n,)) for the n rows still
    in the batch (of the N; a sampler draws N uniforms and uses theirs, so that the random stream
    advances as if every row were decoded); ends_row(tokens so far as
    T x (N,) with pad on finished rows, token (N,), live (N,)) -> (N,) bool, the rows this token
    ends. Returns tokens (N, T) (pad after a row ended), logps (N, T) and end (N,) (the index
    of each row's last token, -1 where none ended it).
    """
    B, P = prompt_ids.shape
    N = B * G
    device = prompt_ids.device
    logits, cache = prefill(parts, prompt_ids, prompt_mask, G, max_new_tokens)
    logits = logits.float().repeat_interleave(G, 0)  # (N, V)
    position = prompt_mask.sum(1).repeat_interleave(G)  # (N,) the next token's position
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    end = torch.full((N,), -1, dtype=torch.long, device=device)
    tokens: list[Tensor] = []
    logps: list[Tensor] = []
    for t in range(max_new_tokens):
        rows = cache.rows  # the row each cache row holds
        token_live, logp_live = next_token(logits, rows)  # (n,)
        # rows that finished but are still in the batch compute on; what they draw is dropped
        ended = finished[rows]
        token = torch.full((N,), pad, dtype=token_live.dtype, device=device)
        logp = torch.zeros(N, dtype=logp_live.dtype, device=device)
        token[rows] = token_live.masked_fill(ended, pad)
        logp[rows] = logp_live.masked_fill(ended, 0.0)
        tokens.append(token)
        logps.append(logp)
        live = ~finished
        done = ends_row(tokens, token, live) & live
        end[done] = t
        finished |= done
        if finished.all() or t == max_new_tokens - 1:
            break
        # Finished rows leave the batch once they are an eighth of it: each removal copies the
        # cache, so removing them one at a time would cost more than it saves.
        still = ~finished[rows]  # (n,) cache rows that go on
        if (~still).sum() * 8 >= len(rows):
            keep = still.nonzero().squeeze(1)
            cache.keep(keep)
            token_live = token_live[keep]
        logits = decode_step(parts, token_live, position[cache.rows] + t, cache, t).float()
    return torch.stack(tokens, 1), torch.stack(logps, 1), end
