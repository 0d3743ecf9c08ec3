"""Samplers and completion log-probs on a real tiny Llama."""

from __future__ import annotations

import pytest
import torch

from grpo_lab.policy import tiny_llama
from grpo_lab.policy.forward import completion_logprobs
from grpo_lab.sampling import (
    Completions,
    GenerateSampler,
    KVCacheSampler,
    sampling_logp_gap,
    trim_at_eos,
)
from grpo_lab.sampling.base import trim_at_stop_strings

EOS, PAD = 2, 0


# --------------------------------------------------------------------------- trim_at_eos


def test_trim_at_eos_masks_and_pads_everything_after_the_first_eos():
    raw = torch.tensor(
        [
            [5, 6, EOS, 7, 8],  # EOS in the middle
            [5, 6, 7, 8, 9],  # no EOS: truncated, all real
            [EOS, 5, 6, 7, 8],  # EOS first: a one-token completion
            [5, EOS, 6, EOS, 7],  # two EOS: the first one ends it
            [5, 6, 7, 8, EOS],  # EOS on the last column: not truncated
        ]
    )
    ids, mask, truncated = trim_at_eos(raw, EOS, PAD)
    assert ids.tolist() == [
        [5, 6, EOS, PAD, PAD],
        [5, 6, 7, 8, 9],
        [EOS, PAD, PAD, PAD, PAD],
        [5, EOS, PAD, PAD, PAD],
        [5, 6, 7, 8, EOS],
    ]
    assert mask.tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ]
    assert truncated.tolist() == [False, True, False, False, False]


def test_trim_at_eos_ends_a_completion_at_the_first_of_several_eos_ids():
    IM_END = 9  # a chat model's second EOS (Qwen2.5: <|im_end|> beside <|endoftext|>)
    raw = torch.tensor(
        [
            [5, IM_END, 6, EOS, 7],  # the second id comes first: it ends the row
            [5, 6, EOS, IM_END, 7],  # the first id comes first
            [5, 6, 7, 8, 4],  # neither: truncated
        ]
    )
    ids, mask, truncated = trim_at_eos(raw, [EOS, IM_END], PAD)
    assert ids.tolist() == [[5, IM_END, PAD, PAD, PAD], [5, 6, EOS, PAD, PAD], [5, 6, 7, 8, 4]]
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_trim_at_stop_strings_cuts_at_the_token_that_completes_the_first_one_in_the_text():
    tok = tiny_llama(hidden_size=32, intermediate_size=64).tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def ids(text: str, *, end: bool = False) -> list[int]:  # one token per character
        row = tok.convert_tokens_to_ids(list(text)) + ([eos] if end else [])
        return row + [pad] * (7 - len(row))

    rows = [ids("ab8Ecdx"), ids("xg^8E"), ids("hello", end=True), ids("zzzzzzz"), ids("t6'8Eq")]
    completion_ids = torch.tensor(rows)
    mask = (completion_ids != pad).long()
    truncated = torch.tensor([True, False, False, True, False])
    out_ids, out_mask, out_truncated = trim_at_stop_strings(
        completion_ids, mask, truncated, tok, ["8E", "g^", "'8"], pad
    )
    # row 0: "8E" completes at its 4th token; row 1: "g^" at the 3rd, before "8E";
    # row 2 and 3 hold none; row 4: "'8" completes at the 4th, before "8E" (the 5th)
    lengths = [4, 3, 6, 7, 4]
    assert out_mask.tolist() == [[1] * n + [0] * (7 - n) for n in lengths]
    assert out_ids.tolist() == [r[:n] + [pad] * (7 - n) for r, n in zip(rows, lengths)]
    # a stop string ends a row: not truncated; a row with none keeps its own flag
    assert out_truncated.tolist() == [False, False, False, True, False]


# --------------------------------------------------------------------------- sampling vs pi_old


def test_sampling_logp_gap_is_the_absolute_difference_on_real_tokens_only():
    sampling = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -3.0, 0.0]])
    old = torch.tensor([[-0.7, -1.0, -9.0], [-0.4, -2.5, -5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    gap = sampling_logp_gap(sampling, old, mask)
    # |-0.5+0.7| = .2, 0, padding 0; |-0.1+0.4| = .3, |-3+2.5| = .5, |0+5| = 5
    torch.testing.assert_close(gap, torch.tensor([[0.2, 0.0, 0.0], [0.3, 0.5, 5.0]]))


def _rows(logp: list[list[float]]) -> Completions:
    """Completions whose rows are told apart by sampling_logp (exact in float32)."""
    n, T = len(logp), len(logp[0])
    return Completions(
        prompt_ids=torch.full((n, 1), 5),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.full((n, T), 7),
        completion_mask=torch.ones(n, T, dtype=torch.long),
        truncated=torch.zeros(n, dtype=torch.bool),
        sampling_logp=torch.tensor(logp),
    )


def test_minibatches_and_dynamic_sampling_keep_each_rows_sampling_logp():
    from grpo_lab.grpo.rollout import replace_groups
    from grpo_lab.grpo.types import Rollout, select_rows

    def rollout(c: Completions) -> Rollout:
        n = c.completion_ids.shape[0]
        return Rollout(c, [None] * n, [""] * n, torch.zeros(n), {}, {}, torch.zeros(n))

    old = _rows([[-1.0, -1.5], [-2.0, -2.5], [-3.0, -3.5], [-4.0, -4.5]])  # 2 groups of G=2
    fresh = _rows([[-5.0, -5.5, -5.75], [-6.0, -6.5, -6.75]])  # one group, one token longer
    merged = replace_groups(rollout(old), rollout(fresh), torch.tensor([False, True]), 2, 0)
    # group 0 kept (padded with 0 to the new width, where its mask is 0), group 1 replaced
    assert merged.completions.sampling_logp.tolist() == [
        [-1.0, -1.5, 0.0],
        [-2.0, -2.5, 0.0],
        [-5.0, -5.5, -5.75],
        [-6.0, -6.5, -6.75],
    ]
    assert merged.completions.completion_mask[:2, 2].tolist() == [0, 0]
    picked = select_rows(merged.completions, torch.tensor([3, 0]))
    assert picked.sampling_logp.tolist() == [[-6.0, -6.5, -6.75], [-1.0, -1.5, 0.0]]


# --------------------------------------------------------------------------- log-probs


@pytest.fixture(scope="module")
def policy():
    policy = tiny_llama(hidden_size=32, intermediate_size=64, seed=1)
    policy.model.eval()
    return policy


def _completions(tokenizer, prompts: list[str], completions: list[str], eos_at: list[bool]):
    """Left-padded prompts and right-padded completions, as a sampler returns them."""
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    rows = [
        tokenizer.encode(c) + ([tokenizer.eos_token_id] if e else [])
        for c, e in zip(completions, eos_at)
    ]
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return Completions(
        prompt_ids=enc["input_ids"],
        prompt_mask=enc["attention_mask"],
        completion_ids=ids,
        completion_mask=mask,
        truncated=torch.tensor([not e for e in eos_at]),
    )


def _reference_logprobs(
    model, tokenizer, prompt: str, completion_ids: list[int], temperature: float
):
    """One prompt alone, no padding: a plain forward and a float64 log-softmax."""
    prompt_ids = tokenizer.encode(prompt)
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].to(torch.float64) / temperature
    # the logit at position P-1+t predicts completion token t
    predicting = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(completion_ids)]
    logp_all = torch.log_softmax(predicting, dim=-1)
    logp = logp_all.gather(1, torch.tensor(completion_ids).unsqueeze(1)).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logp, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_match_an_unpadded_float64_forward(policy, temperature):
    tok = policy.tokenizer
    prompts = ["7+1=", "12+34=", "123*45="]  # different lengths: the short ones get left padding
    completions = _completions(tok, prompts, ["8", "46", "5535"], eos_at=[True, True, False])
    assert (completions.prompt_mask == 0).any(), "the batch must contain left padding"
    logp, entropy = completion_logprobs(
        policy.model, completions, temperature=temperature, with_entropy=True
    )
    assert logp.shape == completions.completion_ids.shape and logp.dtype == torch.float32
    for i, prompt in enumerate(prompts):
        n = int(completions.completion_mask[i].sum())
        real = completions.completion_ids[i, :n].tolist()
        ref_logp, ref_entropy = _reference_logprobs(policy.model, tok, prompt, real, temperature)
        torch.testing.assert_close(logp[i, :n].to(torch.float64), ref_logp, rtol=0, atol=1e-5)
        torch.testing.assert_close(entropy[i, :n].to(torch.float64), ref_entropy, rtol=0, atol=1e-5)


def test_completion_logprobs_of_a_row_do_not_depend_on_its_batch(policy):
    tok = policy.tokenizer
    alone = _completions(tok, ["7+1="], ["8"], eos_at=[True])
    batched = _completions(tok, ["7+1=", "999*999="], ["8", "998001"], eos_at=[True, True])
    logp_alone, _ = completion_logprobs(policy.model, alone)
    logp_batched, _ = completion_logprobs(policy.model, batched)
    n = int(alone.completion_mask[0].sum())
    torch.testing.assert_close(logp_batched[0, :n], logp_alone[0, :n], rtol=0, atol=1e-5)


def test_completion_logprobs_do_not_return_entropy_unless_asked(policy):
    completions = _completions(policy.tokenizer, ["1+1="], ["2"], eos_at=[True])
    _, entropy = completion_logprobs(policy.model, completions)
    assert entropy is None


# --------------------------------------------------------------------------- GenerateSampler


def _prompts(tokenizer, prompts: list[str]):
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _assert_masks_follow_eos(c: Completions, eos: int, pad: int):
    for ids, mask, cut in zip(
        c.completion_ids.tolist(), c.completion_mask.tolist(), c.truncated.tolist()
    ):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n)  # a prefix of ones
        assert ids[n:] == [pad] * (len(ids) - n)
        if cut:
            assert eos not in ids and n == len(ids)
        else:
            assert ids[n - 1] == eos and eos not in ids[: n - 1]


def test_sampler_returns_b_times_g_rows_with_masks_that_follow_eos(policy):
    # A random-init model is close to uniform over ~100 tokens, so with 24 new tokens about
    # one row in five stops at EOS: the batch has both kinds of row.
    prompt_ids, prompt_mask = _prompts(policy.tokenizer, ["1+2=", "30+40=", "5*6="])
    sampler = GenerateSampler(max_new_tokens=24, temperature=1.0)
    torch.manual_seed(0)
    c = sampler.sample(policy.model, prompt_ids, prompt_mask, num_samples=8)
    assert c.completion_ids.shape == (24, 24) and c.completion_mask.shape == (24, 24)
    assert c.truncated.shape == (24,)
    assert c.truncated.any() and not c.truncated.all(), "need both EOS and truncated rows"
    _assert_masks_follow_eos(c, policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id)
    # rows g*G .. g*G+G-1 carry prompt g
    torch.testing.assert_close(c.prompt_ids, prompt_ids.repeat_interleave(8, dim=0))
    torch.testing.assert_close(c.prompt_mask, prompt_mask.repeat_interleave(8, dim=0))
    # sampling, not copying: the 8 completions of a prompt are not all the same
    assert len({tuple(r) for r in c.completion_ids[:8].tolist()}) > 1


def test_greedy_sampling_is_deterministic_and_grouped_by_prompt(policy):
    tok = policy.tokenizer
    # A random tied-embedding model tends to repeat the last prompt character, so prompts
    # that end differently get different greedy completions.
    prompts = ["1+2=", "abc", "hello world"]
    prompt_ids, prompt_mask = _prompts(tok, prompts)
    sampler = GenerateSampler(max_new_tokens=6)
    first = sampler.sample(policy.model, prompt_ids, prompt_mask, num_samples=3, greedy=True)
    second = sampler.sample(policy.model, prompt_ids, prompt_mask, num_samples=3, greedy=True)
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert torch.equal(first.completion_mask, second.completion_mask)
    # each prompt alone, unpadded, gives the completion of its own group of rows
    for g, prompt in enumerate(prompts):
        ids, mask = _prompts(tok, [prompt])
        alone = sampler.sample(policy.model, ids, mask, num_samples=1, greedy=True)
        for row in range(g * 3, g * 3 + 3):
            assert first.completion_ids[row].tolist() == alone.completion_ids[0].tolist()
    per_prompt = {tuple(first.completion_ids[g * 3].tolist()) for g in range(3)}
    assert len(per_prompt) > 1, "prompts must differ in output for the grouping check to bite"


def test_generate_with_top_k_off_samples_from_the_whole_vocabulary(policy):
    """top_k=0 means no top-k: a top_k left None in a GenerationConfig takes generate's
    global default, 50, and the tiny model has 100 tokens."""
    prompt_ids, prompt_mask = _prompts(policy.tokenizer, ["1+2="])
    torch.manual_seed(0)
    c = GenerateSampler(max_new_tokens=1, top_k=0).sample(
        policy.model, prompt_ids, prompt_mask, 3000
    )
    probs = torch.softmax(policy.model(input_ids=prompt_ids).logits[0, -1].double(), -1)
    # the near-uniform random model: every one of the 100 tokens has p > 0.005, so each is
    # missed by 3000 draws with probability < 0.995^3000 = 3e-7
    assert probs.min() > 0.005 and probs.numel() == 100
    assert len(set(c.completion_ids[:, 0].tolist())) == 100


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"max_new_tokens": 0}, "sampler.max_new_tokens"),
        ({"temperature": 0.0}, "sampler.temperature"),
        ({"top_p": 0.0}, "sampler.top_p"),
    ],
)
def test_sampler_rejects_bad_settings_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        GenerateSampler(**kwargs)


def test_entropy_carries_a_gradient_only_when_asked():
    """Logged entropy stays out of the autograd graph; an entropy bonus gets its gradient."""
    from grpo_lab.policy import tiny_llama
    from grpo_lab.policy.forward import completion_logprobs
    from grpo_lab.sampling import Completions

    policy = tiny_llama(hidden_size=32, intermediate_size=64)
    ids = torch.tensor([[5, 6, 7]])
    comp = Completions(
        prompt_ids=ids,
        prompt_mask=torch.ones_like(ids),
        completion_ids=torch.tensor([[8, 9]]),
        completion_mask=torch.ones(1, 2, dtype=torch.long),
        truncated=torch.tensor([False]),
    )
    logp, entropy = completion_logprobs(policy.model, comp, with_entropy=True)
    assert logp.requires_grad and not entropy.requires_grad
    _, entropy = completion_logprobs(policy.model, comp, with_entropy=True, entropy_grad=True)
    assert entropy.requires_grad


@pytest.mark.parametrize("sampler_cls", [GenerateSampler, KVCacheSampler])
def test_the_step_logs_the_gap_of_every_row_once_over_its_real_tokens(sampler_cls):
    """One GRPO step (mu=2, two mini-batches per pass, lr 0 so pi_old is the sampling policy)
    logs mean and max of |log q - log pi_old| as worked out from a float64 copy: with top_k=2
    the gap at each real token is -log of the top-2 mass."""
    import copy

    from grpo_lab.data import TaskDataModule
    from grpo_lab.rewards.combine import RewardSet
    from helpers import cpu_trainer, fast_without, module_of

    policy = tiny_llama(hidden_size=32, intermediate_size=64, num_layers=1, seed=0)
    model64 = copy.deepcopy(policy.model).double().eval()
    temperature = 0.7
    module = module_of(
        *fast_without("beta"),
        "beta=0",
        "mu=2",
        "train.minibatch_size=4",
        "train.lr=0.0",  # pi_old stays the sampling policy (a user may not set it: check=False)
        "train.warmup_steps=0",
        "train.shared_prefix=false",
        "sampler.max_new_tokens=5",
        check=False,
        policy=policy,
        rewards=RewardSet(
            {"length": lambda completions, examples, **ctx: [len(c) for c in completions]}
        ),
        sampler=sampler_cls(max_new_tokens=5, temperature=temperature, top_k=2),
    )
    trainer = cpu_trainer(max_steps=2 * 2)  # one rollout: mu passes x (8 rows / 4 per mini-batch)
    trainer.fit(module, datamodule=TaskDataModule(module.task, 2, 4, 4, seed=0))
    rollout = module.last_rollout
    c = rollout.completions
    gaps = []
    for row in range(c.completion_ids.shape[0]):
        prompt = c.prompt_ids[row][c.prompt_mask[row].bool()]
        n = int(c.completion_mask[row].sum())
        ids = torch.cat([prompt, c.completion_ids[row, :n]]).unsqueeze(0)
        with torch.no_grad():
            logits = model64(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (n, V)
        top2_mass = (logits / temperature).softmax(-1).topk(2, dim=-1).values.sum(-1)
        gaps.append(-top2_mass.log())
    gaps = torch.cat(gaps)  # every real token of every row, once
    # the step's stats (logged with the rollout's): what inner_updates returned
    stats = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert stats["sampling/sampling_logp_difference/mean"] == pytest.approx(
        gaps.mean().item(), abs=1e-5
    )
    assert stats["sampling/sampling_logp_difference/max"] == pytest.approx(
        gaps.max().item(), abs=1e-5
    )
    assert gaps.max() - gaps.min() > 0.1, "gaps must differ from token to token to bite"


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_a_training_run_logs_the_sampling_logp_gap_and_top_k_widens_it(run_cli, tracking_uri):
    from mlflow import MlflowClient

    from helpers import FAST

    overrides = [o for o in FAST if not o.startswith("train.rollouts")]
    run_cli("train", *overrides, "train.rollouts=1", "sampler.top_k=0")
    run_cli("train", *overrides, "train.rollouts=1", "sampler.top_k=2")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    runs = {r.data.params["sampler.top_k"]: r for r in client.search_runs([exp.experiment_id])}
    full, top2 = runs["0"].data.metrics, runs["2"].data.metrics
    mean, peak = "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max"
    # no filter: the sampled distribution is pi_old, up to float noise
    assert full[mean] < 1e-5 and full[peak] < 1e-4
    # top-2 of a barely trained model drops real mass: the gap is -log(kept mass) > 0
    assert top2[mean] > 100 * max(full[mean], 1e-6) and top2[peak] >= top2[mean]
