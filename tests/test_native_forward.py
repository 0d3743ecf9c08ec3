"""grpo_lab's own forward (policy/native.py, ``policy.model_impl=auto``) against transformers'.

Every test builds small models of each supported architecture in code: Llama (attention and
MLP biases, untied head), Mistral (one key/value head for four query heads, tied), Qwen2 (q/k/v
biases) and Qwen3 (q/k norms, head_dim != hidden / heads, attention bias, tied); all with
grouped-query attention. Their weights are drawn large (the default init gives a near-uniform
next-token distribution that would hide a wrong attention pattern), biases and norm weights
away from 0 and 1, so that each part changes the output.

The reference is always transformers' own forward of the same model: ``model(...)`` over
prompt + completion, ``model.generate``, or ``completion_logprobs(model_impl="transformers")``.
``native.llama_parts(model) is not None`` is asserted wherever the native path is meant to run,
so a test cannot end up comparing transformers with itself.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from grpo_lab.policy import char_tokenizer, native, tiny_llama
from grpo_lab.policy.forward import completion_logprobs
from grpo_lab.policy.lora import apply_lora
from grpo_lab.sampling import KVCacheSampler
from grpo_lab.sampling.base import Completions

VOCAB = len(char_tokenizer())  # 100: the char tokenizer decodes every id (stop strings)
PAD, BOS = 0, 1
COMMON = dict(
    vocab_size=VOCAB,
    num_hidden_layers=2,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=2,
)

ARCH_CONFIGS = {
    "llama": (
        LlamaConfig,
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
        ),
    ),
    "mistral": (
        MistralConfig,
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            sliding_window=None,  # Mistral's default window (4096) makes the native path refuse
            tie_word_embeddings=True,
        ),
    ),
    "qwen2": (  # q/k/v always carry a bias
        Qwen2Config,
        dict(
            hidden_size=32, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False
        ),
    ),
    "qwen3": (  # q_norm / k_norm per head; head_dim 16, not 32 / 4
        Qwen3Config,
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            attention_bias=True,
            tie_word_embeddings=True,
        ),
    ),
}
ARCHS = list(ARCH_CONFIGS)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that attention and every bias and norm matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.dim() == 2:
                p.copy_(noise * 0.3)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:  # biases
                p.copy_(0.2 * noise)


def build(arch: str, seed: int = 0, **config) -> PreTrainedModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config_cls, arch_config = ARCH_CONFIGS[arch]
        model = AutoModelForCausalLM.from_config(config_cls(**{**COMMON, **arch_config, **config}))
    _randomize(model, seed)
    model.generation_config.eos_token_id = COMMON["eos_token_id"]
    model.generation_config.pad_token_id = PAD
    return model.eval()


def _prompts(lengths: list[int], width: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Left-padded random prompts (len(lengths), width) of real ids 4.. (no special token)."""
    ids = torch.randint(4, VOCAB, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def random_completions(G: int | None, T: int = 6, seed: int = 0) -> Completions:
    """12 rows. G: 12 / G groups whose rows share a prompt; None: 12 different prompts.
    Prompt lengths 1..7, completion lengths 1..T with 1 and T present, padded after the end."""
    gen = torch.Generator().manual_seed(seed)
    N, P = 12, 7
    n_prompts = N // G if G else N
    prompt_lengths = [7, 4, 1, 2, 6, 3, 5, 7, 2, 4, 1, 6][:n_prompts]
    prompt_ids, prompt_mask = _prompts(prompt_lengths, P, gen)
    repeat = G or 1
    lengths = torch.tensor([1, T, 3, T, 2, 5, T, 4, T, 1, 3, 2]).clamp(max=T)
    completion_mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    completion_ids = torch.randint(4, VOCAB, (N, T), generator=gen)
    return Completions(
        prompt_ids=prompt_ids.repeat_interleave(repeat, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(repeat, dim=0),
        completion_ids=completion_ids.masked_fill(completion_mask == 0, PAD),
        completion_mask=completion_mask,
        truncated=lengths == T,
    )


def full_forward_logits(model, c: Completions) -> torch.Tensor:
    """transformers' logits (N, T, V) that predict each completion token, from one forward of
    prompt + completion with positions that skip the left padding."""
    ids = torch.cat([c.prompt_ids, c.completion_ids], dim=1)
    mask = torch.cat([c.prompt_mask, c.completion_mask], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    P = c.prompt_ids.shape[1]
    return logits[:, P - 1 : -1]


def reference_logprobs(model, c: Completions, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] in float64, 0 on padding: (N, T)."""
    logits = full_forward_logits(model, c).double() / temperature
    logp = logits.log_softmax(-1).gather(-1, c.completion_ids.unsqueeze(-1)).squeeze(-1)
    return logp * c.completion_mask


def loss_and_grads(model, c: Completions, logprobs) -> tuple[torch.Tensor, dict]:
    """logp and the gradient of every trainable parameter of a loss that weighs each real token
    by its own random coefficient (so every token's gradient counts, with its sign)."""
    weights = torch.randn(c.completion_mask.shape, generator=torch.Generator().manual_seed(7))
    model.zero_grad(set_to_none=True)
    logp = logprobs(model, c)
    (logp * weights * c.completion_mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logp.detach(), grads


def assert_same_logp_and_grads(got, want, mask) -> None:
    logp, grads = got
    want_logp, want_grads = want
    m = mask.bool()
    torch.testing.assert_close(logp[m].double(), want_logp[m].double(), rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        ref = want_grads[name]
        assert ref.abs().max() > 0, f"{name} takes no part in the loss"
        err = ((g - ref).norm() / ref.norm()).item()
        assert err < 1e-5, f"{name}: relative gradient error {err:.2e}"


# --------------------------------------------------------------------------- training forward


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("G", "T", "masked_rows"),
    [
        (None, 6, []),
        (4, 6, []),
        (3, 6, []),
        (4, 1, []),  # every completion one token: no completion token is an input
        # rows whose whole completion is masked out (the module masks truncated completions)
        (None, 6, [1, 5, 6]),
        (4, 6, [1, 5, 6]),
    ],
    ids=["plain", "G4", "G3", "G4_width1", "plain_masked_rows", "G4_masked_rows"],
)
def test_native_logprobs_and_gradients_equal_transformers(arch, G, T, masked_rows):
    model = build(arch)
    assert native.llama_parts(model) is not None, "the native path must run"
    c = random_completions(G, T=T)
    c.completion_mask[masked_rows] = 0

    def run(impl):
        def logprobs(m, c):
            return completion_logprobs(m, c, temperature=0.7, group_size=G, model_impl=impl)[0]

        return loss_and_grads(model, c, logprobs)

    assert_same_logp_and_grads(run("auto"), run("transformers"), c.completion_mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_native_logprobs_equal_a_float64_full_forward(arch):
    """Both paths against the most direct computation: a float64 copy of the model, one
    forward of prompt + completion. Padding scores exactly 0."""
    model = build(arch)
    c = random_completions(4)
    with torch.no_grad():
        got, _ = completion_logprobs(model, c, group_size=4, model_impl="auto")
        want = reference_logprobs(build(arch).double(), c)
    m = c.completion_mask.bool()
    torch.testing.assert_close(got[m].double(), want[m], rtol=1e-5, atol=1e-5)
    assert (got[~m] == 0).all()


ROPE_SCALINGS = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
        "rope_theta": 500000.0,
    },
    # yarn also scales cos and sin (its attention factor)
    "yarn": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 8,
        "rope_theta": 100.0,
    },
}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("rope", list(ROPE_SCALINGS))
def test_native_logprobs_follow_the_models_rope_scaling(arch, rope):
    model = build(arch, rope_parameters=ROPE_SCALINGS[rope])
    assert native.llama_parts(model) is not None
    c = random_completions(4)
    with torch.no_grad():
        got, _ = completion_logprobs(model, c, group_size=4, model_impl="auto")
        want = reference_logprobs(model, c)
        plain_rope = reference_logprobs(build(arch), c)
    m = c.completion_mask.bool()
    torch.testing.assert_close(got[m].double(), want[m], rtol=1e-5, atol=1e-5)
    assert (want - plain_rope).abs().max() > 1e-2, "the scaling must change the log-probs"


# --------------------------------------------------------------------------- decoding


def _generate(model, prompt_ids, prompt_mask, T: int, eos: int | None) -> torch.Tensor:
    """transformers' greedy completions (B, T), pad after EOS and after an early stop."""
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=T,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=PAD,
        top_k=None,
        top_p=None,
    )[:, prompt_ids.shape[1] :]
    return torch.cat([out, out.new_full((out.shape[0], T - out.shape[1]), PAD)], dim=1)


def _eos_that_ends_some_rows(greedy: torch.Tensor) -> int:
    """A token of the (EOS-free) greedy completions (B, T) whose first occurrence differs the
    most between rows while some rows never emit it: made the EOS, it ends rows at several
    steps and leaves others running to the limit."""
    T = greedy.shape[1]
    best, best_score = None, -1
    for token in range(4, VOCAB):
        hit = greedy == token
        if hit.any(1).all() or not hit.any():
            continue
        firsts = {
            int(row.int().argmax()) for row in hit if row.any() and row.int().argmax() < T - 1
        }
        if len(firsts) > best_score:
            best, best_score = token, len(firsts)
    assert best is not None and best_score >= 2, "no token ends rows at two different steps"
    return best


PROMPT_LENGTHS = [1, 3, 5, 8, 2, 6]
T_DECODE = 12


@pytest.fixture(scope="module", params=ARCHS)
def decoding_model(request):
    """(arch, model, prompt_ids, prompt_mask) with an EOS that greedy decoding emits in some
    rows at different steps and never in others."""
    model = build(request.param, seed=1)
    prompt_ids, prompt_mask = _prompts(PROMPT_LENGTHS, 8, torch.Generator().manual_seed(3))
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        free = _generate(model, prompt_ids, prompt_mask, T_DECODE, eos=None)
    eos = _eos_that_ends_some_rows(free)
    model.generation_config.eos_token_id = eos
    return request.param, model, prompt_ids, prompt_mask


def _decode_batch_sizes(model):
    """Record the rows of every decode step (the embedding's input) during the native decode."""
    sizes: list[int] = []
    parts = native.llama_parts(model)
    handle = parts.embed.register_forward_hook(
        lambda module, args, out: sizes.append(args[0].shape[0]) if args[0].dim() == 1 else None
    )
    return sizes, handle


@pytest.fixture(params=["prompt_per_row", "prompt_per_group"])
def prompt_layout(request, monkeypatch):
    """Both ways the native decode keeps a prompt's keys: copied to its G rows (short prompts)
    or once per group, attended through one matmul per group (long prompts)."""
    threshold = 10**9 if request.param == "prompt_per_row" else 0
    monkeypatch.setattr(native, "SHARED_PROMPT_MIN_TOKENS", threshold)
    return request.param


def test_greedy_native_decode_equals_generate_while_finished_rows_leave(decoding_model):
    arch, model, prompt_ids, prompt_mask = decoding_model
    assert native.llama_parts(model) is not None
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        want = _generate(model, prompt_ids, prompt_mask, T_DECODE, eos=eos)  # (B, T)
    sizes, handle = _decode_batch_sizes(model)
    try:
        got = KVCacheSampler(max_new_tokens=T_DECODE).sample(
            model, prompt_ids, prompt_mask, 2, greedy=True
        )
    finally:
        handle.remove()
    B = len(PROMPT_LENGTHS)
    ended = (want == eos).any(1)
    assert ended.any() and not ended.all(), "some rows must end early, others run on"
    lengths = []
    for b in range(B):
        n = int((want[b] == eos).int().argmax()) + 1 if ended[b] else T_DECODE
        lengths.append(n)
        expected = want[b, :n].tolist() + [PAD] * (T_DECODE - n)
        for row in (2 * b, 2 * b + 1):  # greedy: both samples of a prompt are the one decode
            assert got.completion_ids[row].tolist() == expected, (arch, b)
            assert got.completion_mask[row].tolist() == [1] * n + [0] * (T_DECODE - n)
            assert bool(got.truncated[row]) == (not ended[b])
    # The rows that ended left the batch: after token t only rows longer than t + 1 decode
    # (no step runs after the last token, T - 1).
    assert sizes == [sum(n > t + 1 for n in lengths) for t in range(T_DECODE - 1)]
    assert sizes[-1] < B


def test_native_and_transformers_sampler_decode_the_same_greedy_tokens(decoding_model):
    arch, model, prompt_ids, prompt_mask = decoding_model
    got = {}
    for impl in ("auto", "transformers"):
        sampler = KVCacheSampler(max_new_tokens=T_DECODE)
        sampler.configure(None, impl)
        got[impl] = sampler.sample(model, prompt_ids, prompt_mask, 3, greedy=True)
    for field in ("completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(got["auto"], field), getattr(got["transformers"], field))


def _filtered_reference(model, c: Completions, temperature: float, top_k: int) -> torch.Tensor:
    """log q of each sampled token, q = softmax of the top_k logits / temperature, float64."""
    logits = full_forward_logits(model, c).double() / temperature  # (N, T, V)
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = logits.log_softmax(-1).gather(-1, c.completion_ids.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(c.completion_mask == 0, 0.0)


@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("stop", [False, True], ids=["eos", "stop_strings"])
def test_sampled_logp_equals_a_full_forward_over_the_sampled_tokens(
    decoding_model, top_k, stop, prompt_layout
):
    arch, model, prompt_ids, prompt_mask = decoding_model
    assert native.llama_parts(model) is not None
    tok = char_tokenizer()
    sampler = KVCacheSampler(max_new_tokens=T_DECODE, temperature=0.8, top_k=top_k)
    if stop:
        # the two most frequent characters of a first draw: some rows stop at them
        torch.manual_seed(0)
        first = sampler.sample(model, prompt_ids, prompt_mask, 4)
        chars = "".join(tok.batch_decode(first.completion_ids, skip_special_tokens=True))
        sampler.stop_strings = sorted(sorted(set(chars)), key=chars.count)[-2:]
        sampler.configure(tok, sampler.model_impl)
    torch.manual_seed(1)
    c = sampler.sample(model, prompt_ids, prompt_mask, 4)
    want = _filtered_reference(model, c, 0.8, top_k)
    m = c.completion_mask.bool()
    torch.testing.assert_close(c.sampling_logp[m].double(), want[m], rtol=1e-5, atol=1e-5)
    assert (c.sampling_logp[~m] == 0).all()
    # the check bites: some rows ended early (and left the batch), some ran to the limit
    assert c.truncated.any() and (c.lengths < T_DECODE).any()
    if stop:
        last = c.completion_ids.gather(1, (c.lengths - 1).unsqueeze(1)).squeeze(1)
        eos = model.generation_config.eos_token_id
        assert (~c.truncated & (last != eos)).any(), "a stop string must end some row"


def test_both_model_impls_sample_the_same_tokens_when_rows_end_early(decoding_model, prompt_layout):
    """With one seed both decodes draw the same uniforms at every step (the native decode draws
    one for every row, finished or not, and uses the live rows' ones), so they sample the same
    tokens, also after rows have ended and left the native batch."""
    arch, model, prompt_ids, prompt_mask = decoding_model
    got = {}
    for impl in ("auto", "transformers"):
        sampler = KVCacheSampler(max_new_tokens=T_DECODE, temperature=0.8)
        sampler.configure(None, impl)
        torch.manual_seed(2)
        got[impl] = sampler.sample(model, prompt_ids, prompt_mask, 4)
    auto, theirs = got["auto"], got["transformers"]
    ends = auto.lengths[~auto.truncated]
    assert len(ends) and int(ends.min()) < T_DECODE - 1, (
        "a row must end early for the check to bite"
    )
    assert auto.truncated.any(), "and another must go on after it"
    assert torch.equal(auto.completion_ids, theirs.completion_ids)
    assert torch.equal(auto.completion_mask, theirs.completion_mask)
    torch.testing.assert_close(auto.sampling_logp, theirs.sampling_logp, rtol=1e-5, atol=1e-5)


def test_a_long_prompt_is_kept_once_per_group_and_decodes_as_transformers_does(monkeypatch):
    """A prompt of SHARED_PROMPT_MIN_TOKENS or more is kept once per group by default (its keys
    held (B, ...), not (B*G, ...)); the tokens and log-probs equal transformers' decode."""
    model = build("llama", seed=1)
    P = native.SHARED_PROMPT_MIN_TOKENS + 5
    prompt_ids, prompt_mask = _prompts([P, P - 9], P, torch.Generator().manual_seed(5))
    shapes = []
    prefill = native.prefill

    def recording_prefill(*args, **kwargs):
        logits, cache = prefill(*args, **kwargs)
        shapes.append(None if cache.kp is None else tuple(cache.kp[0].shape))
        return logits, cache

    monkeypatch.setattr(native, "prefill", recording_prefill)
    got = {}
    for impl in ("auto", "transformers"):
        sampler = KVCacheSampler(max_new_tokens=8, temperature=0.9)
        sampler.configure(None, impl)
        torch.manual_seed(4)
        got[impl] = sampler.sample(model, prompt_ids, prompt_mask, 4)
    assert shapes and shapes[0][0] == 2  # B prompts, not B*G rows
    auto, theirs = got["auto"], got["transformers"]
    assert torch.equal(auto.completion_ids, theirs.completion_ids)
    torch.testing.assert_close(auto.sampling_logp, theirs.sampling_logp, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- half-precision decode
# (found in the review of issue 9: each test failed before its fix)


def _sample_half(model, prompt_ids, prompt_mask, impl: str):
    sampler = KVCacheSampler(max_new_tokens=12, temperature=1.0)
    sampler.configure(None, impl)
    torch.manual_seed(5)
    return sampler.sample(model, prompt_ids, prompt_mask, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_half_precision_native_decode_draws_what_transformers_decode_draws(dtype, arch):
    """bf16/fp16, short prompts (keys per row): the native decode and transformers' decode
    draw the same tokens from the same uniforms, with the same log-probs, as they do in float32.

    Before the fix the native decode's attention ran as matmuls in the model's dtype: each
    score q.k (and q itself, scaled by 1/sqrt(D)) was rounded to bf16, 3 significant digits,
    before the softmax, where SDPA (transformers' decode and the training forward) keeps them
    in float32. 11 of 16 llama bf16 samples came out different, and the drawn tokens' log-probs
    sat 2 to 9 times further from what the GRPO step's forward gives them.
    """
    model = build(arch).to(dtype)
    assert native.llama_parts(model) is not None
    gen = torch.Generator().manual_seed(1)
    prompt_ids, prompt_mask = _prompts([7, 4, 1, 6], 7, gen)
    assert prompt_ids.shape[1] < native.SHARED_PROMPT_MIN_TOKENS  # the per-row layout
    got = _sample_half(model, prompt_ids, prompt_mask, "auto")
    want = _sample_half(model, prompt_ids, prompt_mask, "transformers")
    assert want.lengths.float().mean() > 3  # rows decode for several steps
    assert torch.equal(got.completion_mask, want.completion_mask)
    assert torch.equal(got.completion_ids, want.completion_ids)
    torch.testing.assert_close(got.sampling_logp, want.sampling_logp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows_left", [False, True], ids=["all_rows", "rows_left"])
def test_shared_prompt_attention_keeps_scores_in_float32(dtype, rows_left):
    """The long-prompt decode attention (prompt keys once per group) of half-precision keys and
    values equals a float64 attention over the same inputs to within the output's own rounding
    (2 units in the last place of dtype), as SDPA's would.

    Before the fix it multiplied q by 1/sqrt(D) and took q.k in the model's dtype, so q and
    each score were rounded to 8 (bf16) or 11 (fp16) significant bits before the softmax: a
    score s moves by up to s/512 in bf16, a probability by as much relatively; here the output
    was off by up to 3863 (bf16) and 741 (fp16) units in the last place of its elements.
    """
    gen = torch.Generator().manual_seed(0)
    B, G, P, T, Hkv, rep, D = 2, 3, 33, 5, 2, 2, 24
    t = 3  # the completion token being decoded: its keys are in slots 0..t
    parts = native.LlamaParts(
        embed=None, layers=[None], norm=None, rotary=None, head=None,
        num_heads=Hkv * rep, num_kv_heads=Hkv, head_dim=D,
    )  # fmt: skip

    def randn(*shape):  # large entries: scores of tens, a sharp softmax
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2.5).to(dtype)

    cache = native.KVCache(parts, B, G, P, T, torch.zeros(1, dtype=dtype), shared=True)
    cache.kp[0].copy_(randn(B, Hkv, P, D))
    cache.vp[0].copy_(randn(B, Hkv, P, D))
    cache.k[0].copy_(randn(B * G, Hkv, T, D))
    cache.v[0].copy_(randn(B * G, Hkv, T, D))
    cache.prompt_bias[0, :5] = float("-inf")  # the first prompt is left-padded by 5
    if rows_left:
        cache.keep(torch.tensor([0, 2, 3, 5]))  # rows 1 and 4 finished
    n = len(cache.rows)
    q = randn(n, Hkv, rep, D)
    keys, values = cache.k[0][:, :, : t + 1], cache.v[0][:, :, : t + 1]

    got = native._shared_prompt_attention(q, keys, values, cache, 0)

    # float64: row r (of group r // G) attends to its prompt's real tokens and to its own
    # completion tokens 0..t, every query head h to key head h // rep
    want = torch.empty(n, Hkv, rep, D, dtype=torch.float64)
    for i, r in enumerate(cache.rows.tolist()):
        b = r // G
        real = cache.prompt_bias[b] == 0
        k_all = torch.cat([cache.kp[0][b][:, real], keys[i]], dim=1).double()  # (Hkv, L, D)
        v_all = torch.cat([cache.vp[0][b][:, real], values[i]], dim=1).double()
        scores = q[i].double() @ k_all.transpose(1, 2) / D**0.5  # (Hkv, rep, L)
        want[i] = scores.softmax(-1) @ v_all
    assert got.dtype == dtype
    ulp = torch.finfo(dtype).eps * want.abs().clamp(min=torch.finfo(dtype).tiny)
    err = (got.double() - want).abs() / ulp  # in units in the last place of dtype, about
    assert err.max() <= 2, f"max error {err.max():.1f} ulp"


# --------------------------------------------------------------------------- LoRA

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("G", [None, 4], ids=["plain", "G4"])
def test_lora_native_logprobs_and_adapter_gradients_equal_transformers(arch, G):
    lora = apply_lora(build(arch), enabled=True, r=4, alpha=8, target_modules=ALL_LINEAR)
    gen = torch.Generator().manual_seed(4)
    for p in lora.parameters():  # peft starts B at 0: make the adapters act
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2, generator=gen)
    assert native.llama_parts(lora) is not None, "the native path must run under peft"
    c = random_completions(G)

    def run(impl):
        def logprobs(m, c):
            return completion_logprobs(m, c, group_size=G, model_impl=impl)[0]

        return loss_and_grads(lora, c, logprobs)

    auto = run("auto")
    assert auto[1] and all("lora_" in n for n in auto[1]), "only the adapters train"
    assert_same_logp_and_grads(auto, run("transformers"), c.completion_mask)

    m = c.completion_mask.bool()
    with torch.no_grad(), lora.disable_adapter():  # the reference pass: the base model
        base = completion_logprobs(lora, c, group_size=G, model_impl="auto")[0]
        base_want = completion_logprobs(lora, c, group_size=G, model_impl="transformers")[0]
    torch.testing.assert_close(base[m], base_want[m], rtol=1e-5, atol=1e-5)
    assert (base[m] - auto[0][m]).abs().max() > 1e-2, "disabling the adapters must change logp"


# --------------------------------------------------------------------------- fallbacks


def _gpt2() -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=BOS
    )
    config.eos_token_id = 2
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    _randomize(model)
    return model.eval()


FALLBACKS = {
    "gpt2": _gpt2,
    # every sequence here (prompt 7 + completion 6) is longer than the window of 4
    "mistral_sliding_window": lambda: build("mistral", sliding_window=4),
    "qwen2_sliding_layers": lambda: build(
        "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
@pytest.mark.parametrize("G", [None, 4], ids=["plain", "G4"])
def test_unsupported_models_fall_back_to_transformers_forward(name, G):
    model = FALLBACKS[name]()
    assert native.llama_parts(model) is None
    c = random_completions(G)
    with torch.no_grad():
        got, _ = completion_logprobs(model, c, group_size=G, model_impl="auto")
        want = reference_logprobs(model, c)
    m = c.completion_mask.bool()
    torch.testing.assert_close(got[m].double(), want[m], rtol=1e-5, atol=1e-5)


def test_the_sliding_window_fallback_matters():
    """Without the window the same weights give other log-probs: running the native (full
    attention) forward on a windowed model would be wrong, not merely slower."""
    c = random_completions(None)
    with torch.no_grad():
        windowed = reference_logprobs(build("mistral", sliding_window=4), c)
        full = reference_logprobs(build("mistral"), c)
    assert (windowed - full).abs().max() > 1e-2


def _checkpointed(arch: str, training: bool) -> PreTrainedModel:
    model = build(arch)
    model.gradient_checkpointing_enable()
    return model.train(training)  # transformers checkpoints only in training mode


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize(
    ("G", "training"),
    # GRPOModule keeps the policy in eval mode; train mode is where checkpointing acts
    [(None, True), (None, False), (4, False)],
    ids=["plain_train", "plain_eval", "G4_eval"],
)
def test_gradient_checkpointing_falls_back_with_the_same_logprobs_and_gradients(arch, G, training):
    model = _checkpointed(arch, training)
    assert native.llama_parts(model) is None
    c = random_completions(G)

    def ours(m, c):
        return completion_logprobs(m, c, group_size=G, model_impl="auto")[0]

    def full(m, c):
        return reference_logprobs(m, c).float()

    assert_same_logp_and_grads(
        loss_and_grads(model, c, ours), loss_and_grads(model, c, full), c.completion_mask
    )


def test_gradient_checkpointing_under_peft_falls_back():
    lora = apply_lora(build("llama"), enabled=True, r=4, alpha=8)
    assert native.llama_parts(lora) is not None
    lora.gradient_checkpointing_enable()
    assert native.llama_parts(lora) is None


def test_shared_prefix_under_gradient_checkpointing_in_training_mode():
    model = _checkpointed("llama", training=True)
    c = random_completions(4)
    got, _ = completion_logprobs(model, c, group_size=4, model_impl="auto")
    want = reference_logprobs(model, c)
    m = c.completion_mask.bool()
    torch.testing.assert_close(got[m].double(), want[m].detach(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- configuration


def test_a_bogus_model_impl_is_a_config_error_naming_the_key_and_the_allowed_values():
    from grpo_lab.config import ConfigError, validate
    from helpers import compose

    cfg = compose("policy.model_impl=bogus", check=False)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "policy.model_impl" in message and "bogus" in message
    assert "auto" in message and "transformers" in message


def test_tiny_llama_refuses_a_bogus_model_impl():
    with pytest.raises(ValueError, match=r"policy\.model_impl='bogus'.*auto, transformers"):
        tiny_llama(hidden_size=32, intermediate_size=64, model_impl="bogus")


# --------------------------------------------------------------------------- in the GRPO module


@pytest.mark.parametrize("impl", ["auto", "transformers"])
def test_every_forward_of_a_grpo_step_and_of_greedy_eval_follows_policy_model_impl(impl):
    """A real Lightning fit of one rollout (sampling, pi_old with mu=2, the reference with
    beta > 0, the training forwards) and a greedy eval. transformers' decoder forward
    (``LlamaModel.forward``, which grpo_lab's own forward never calls: it runs the decoder's
    layers itself) runs at each of these places with "transformers" and at none with "auto"."""
    from grpo_lab.data import TaskDataModule
    from grpo_lab.evaluate import greedy_accuracy
    from grpo_lab.rewards.combine import RewardSet
    from helpers import FAST, cpu_trainer, module_of

    policy = tiny_llama(hidden_size=32, intermediate_size=64, num_layers=1, model_impl=impl)
    module = module_of(
        *FAST,  # G=4, beta=0.04, arithmetic up to 9
        "mu=2",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.shared_prefix=false",
        "sampler=kv_cache",
        "sampler.max_new_tokens=4",
        policy=policy,
        rewards=RewardSet(
            {"length": lambda completions, examples, **ctx: [len(c) for c in completions]}
        ),
    )
    task = module.task
    assert module.sampler.model_impl == impl
    calls: list[str] = []

    def record(where):
        return lambda mod, args, kwargs, out: calls.append(where(mod))

    hooks = [
        # the sampler calls the whole model; the log-prob forwards call its decoder
        policy.model.register_forward_hook(record(lambda m: "sample"), with_kwargs=True),
        policy.model.model.register_forward_hook(
            record(lambda m: "train" if torch.is_grad_enabled() else "policy"), with_kwargs=True
        ),
        module.reference_model.model.register_forward_hook(
            record(lambda m: "reference"), with_kwargs=True
        ),
    ]
    try:
        cpu_trainer(max_steps=2).fit(  # one rollout: mu = 2 passes of one mini-batch
            module, datamodule=TaskDataModule(task, 2, 4, 4, seed=0)
        )
        assert module.last_rollout.old_logp is not None and module.last_rollout.ref_logp is not None
        in_training = set(calls)
        sampler = KVCacheSampler(max_new_tokens=4)
        sampler.configure(None, "transformers" if impl == "auto" else "auto")
        calls.clear()
        greedy_accuracy(policy, task.eval()[:4], task, sampler)
        in_eval = set(calls)
    finally:
        for h in hooks:
            h.remove()
    assert sampler.model_impl == impl
    if impl == "auto":
        assert in_training == set() and in_eval == set()
    else:
        assert in_training == {"sample", "policy", "train", "reference"}
        assert "sample" in in_eval


# --------------------------------------------------------------------------- a training run


def _metric_histories(client, run_id: str) -> dict[str, list[float]]:
    """Every logged metric but perf/* (timings), its values in step order."""
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("perf/")]
    return {
        key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=_step)]
        for key in keys
    }


def _step(metric) -> tuple[int, int]:
    return metric.step, metric.timestamp


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        # native training forward (pi_old, pi_ref, pi_theta); generate samples in both runs
        ["sampler=generate"],
        # native sampler and greedy eval too. The native decode drops finished rows but draws a
        # uniform for every row at every step (as transformers' path does), so the random
        # stream, hence every sample, is the same in both runs; FAST's completions end early.
        ["sampler=kv_cache"],
    ],
    ids=["generate", "kv_cache"],
)
def test_a_training_run_logs_the_same_metrics_with_either_model_impl(
    run_cli, tracking_uri, overrides
):
    """One sweep of two real CLI runs (SFT warm start, 2 rollouts of 4 prompts x G=4, greedy
    evals) that differ only in policy.model_impl: every metric but perf/* agrees."""
    from mlflow import MlflowClient

    from helpers import FAST

    run_cli("train", "-m", *FAST, *overrides, "policy.model_impl=transformers,auto")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    jobs = [
        r for r in client.search_runs([exp.experiment_id]) if "policy.model_impl" in r.data.params
    ]
    histories = {
        r.data.params["policy.model_impl"]: _metric_histories(client, r.info.run_id) for r in jobs
    }
    assert len(jobs) == 2 and histories.keys() == {"transformers", "auto"}
    # FAST's batches are whole groups: train.shared_prefix=auto resolved to on, and says so
    assert {r.data.tags.get("grpo_lab.shared_prefix") for r in jobs} == {"true"}
    want, got = histories["transformers"], histories["auto"]
    assert got.keys() == want.keys()
    assert {"loss", "kl", "grad_norm", "reward", "eval/accuracy"} <= want.keys()
    for key, values in want.items():
        assert len(values) >= 1, key
        assert got[key] == pytest.approx(values, rel=1e-4, abs=1e-6), key


# --------------------------------------------------------------------------- train.compile


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["auto", "transformers"])
def test_train_compile_compiles_the_forward_and_changes_no_number(impl):
    """train.compile=true compiles what runs the forward (the norms and MLP of the native one,
    transformers' decoder otherwise), in place: state_dict keys stay, and the log-probs and
    every gradient equal the eager model's."""
    import copy

    model = build("llama")
    compiled = copy.deepcopy(model)
    native.compile_model(compiled, impl)
    layer = compiled.model.layers[0]
    if impl == "auto":
        assert layer.mlp._compiled_call_impl is not None
        assert compiled.model._compiled_call_impl is None  # the attention stays eager
    else:
        assert compiled.model._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(model.state_dict())
    c = random_completions(4)
    results = []
    for m in (model, compiled):
        logp, _ = completion_logprobs(m, c, group_size=4, model_impl=impl)
        (logp * c.completion_mask).sum().backward()
        results.append((logp, [p.grad.clone() for p in m.parameters()]))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Inductor's fused kernels add in another order: a few elements of a gradient move by float
    # rounding (6e-5 on gradients of ~1 here), so compare each gradient as a whole, as
    # assert_same_logp_and_grads does.
    for g, w in zip(got_grads, want_grads):
        # compiled kernels fuse and reorder float32 sums: rounding, relative to the gradient's scale
        scale = float(w.abs().max())
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5 * scale + 1e-7)


@pytest.mark.parametrize(
    ("overrides", "shared", "compiled"),
    [
        ([], True, False),  # defaults: B*G = 16*8, one mini-batch of whole groups
        (["train.compile=true"], True, True),
        (["train.minibatch_size=4"], False, False),  # 4 rows: not whole groups of 8
        (["train.microbatch_size=4", "train.minibatch_size=64"], False, False),
        (["train.shared_prefix=false"], False, False),
        (["train.minibatch_size=32", "train.microbatch_size=16"], True, False),
    ],
)
def test_the_config_reaches_the_step_as_it_says(overrides, shared, compiled):
    """train.shared_prefix=auto is on exactly when every mini- and micro-batch holds whole
    groups; train.compile reaches the module."""
    from grpo_lab.train import build_module
    from helpers import compose

    module = build_module(compose(*overrides))
    assert (module.algo.batching.shared, module.train_cfg.compile) == (shared, compiled)
    assert (module.algo.group_size is not None) == shared  # what the forwards are given


def test_train_compile_happens_in_setup_so_that_spawned_processes_keep_it():
    """ddp_spawn pickles the module to its processes, and a pickled module loses a compiled
    forward: the module compiles in setup (which runs in each process), not in __init__."""
    from multiprocessing.reduction import ForkingPickler

    from helpers import FAST, module_of

    module = module_of(
        *FAST,  # G=4, beta=0.04: a reference model to compile too
        "policy.num_layers=1",
        "reward=accuracy",  # picklable, as spawn needs
        "sampler.max_new_tokens=4",
        "train.compile=true",
    )
    spawned = ForkingPickler.loads(ForkingPickler.dumps(module))
    for m in (module, spawned):
        assert m.policy.model.layers[0].mlp._compiled_call_impl is None
        m.setup("fit")
        for model in (m.policy, m.reference_model):
            assert model.model.layers[0].mlp._compiled_call_impl is not None


def test_an_attention_kernel_the_user_chose_runs_transformers_forward():
    """policy.attn_implementation=flash_attention_2 (or flex, ...) is transformers' kernel:
    model_impl=auto then leaves the model to transformers; eager and sdpa compute what the
    native attention computes."""
    model = build("llama")
    for kernel, native_runs in (("sdpa", True), ("eager", True), ("flex_attention", False)):
        model.config._attn_implementation = kernel
        assert (native.llama_parts(model) is not None) == native_runs, kernel


# --------------------------------------------------------------------------- CUDA kernels


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mistral", "qwen3"])  # 4 query heads on 1 and on 2 key heads
def test_native_forward_and_decode_run_on_cudas_fused_attention_kernels(arch):
    """With the math kernel switched off, the native training forward and decode still run on
    CUDA, in bf16, for grouped-query models: their attention goes to a fused kernel (memory
    efficient or cuDNN), as transformers' does.

    The native attention passes a mask (padding, causal) and enable_gqa=True; CUDA's fused
    kernels take no mask with enable_gqa, so SDPA fell back to its math kernel, which holds
    every (query, key) score (in float32 for half inputs) and keeps them for the backward: for a micro-batch of
    8 completions of 2048 tokens after a 512-token prompt, 28 heads, that is 4.7 GB per layer.
    Here the fallback is forbidden, so the old code raised "No available kernel".
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build(arch).to("cuda", torch.bfloat16)
    assert native.llama_parts(model) is not None
    c = random_completions(4)
    c = type(c)(**{k: v.cuda() if v is not None else None for k, v in vars(c).items()})
    gen = torch.Generator().manual_seed(1)
    prompt_ids, prompt_mask = _prompts([40, 37, 1, 39], 40, gen)
    fused = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused):
        logp, _ = completion_logprobs(model, c, group_size=4, model_impl="auto")
        logp.sum().backward()
        for width in (7, 40):  # the per-row and the per-group prompt layouts
            ids, mask = prompt_ids[:, -width:].cuda(), prompt_mask[:, -width:].cuda()
            KVCacheSampler(max_new_tokens=6).sample(model, ids, mask, 4)
    want, _ = completion_logprobs(model, c, group_size=4, model_impl="transformers")
    real = c.completion_mask.bool()
    torch.testing.assert_close(logp[real], want[real].detach(), rtol=0, atol=0.1)
