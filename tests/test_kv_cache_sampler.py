"""KVCacheSampler on a real tiny Llama: the same tokens as generate, the right distribution."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from grpo_lab.policy import tiny_llama
from grpo_lab.policy.forward import completion_logprobs
from grpo_lab.sampling import (
    GenerateSampler,
    KVCacheSampler,
    filter_logits,
    sampling_logp_gap,
)
from helpers import FAST

PROMPTS = ["1+2=", "abc", "hello world", "x", "12*34="]
NEG = float("-inf")


@pytest.fixture(scope="module")
def policy():
    """A tiny Llama with large random weights, so greedy text changes from step to step.

    (The default init repeats one character.) EOS gets a larger embedding so that some
    prompts end early: "12*34=" greedily emits EOS first, "hello world" after 14 tokens.
    """
    policy = tiny_llama(hidden_size=32, intermediate_size=64, seed=1)
    model = policy.model.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() == 2:
                w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
        model.model.embed_tokens.weight[policy.tokenizer.eos_token_id] *= 1.5
    return policy


def _encode(tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def _reference_logits(model64, prompt_ids, prompt_mask, completion_ids, mask, row, prompt_row):
    """float64 logits (T, V) predicting the row's real completion tokens, prompt unpadded."""
    prompt = prompt_ids[prompt_row][prompt_mask[prompt_row].bool()]
    completion = completion_ids[row][mask[row].bool()]
    ids = torch.cat([prompt, completion]).unsqueeze(0)
    with torch.no_grad():
        logits = model64(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 : -1]  # (T_row, V)


# --------------------------------------------------------------------------- filter_logits


def _kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero().squeeze(1).tolist() for row in logits]


def test_filter_logits_keeps_the_tokens_each_rule_names_by_hand():
    # probabilities 0.5, 0.2, 0.15, 0.1, 0.05 in shuffled positions (ids 1, 3, 4, 0, 2)
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.2, 0.15]])
    logits = probs.log()
    assert _kept(filter_logits(logits)) == [[0, 1, 2, 3, 4]]  # all off
    assert _kept(filter_logits(logits, top_k=2)) == [[1, 3]]
    # top-p: mass of the more likely tokens is 0, .5, .7, .85, .95 for ids 1, 3, 4, 0, 2
    assert _kept(filter_logits(logits, top_p=0.6)) == [[1, 3]]
    assert _kept(filter_logits(logits, top_p=0.75)) == [[1, 3, 4]]
    assert _kept(filter_logits(logits, top_p=0.01)) == [[1]]  # the most likely always stays
    # min-p 0.25: p >= 0.125 stays
    assert _kept(filter_logits(logits, min_p=0.25)) == [[1, 3, 4]]
    # top-p acts on what top-k kept, renormalised: .5/.85, .2/.85, .15/.85 = .588, .235, .176,
    # masses before .0, .588, .824 -> top_p=0.8 drops id 4 (alone it keeps it: .7 < .8)
    assert _kept(filter_logits(logits, top_p=0.8)) == [[1, 3, 4]]
    assert _kept(filter_logits(logits, top_k=3, top_p=0.8)) == [[1, 3]]
    # kept logits are unchanged; dropped ones are -inf
    out = filter_logits(logits, top_k=2)
    assert out[0, 1] == logits[0, 1] and out[0, 0] == NEG


def test_filter_logits_works_row_by_row():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert _kept(filter_logits(logits, top_k=2)) == [[0, 1], [2, 3]]
    # softmax of (3, 2, 1, 0) = .644, .237, .087, .032: min_p 0.1 keeps p >= .0644
    assert _kept(filter_logits(logits, min_p=0.1)) == [[0, 1, 2], [1, 2, 3]]


# --------------------------------------------------------------------------- greedy


def test_greedy_matches_generate_on_prompts_of_different_lengths(policy):
    model, tok = policy.model, policy.tokenizer
    prompt_ids, prompt_mask = _encode(tok, PROMPTS)
    assert len(set(prompt_mask.sum(1).tolist())) > 2, "prompts must need left padding"
    ours = KVCacheSampler(max_new_tokens=16).sample(model, prompt_ids, prompt_mask, 2, greedy=True)
    theirs = GenerateSampler(max_new_tokens=16).sample(
        model, prompt_ids, prompt_mask, 2, greedy=True
    )
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.equal(ours.completion_mask, theirs.completion_mask)
    assert torch.equal(ours.truncated, theirs.truncated)
    # the check bites: greedy text varies, some rows end at EOS, others run to the limit
    assert ours.truncated.any() and not ours.truncated.all()
    assert len(set(ours.completion_ids[0].tolist())) > 3


@pytest.mark.parametrize("sampler_cls", [KVCacheSampler, GenerateSampler])
def test_greedy_is_a_plain_argmax_loop_over_full_forwards(policy, sampler_cls):
    """Batched, left-padded, cached greedy decoding gives the tokens of the simplest decoder:
    each prompt alone, a full forward per token, argmax, stop at EOS."""
    model, tok = policy.model, policy.tokenizer
    prompt_ids, prompt_mask = _encode(tok, PROMPTS)
    T = 16
    got = sampler_cls(max_new_tokens=T).sample(model, prompt_ids, prompt_mask, 1, greedy=True)
    for row, prompt in enumerate(PROMPTS):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        completion: list[int] = []
        with torch.no_grad():
            while len(completion) < T and tok.eos_token_id not in completion:
                logits = model(input_ids=torch.tensor([ids + completion])).logits[0, -1]
                completion.append(int(logits.argmax()))
        padded = completion + [tok.pad_token_id] * (T - len(completion))
        assert got.completion_ids[row].tolist() == padded, prompt
        assert got.lengths[row] == len(completion)


def test_top_k_one_samples_the_greedy_completion(policy):
    model, tok = policy.model, policy.tokenizer
    prompt_ids, prompt_mask = _encode(tok, PROMPTS)
    greedy = KVCacheSampler(max_new_tokens=10).sample(
        model, prompt_ids, prompt_mask, 3, greedy=True
    )
    torch.manual_seed(0)
    top1 = KVCacheSampler(max_new_tokens=10, temperature=1.5, top_k=1).sample(
        model, prompt_ids, prompt_mask, 3
    )
    assert torch.equal(top1.completion_ids, greedy.completion_ids)
    assert torch.equal(top1.completion_mask, greedy.completion_mask)
    assert torch.allclose(top1.sampling_logp, torch.zeros_like(top1.sampling_logp))


def test_an_all_eos_batch_stops_early(policy):
    model, tok = policy.model, policy.tokenizer
    prompt_ids, prompt_mask = _encode(tok, ["12*34="])  # greedy EOS at once
    c = KVCacheSampler(max_new_tokens=16).sample(model, prompt_ids, prompt_mask, 3, greedy=True)
    assert c.completion_ids.tolist() == [[tok.eos_token_id]] * 3
    assert c.completion_mask.tolist() == [[1]] * 3 and not c.truncated.any()


# --------------------------------------------------------------------------- distribution


@pytest.mark.parametrize("sampler_cls", [KVCacheSampler, GenerateSampler])
@pytest.mark.parametrize("top_k", [0, 5])
def test_sampled_tokens_have_the_float64_reference_probabilities(policy, sampler_cls, top_k):
    """Every step's distribution (for kv_cache through the shared, expanded cache) is the
    model's own, and sampling_logp is each token's log-prob under it."""
    model, tok = policy.model, policy.tokenizer
    model64 = copy.deepcopy(model).double()
    temperature, G = 0.7, 3
    prompt_ids, prompt_mask = _encode(tok, PROMPTS)
    torch.manual_seed(0)
    c = sampler_cls(max_new_tokens=12, temperature=temperature, top_k=top_k).sample(
        model, prompt_ids, prompt_mask, G
    )
    N = len(PROMPTS) * G
    assert c.completion_ids.shape[0] == N
    assert c.sampling_logp is not None and c.sampling_logp.shape == c.completion_ids.shape
    # rows are grouped by prompt
    assert torch.equal(c.prompt_ids, prompt_ids.repeat_interleave(G, dim=0))
    assert torch.equal(c.prompt_mask, prompt_mask.repeat_interleave(G, dim=0))
    scored, _ = completion_logprobs(model, c, temperature=temperature)
    for row in range(N):
        n = int(c.completion_mask[row].sum())
        logits = (
            _reference_logits(
                model64, prompt_ids, prompt_mask, c.completion_ids, c.completion_mask, row, row // G
            )
            / temperature
        )
        if top_k:
            top = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < top, NEG)
        ref = logits.log_softmax(-1).gather(1, c.completion_ids[row, :n, None]).squeeze(1)
        assert torch.isfinite(ref).all(), f"row {row} drew a token the filter drops"
        torch.testing.assert_close(c.sampling_logp[row, :n].double(), ref, atol=1e-4, rtol=0)
        if not top_k:  # the trainer's log-probs are the sampler's (unfiltered) ones
            torch.testing.assert_close(scored[row, :n].double(), ref, atol=1e-4, rtol=0)
    assert len({tuple(r) for r in c.completion_ids[:G].tolist()}) > 1, "samples, not copies"


@pytest.mark.parametrize("sampler_cls", [KVCacheSampler, GenerateSampler])
@pytest.mark.parametrize("top_k", [0, 2])
def test_sampling_logp_gap_is_minus_log_the_mass_the_filter_kept(policy, sampler_cls, top_k):
    """|log q - log pi_old| on a sampled rollout, q the sampler's distribution and pi_old the
    loss's (``completion_logprobs``): 0 with no filter; with top_k, q = p / m on the kept
    tokens, m their mass under p, so the gap is -log m (m from a float64 forward)."""
    model, tok = policy.model, policy.tokenizer
    model64 = copy.deepcopy(model).double()
    temperature, G = 0.7, 3
    prompt_ids, prompt_mask = _encode(tok, PROMPTS)
    torch.manual_seed(0)
    c = sampler_cls(max_new_tokens=12, temperature=temperature, top_k=top_k).sample(
        model, prompt_ids, prompt_mask, G
    )
    old, _ = completion_logprobs(model, c, temperature=temperature)
    gap = sampling_logp_gap(c.sampling_logp, old, c.completion_mask)
    for row in range(len(PROMPTS) * G):
        n = int(c.completion_mask[row].sum())
        logits = _reference_logits(
            model64, prompt_ids, prompt_mask, c.completion_ids, c.completion_mask, row, row // G
        )
        p = (logits / temperature).softmax(-1)  # (n, V)
        kept = p.topk(top_k, dim=-1).values.sum(-1) if top_k else p.sum(-1)
        torch.testing.assert_close(gap[row, :n].double(), -kept.log(), atol=1e-5, rtol=0)
        assert gap[row, n:].eq(0).all()
    if top_k:
        assert gap.max() > 0.1, "the filter must drop real mass for the check to bite"


def test_first_token_frequencies_match_the_filtered_softmax(policy):
    model, tok = policy.model, policy.tokenizer
    prompts = ["abc", "hello world"]
    prompt_ids, prompt_mask = _encode(tok, prompts)
    n, temperature, top_p = 6000, 0.8, 0.9
    torch.manual_seed(0)
    c = KVCacheSampler(max_new_tokens=1, temperature=temperature, top_p=top_p).sample(
        model, prompt_ids, prompt_mask, n
    )
    model64 = copy.deepcopy(model).double()
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            logits = model64(input_ids=tok(prompt, return_tensors="pt")["input_ids"]).logits[0, -1]
        p = torch.softmax(logits / temperature, -1)
        # top-p by hand: keep tokens whose more likely mass is < top_p, renormalise
        sorted_p, order = p.sort(descending=True)
        keep = order[(sorted_p.cumsum(0) - sorted_p) < top_p]
        expected = torch.zeros_like(p)
        expected[keep] = p[keep] / p[keep].sum()
        counts = torch.bincount(c.completion_ids[i * n : (i + 1) * n, 0], minlength=p.numel())
        tv = 0.5 * (counts.double() / n - expected).abs().sum().item()
        assert counts[expected == 0].sum() == 0
        assert tv < 0.05, f"total variation {tv:.3f} for {prompt!r}"
        assert len(keep) > 3, "the distribution must be spread for the check to bite"


# --------------------------------------------------------------------------- generate's config


@pytest.mark.parametrize("greedy", [False, True])
def test_generate_ignores_the_sampling_settings_a_checkpoint_ships(policy, greedy):
    """The sampler's settings are the whole distribution: a checkpoint's own generation_config
    (repetition penalty, n-gram ban, top-k 50, banned and suppressed tokens) changes nothing."""
    model, tok = policy.model, policy.tokenizer
    prompt_ids, prompt_mask = _encode(tok, PROMPTS)
    sampler = GenerateSampler(max_new_tokens=16, temperature=1.0)
    torch.manual_seed(0)
    clean = sampler.sample(model, prompt_ids, prompt_mask, 2, greedy=greedy)
    first_tokens = clean.completion_ids[:, 0].tolist()
    shipped = copy.deepcopy(model)
    for key, value in {
        "repetition_penalty": 1.8,
        "no_repeat_ngram_size": 2,
        "top_k": 50,
        "min_p": 0.3,
        # tokens the clean run draws first: banning them must change the text if it applied
        "bad_words_ids": [[first_tokens[0]]],
        "suppress_tokens": [first_tokens[2]],
    }.items():
        setattr(shipped.generation_config, key, value)
    torch.manual_seed(0)
    got = sampler.sample(shipped, prompt_ids, prompt_mask, 2, greedy=greedy)
    assert tok.batch_decode(got.completion_ids) == tok.batch_decode(clean.completion_ids)
    assert torch.equal(got.completion_mask, clean.completion_mask)
    # the checkpoint keeps its own settings for whoever else reads them
    assert shipped.generation_config.repetition_penalty == 1.8


def test_generate_ignores_the_base_models_settings_under_lora(policy):
    """peft's generate copies the wrapper's generation_config onto the base model: the
    checkpoint's settings stay out there too, and are back in place afterwards."""
    pytest.importorskip("peft")
    from grpo_lab.policy.lora import apply_lora

    model, tok = policy.model, policy.tokenizer
    prompt_ids, prompt_mask = _encode(tok, PROMPTS)
    sampler = GenerateSampler(max_new_tokens=16)
    torch.manual_seed(0)
    clean = sampler.sample(model, prompt_ids, prompt_mask, 2)
    base = copy.deepcopy(model)
    base.generation_config.repetition_penalty = 1.8
    base.generation_config.suppress_tokens = [int(clean.completion_ids[0, 0])]
    shipped = base.generation_config
    wrapped = apply_lora(base, enabled=True)  # LoRA's B starts at 0: the base model's function
    torch.manual_seed(0)
    got = sampler.sample(wrapped, prompt_ids, prompt_mask, 2)
    assert torch.equal(got.completion_ids, clean.completion_ids)
    assert base.generation_config is shipped and "generation_config" not in vars(wrapped)


# --------------------------------------------------------------------------- endings


def test_eos_ends_a_row_and_pads_after_it(policy):
    model, tok = policy.model, policy.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompt_ids, prompt_mask = _encode(tok, PROMPTS)
    torch.manual_seed(1)
    c = KVCacheSampler(max_new_tokens=12, temperature=1.0).sample(model, prompt_ids, prompt_mask, 8)
    assert c.truncated.any() and not c.truncated.all()
    for ids, mask, truncated in zip(
        c.completion_ids.tolist(), c.completion_mask.tolist(), c.truncated
    ):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n)
        assert ids[n:] == [pad] * (len(ids) - n)
        if truncated:
            assert eos not in ids and n == len(ids)
        else:
            assert ids[n - 1] == eos and eos not in ids[: n - 1]


@pytest.mark.parametrize("sampler_cls", [KVCacheSampler, GenerateSampler])
def test_every_eos_id_of_the_model_ends_a_completion(policy, sampler_cls):
    """Chat models end a turn with one of several EOS ids: the second ends a completion too."""
    model, tok = policy.model, policy.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompt_ids, prompt_mask = _encode(tok, PROMPTS)
    plain = sampler_cls(max_new_tokens=16).sample(model, prompt_ids, prompt_mask, 1, greedy=True)
    row0 = plain.completion_ids[0].tolist()
    # the second EOS: the first token of row 0, from its third on, not seen before in the row
    k = next(t for t in range(2, len(row0)) if row0[t] not in row0[:t])
    second = row0[k]
    two_eos = copy.deepcopy(model)
    two_eos.generation_config.eos_token_id = [eos, second]
    got = sampler_cls(max_new_tokens=16).sample(two_eos, prompt_ids, prompt_mask, 1, greedy=True)
    # expected from the plain greedy tokens: each row ends at its first token that is either EOS
    for row, (ids, n) in enumerate(zip(plain.completion_ids.tolist(), plain.lengths.tolist())):
        end = next((t for t in range(n) if ids[t] in (eos, second)), None)
        length = n if end is None else end + 1
        assert got.completion_ids[row].tolist() == ids[:length] + [pad] * (16 - length)
        assert got.lengths[row] == length and bool(got.truncated[row]) == (end is None)
    assert got.lengths[0] == k + 1 and got.completion_ids[0, k] == second and not got.truncated[0]
    # sampled rows: no EOS before a row's last token, and an untruncated row ends with one
    torch.manual_seed(0)
    c = sampler_cls(max_new_tokens=16).sample(two_eos, prompt_ids, prompt_mask, 4)
    for ids, n, truncated in zip(c.completion_ids.tolist(), c.lengths.tolist(), c.truncated):
        assert not {eos, second} & set(ids[: n - 1])
        assert truncated or ids[n - 1] in (eos, second)
    assert (c.completion_ids == second).any(), "some row must end at the second EOS"


def _first_stop(tok, ids: list[int], n: int, stop_strings: list[str]) -> int | None:
    """Index of the token whose decoded prefix first contains a stop string (None: never)."""
    return next(
        (
            t
            for t in range(n)
            if any(s in tok.decode(ids[: t + 1], skip_special_tokens=True) for s in stop_strings)
        ),
        None,
    )


@pytest.mark.parametrize("sampler_cls", [KVCacheSampler, GenerateSampler])
def test_stop_strings_end_a_completion_at_the_token_that_completes_them(policy, sampler_cls):
    model, tok = policy.model, policy.tokenizer
    prompt_ids, prompt_mask = _encode(tok, PROMPTS[:4])
    plain = KVCacheSampler(max_new_tokens=16).sample(model, prompt_ids, prompt_mask, 1, greedy=True)
    raw = plain.completion_ids.tolist()
    texts = tok.batch_decode(plain.completion_ids, skip_special_tokens=True)
    # stop strings taken from the greedy text itself: characters 4-5 of row 0, 7-8 of row 1
    # (the char tokenizer has one token per character), listed late-first in the second case
    for stop_strings in ([texts[0][4:6], texts[1][7:9]], [texts[0][8:10], texts[0][2:4]]):
        sampler = sampler_cls(max_new_tokens=16, stop_strings=stop_strings)
        sampler.configure(tok, "auto")
        c = sampler.sample(model, prompt_ids, prompt_mask, 2, greedy=True)
        for row in range(4):
            n = int(plain.lengths[row])
            end = _first_stop(tok, raw[row], n, stop_strings)
            length = n if end is None else end + 1
            for copy_ in (2 * row, 2 * row + 1):
                assert c.completion_ids[copy_].tolist() == raw[row][:length] + [
                    tok.pad_token_id
                ] * (16 - length), (stop_strings, row)
                assert c.completion_mask[copy_].tolist() == [1] * length + [0] * (16 - length)
                # a row a stop string ended is not truncated
                assert bool(c.truncated[copy_]) == (end is None and bool(plain.truncated[row]))
        assert c.lengths[0] < plain.lengths[0], "row 0 must stop early for the check to bite"
    # the second list's first string occurs later in row 0 than its second: the text decides
    assert c.lengths[0] == 4


def test_sampled_completions_end_at_their_first_stop_string(policy):
    model, tok = policy.model, policy.tokenizer
    prompt_ids, prompt_mask = _encode(tok, PROMPTS)
    sampler = KVCacheSampler(max_new_tokens=20, temperature=1.0, stop_strings=["a", "7"])
    sampler.configure(tok, "auto")
    torch.manual_seed(0)
    c = sampler.sample(model, prompt_ids, prompt_mask, 8)
    texts = tok.batch_decode(c.completion_ids, skip_special_tokens=True)
    stopped = [t for t, tr in zip(texts, c.truncated) if not tr and t[-1:] in ("a", "7")]
    assert len(stopped) > 3, "some rows must stop on a stop string for the check to bite"
    for text, truncated in zip(texts, c.truncated):
        first = min((text.find(s) for s in ("a", "7") if s in text), default=-1)
        assert first in (-1, len(text) - 1), f"{text!r} runs past its stop string"
        if first >= 0:
            assert not truncated


def test_bad_settings_name_the_key():
    for kwargs, key in [
        ({"max_new_tokens": 0}, "sampler.max_new_tokens"),
        ({"temperature": 0.0}, "sampler.temperature"),
        ({"top_p": 1.5}, "sampler.top_p"),
        ({"top_k": -1}, "sampler.top_k"),
        ({"min_p": 1.0}, "sampler.min_p"),
    ]:
        with pytest.raises(ValueError, match=key):
            KVCacheSampler(**kwargs)
    assert math.isfinite(KVCacheSampler().temperature)


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_one_training_run_with_the_kv_cache_sampler_logs_to_mlflow(run_cli, tracking_uri):
    from mlflow import MlflowClient

    overrides = [o for o in FAST if not o.startswith(("train.rollouts", "train.eval_every"))]
    run_cli("train", *overrides, "sampler=kv_cache", "train.rollouts=1", "train.eval_every=1")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["sampler._target_"] == "grpo_lab.sampling.KVCacheSampler"
    assert "reward" in run.data.metrics and "completions/mean_length" in run.data.metrics
    # no filter: the sampler's log-probs are pi_old's up to float noise
    assert run.data.metrics["sampling/sampling_logp_difference/max"] < 1e-4
