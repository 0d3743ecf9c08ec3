"""Review of issue 9 (grpo_lab's own forward, ``policy.model_impl=auto``): defects found beyond
the defaults, each pinned by a test that failed before its fix.

The models come from tests/test_native_forward.py (small Llama-family models built in code with
weights large enough that attention matters); the reference is transformers' own forward.
"""

from __future__ import annotations

import pytest
import torch

from grpo_lab.sampling import KVCacheSampler, completion_logprobs, native
from test_native_forward import _prompts, build

# --------------------------------------------------------------------------- half precision


def _sample(model, prompt_ids, prompt_mask, impl: str):
    sampler = KVCacheSampler(max_new_tokens=12, temperature=1.0)
    sampler.model_impl = impl
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
    got = _sample(model, prompt_ids, prompt_mask, "auto")
    want = _sample(model, prompt_ids, prompt_mask, "transformers")
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


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("value", ["1", "0", "1.0"])
def test_train_shared_prefix_takes_only_auto_true_or_false(value):
    """train.shared_prefix=1 passed the check (1 == True in Python) and then skipped the
    whole-groups check, which asks ``is True``: with mini-batches of partial groups the run
    did its SFT warm start and first rollout, then crashed in the update (train.resolve_shared_
    prefix reads 1 as true). Now 1, 0 and 1.0 are config errors naming the key."""
    from hydra import compose, initialize_config_dir

    from grpo_lab.config import ConfigError, validate
    from grpo_lab.paths import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "train.prompts_per_step=3",
                "G=4",
                "train.minibatch_size=6",  # one and a half groups
                f"train.shared_prefix={value}",
            ],
        )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert f"train.shared_prefix={value} is invalid: expected auto, true or false" in str(err.value)


# --------------------------------------------------------------------------- CUDA kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
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

    from test_native_forward import random_completions

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
