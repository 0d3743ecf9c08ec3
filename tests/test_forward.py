"""The training forwards (policy/forward.py) against a plain full-logits forward written here.

The reference is the obvious computation: every row's prompt and completion through the model's
own forward, full float64 log-softmax, gather. The shared-prefix forward (each prompt once per
group, its KV cache repeated to the G completions) and the chunked vocabulary projection must
give the same loss and the same gradient on every parameter.
"""

from __future__ import annotations

import pytest
import torch

from grpo_lab import objective
from grpo_lab.policy import tiny_llama
from grpo_lab.policy.forward import completion_logprobs
from grpo_lab.sampling.base import Completions

B, G, P, T = 3, 4, 7, 6
PAD = 0


def _random_groups(vocab: int, seed: int = 0) -> Completions:
    """B left-padded prompts of lengths 7, 4, 2, each repeated G times; completions of lengths
    1..T (EOS anywhere, some truncated), padded after their end."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lengths = [7, 4, 2]
    prompt_ids = torch.randint(3, vocab, (B, P), generator=gen)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    for b, n in enumerate(prompt_lengths):
        prompt_mask[b, P - n :] = 1
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, PAD)
    N = B * G
    lengths = torch.tensor([1, 6, 3, 6, 2, 5, 6, 4, 6, 1, 3, 2])  # (N,) 1..T, several T
    completion_mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    completion_ids = torch.randint(3, vocab, (N, T), generator=gen)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, PAD)
    return Completions(
        prompt_ids=prompt_ids.repeat_interleave(G, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(G, dim=0),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        truncated=lengths == T,
    )


def _reference_logprobs(model, c: Completions, temperature: float) -> tuple[torch.Tensor, ...]:
    """Full forward over prompt + completion, float64 log-softmax of every logit."""
    ids = torch.cat([c.prompt_ids, c.completion_ids], dim=1)
    mask = torch.cat([c.prompt_mask, c.completion_mask], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    logits = logits[:, P - 1 : -1].double() / temperature  # (N, T, V): predicts token t
    logp_all = logits.log_softmax(dim=-1)
    logp = logp_all.gather(-1, c.completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logp.float(), entropy.float()


def _loss(logp, entropy, c: Completions, advantages, ref_logp):
    # mu > 1 style: pi_old differs from pi_theta, so the ratio and its clipping matter.
    old = logp.detach() + 0.05 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    loss, _ = objective.grpo_loss(
        logp,
        old,
        advantages,
        c.completion_mask,
        eps_low=0.2,
        eps_high=0.2,
        beta=0.04,
        ref_logp=ref_logp,
        kl_estimator="k3",
        aggregation="seq_mean_token_mean",
        max_len=T,
        entropy=entropy,
        entropy_coef=0.01,
    )
    return loss


def _loss_and_grads(model, logprobs) -> tuple[float, dict[str, torch.Tensor]]:
    c = _random_groups(model.config.vocab_size)
    advantages = torch.randn(B * G, generator=torch.Generator().manual_seed(2))
    ref_logp = torch.randn(B * G, T, generator=torch.Generator().manual_seed(3)) * 0.1 - 3.0
    model.zero_grad(set_to_none=True)
    logp, entropy = logprobs(model, c)
    loss = _loss(logp, entropy, c, advantages, ref_logp)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def _assert_same(got, want):
    loss, grads = got
    want_loss, want_grads = want
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        ref = want_grads[name]
        assert ref.abs().max() > 0, name  # every parameter takes part in the loss
        err = ((g - ref).norm() / ref.norm()).item()
        assert err < 1e-5, f"{name}: relative gradient error {err:.2e}"


@pytest.fixture
def model():
    return tiny_llama(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0).model


TEMPERATURE = 0.7


def reference(model, c):
    return _reference_logprobs(model, c, TEMPERATURE)


@pytest.mark.parametrize(
    "options",
    [
        {"group_size": None},
        {"group_size": G},
        {"group_size": G, "chunk_elements": 100},  # many chunks, each checkpointed
        {"group_size": None, "chunk_elements": 100},
    ],
    ids=["plain", "shared_prefix", "shared_prefix_chunked", "plain_chunked"],
)
def test_forward_gives_the_loss_and_every_gradient_of_a_full_forward(model, options):
    def fast(model, c):
        return completion_logprobs(
            model, c, temperature=TEMPERATURE, with_entropy=True, entropy_grad=True, **options
        )

    _assert_same(_loss_and_grads(model, fast), _loss_and_grads(model, reference))


def test_shared_prefix_matches_on_a_pretrained_model_with_eager_attention(model, tmp_path):
    """policy=pretrained loads through from_pretrained; eager attention builds its own masks."""
    from grpo_lab.policy import load_pretrained
    from grpo_lab.policy.tokenizer import char_tokenizer

    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    loaded = load_pretrained(str(tmp_path), attn_implementation="eager").model

    def shared(m, c):
        return completion_logprobs(
            m, c, temperature=TEMPERATURE, with_entropy=True, entropy_grad=True, group_size=G
        )

    _assert_same(_loss_and_grads(loaded, shared), _loss_and_grads(loaded, reference))


def test_a_model_whose_logits_are_not_a_plain_head_uses_its_own_logits(model):
    """A config with a logit transform (Cohere's logit_scale here; Llama itself ignores it)
    routes through the model's own forward and full logits: the same numbers."""
    model.config.logit_scale = 0.5

    def shared(m, c):
        return completion_logprobs(
            m, c, temperature=TEMPERATURE, with_entropy=True, entropy_grad=True, group_size=G
        )

    from grpo_lab.policy import forward

    assert not forward._logits_are_linear_head(model)
    _assert_same(_loss_and_grads(model, shared), _loss_and_grads(model, reference))


def test_shared_prefix_matches_with_lora_adapters(model):
    pytest.importorskip("peft")
    from grpo_lab.policy.lora import apply_lora

    lora = apply_lora(model, enabled=True, r=4, alpha=8)
    for p in lora.parameters():  # peft starts B at 0: make the adapters act
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(4))

    def shared(m, c):
        return completion_logprobs(
            m, c, temperature=TEMPERATURE, with_entropy=True, entropy_grad=True, group_size=G
        )

    _assert_same(_loss_and_grads(lora, shared), _loss_and_grads(lora, reference))
    c = _random_groups(model.config.vocab_size)
    with torch.no_grad(), lora.disable_adapter():  # the LoRA reference: the base model
        base, _ = completion_logprobs(lora, c, temperature=TEMPERATURE, group_size=G)
        want, _ = _reference_logprobs(lora, c, TEMPERATURE)
    mask = c.completion_mask.bool()
    torch.testing.assert_close(base[mask], want[mask], rtol=1e-5, atol=1e-5)


def test_padding_positions_score_zero_and_entropy_stays_out_of_the_graph(model):
    c = _random_groups(model.config.vocab_size)
    logp, entropy = completion_logprobs(model, c, with_entropy=True, group_size=G)
    pad = c.completion_mask == 0
    assert (logp[pad] == 0).all() and (entropy[pad] == 0).all()
    assert logp.requires_grad and not entropy.requires_grad


def test_shared_prefix_refuses_groups_whose_rows_hold_different_prompts(model):
    c = _random_groups(model.config.vocab_size)
    c.prompt_ids[1, -1] = (c.prompt_ids[1, -1] + 1) % model.config.vocab_size
    with pytest.raises(ValueError, match="same prompt"):
        completion_logprobs(model, c, group_size=G)
    with pytest.raises(ValueError, match="not a multiple of G=5"):
        completion_logprobs(model, c, group_size=5)


# --------------------------------------------------------------------------- in the GRPO module


def test_shared_prefix_mini_batches_shuffle_whole_groups():
    from grpo_lab.grpo.batching import Batching
    from helpers import compose

    def batching(shared: bool) -> Batching:
        return Batching.from_config(
            compose("G=4", "train.prompts_per_step=6", "beta=0", f"train.shared_prefix={shared}")
        )

    torch.manual_seed(0)
    order = batching(shared=True).order(24, shuffle=True)
    groups = order.view(6, 4)  # each run of G=4 entries: one whole group, rows in order
    assert (groups == groups[:, :1] + torch.arange(4)).all() and (groups[:, 0] % 4 == 0).all()
    assert sorted(order.tolist()) == list(range(24))
    assert groups[:, 0].tolist() != [0, 4, 8, 12, 16, 20]  # shuffled (seed 0: not the identity)
    torch.manual_seed(0)
    rows = batching(shared=False).order(24, shuffle=True)
    assert sorted(rows.tolist()) == list(range(24))
    assert batching(shared=True).order(8, shuffle=False).tolist() == list(range(8))


METRICS_COMPARED = [
    "loss",
    "kl",
    "entropy",
    "grad_norm",
    "reward",
    "ratio_mean",
    "clip_ratio/region_mean",
    "completions/mean_length",
    "sampling/sampling_logp_difference/mean",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "rollouts_compared"),
    [
        # whole groups of G=4 per micro-batch; the reference pass runs in inference mode
        (["train.microbatch_size=4"], 2),
        # pi_old from a rollout pass; an entropy bonus puts the entropy in the graph. mu > 1
        # shuffles rows (off) or groups (on) before the update, which draws different amounts
        # from torch's global generator, so the second rollout samples other completions: only
        # the first rollout is compared.
        (["mu=2", "sampler=kv_cache", "loss.entropy_coef=0.01"], 1),
    ],
    ids=["microbatches", "mu2"],
)
def test_a_training_run_logs_the_same_metrics_with_the_shared_prefix_on_and_off(
    run_cli, tracking_uri, overrides, rollouts_compared
):
    """Two real CLI runs (SFT warm start, 2 rollouts of 4 prompts x G=4, beta 0.04) differ only
    in train.shared_prefix; the logged step metrics agree to float tolerance."""
    from mlflow import MlflowClient

    from helpers import FAST

    histories = {}
    client = MlflowClient(tracking_uri=tracking_uri)
    for shared in ("false", "true"):
        run_cli("train", *FAST, *overrides, f"train.shared_prefix={shared}")
        exp = client.get_experiment_by_name("grpo_lab")
        run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]
        assert run.data.params["train.shared_prefix"].lower() == shared
        histories[shared] = {
            key: [
                m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=_step)
            ][:rollouts_compared]
            for key in METRICS_COMPARED
        }
    for key, plain in histories["false"].items():
        assert len(plain) == rollouts_compared, key
        assert histories["true"][key] == pytest.approx(plain, rel=1e-4, abs=1e-6), key


def _step(metric) -> tuple[int, int]:
    return metric.step, metric.timestamp


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.minibatch_size=6"],
            "train.minibatch_size=6 is invalid with train.shared_prefix=true: completions per "
            "batch must be a multiple of G=4",
        ),
        (
            ["train.num_minibatches=4"],  # 12 completions / 4 = mini-batches of 3
            "train.num_minibatches=4 (mini-batches of 3) is invalid with train.shared_prefix=true",
        ),
        (
            ["train.microbatch_size=2"],
            "train.microbatch_size=2 is invalid with train.shared_prefix",
        ),
        (
            ["train.shared_prefix=yes"],
            "train.shared_prefix='yes' is invalid: expected auto, true or false",
        ),
    ],
)
def test_shared_prefix_with_batches_of_partial_groups_fails_before_compute(overrides, message):
    from grpo_lab.config import ConfigError, validate
    from helpers import compose

    cfg = compose(
        "train.prompts_per_step=3", "G=4", "train.shared_prefix=true", *overrides, check=False
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_shared_prefix_accepts_batches_of_whole_groups():
    from helpers import compose

    overrides = ["train.prompts_per_step=4", "G=4", "train.shared_prefix=true"]
    # 16 completions: mini-batches of 8, micro-batches of 4, all whole groups (compose validates)
    compose(*overrides, "train.num_minibatches=2", "train.microbatch_size=4")
