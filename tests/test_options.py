"""Each kl / advantage / loss / train option changes the GRPO step exactly as its formula says.

The options go in as config overrides, through ``train.algo_config`` into a real ``GRPOModule``
(a tiny Llama, the arithmetic task, the generate sampler). Rewards come from a scripted reward
function and, for the loss, from hand-made completions whose lengths and log-ratios are chosen,
so that every expected value is worked out by hand in the test. The slow tests run the real
CLI once per combination of independent options and read the options back from MLflow.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow import MlflowClient

from grpo_lab import objective
from grpo_lab.config import ConfigError
from grpo_lab.data import TaskDataModule
from grpo_lab.grpo.rollout import DynamicSampling, prompt_seed
from grpo_lab.grpo.step import Algorithm
from grpo_lab.grpo.types import Rollout, select_rows
from grpo_lab.module import GRPOModule
from grpo_lab.policy import tiny_llama
from grpo_lab.policy.forward import completion_logprobs
from grpo_lab.rewards.combine import RewardSet
from grpo_lab.sampling import GenerateSampler
from grpo_lab.sampling.base import Completions
from grpo_lab.tasks import ArithmeticTask
from grpo_lab.train import build_module
from helpers import attach, compose, cpu_trainer, fast_without

# The reference model is held in eval mode on purpose (it is never trained).
pytestmark = pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")

G = 4
MAX_NEW = 5  # sampler.max_new_tokens: L_max of seq_mean_token_sum_norm


class Scripted:
    """A reward function that returns the next scripted list of scores on each call."""

    def __init__(self, *calls: list[float]) -> None:
        self.calls = list(calls)
        self.n = 0

    def __call__(self, completions, examples, **ctx) -> list[float]:
        scores = self.calls[min(self.n, len(self.calls) - 1)]
        self.n += 1
        assert len(scores) == len(completions), (len(scores), len(completions))
        return list(scores)


# The tests below start from the paper's KL term and no dynamic sampling (the default
# experiment's own tuned values are beta 0 and dynamic sampling on), 2 prompts of G=4, the
# sampler's budget MAX_NEW, no warmup and raw gradients; each test's overrides win.
PAPER_BASE = [
    "beta=0.04",
    "train.dynamic_sampling=false",
    f"G={G}",
    "train.prompts_per_step=2",
    "train.max_grad_norm=null",
    "train.warmup_steps=0",
    f"sampler.max_new_tokens={MAX_NEW}",
]


def cfg_of(*overrides: str, lr: float = 0.0):
    """The real config tree with these overrides, validated; then train.lr = lr (0 is below
    the config's range: these tests use it to keep the policy where it started)."""
    cfg = compose(*PAPER_BASE, *overrides)
    cfg.train.lr = lr
    return cfg


def algo(*overrides: str) -> Algorithm:
    """The step's parts from the real config tree with these overrides (G=4, as below)."""
    return Algorithm.from_config(cfg_of(*overrides))


def make_module(
    *overrides: str, rewards: Scripted | None = None, reference=None, lr: float = 0.0
) -> GRPOModule:
    module = build_module(
        cfg_of(*overrides, lr=lr),
        policy=tiny_llama(hidden_size=32, intermediate_size=64, num_layers=1, seed=0),
        task=ArithmeticTask(max_operand=9, eval_size=20, seed=0),
        rewards=RewardSet({"scripted": rewards or Scripted([0.0] * 8)}),
        sampler=GenerateSampler(max_new_tokens=MAX_NEW),
    )
    if reference is not None:  # pi_ref: another model than the policy's frozen copy
        assert module.algo.kl.active
        module.reference_model = reference
    return module


def other_model():
    """A second tiny Llama (another seed) to serve as pi_ref."""
    return tiny_llama(hidden_size=32, intermediate_size=64, num_layers=1, seed=1).model.eval()


def fit(module: GRPOModule, rollouts: int, prompts: int = 2) -> L.Trainer:
    """Real Lightning fit for ``rollouts`` GRPO steps; leaves the trainer attached."""
    steps = module.algo.batching.steps_per_rollout(module.algo.mu, prompts * G)
    trainer = cpu_trainer(max_steps=rollouts * steps)
    trainer.fit(module, datamodule=TaskDataModule(module.task, prompts, 4, 4, seed=0))
    return trainer


# --------------------------------------------------------------------------- advantages

EXAMPLES = ArithmeticTask(max_operand=9, eval_size=20, seed=0).train()[:2]
REWARDS = [1.0, 0.0, 0.0, 1.0, 4.0, 0.0, 0.0, 0.0]  # two groups of G=4
S3 = math.sqrt(3.0)
BATCH_STD = math.sqrt(13.5 / 8)  # population std of REWARDS around their mean 0.75


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # group: (r - mean_g) / std_g; g1 mean .5 std .5, g2 mean 1 std sqrt(3)
        (["advantage=group"], [1, -1, -1, 1, 3 / S3, -1 / S3, -1 / S3, -1 / S3]),
        # Bessel: g1 std sqrt(1/3) -> +-0.5*sqrt(3); g2 std 2 -> 1.5, -0.5
        (
            ["advantage=group", "advantage.unbiased_std=true"],
            [S3 / 2, -S3 / 2, -S3 / 2, S3 / 2, 1.5, -0.5, -0.5, -0.5],
        ),
        # group_mean (Dr. GRPO): r - mean_g
        (["advantage=group_mean"], [0.5, -0.5, -0.5, 0.5, 3, -1, -1, -1]),
        # batch_std: (r - mean_g) / std(batch)
        (
            ["advantage=batch_std"],
            [v / BATCH_STD for v in (0.5, -0.5, -0.5, 0.5, 3, -1, -1, -1)],
        ),
        # rloo: r_i - mean of the other three
        (["advantage=rloo"], [2 / 3, -2 / 3, -2 / 3, 2 / 3, 4, -4 / 3, -4 / 3, -4 / 3]),
    ],
)
def test_advantage_option_gives_its_formula_on_a_rollout(overrides, expected):
    module = make_module("kl=none", *overrides, rewards=Scripted(REWARDS))
    rollout = module.make_rollout(EXAMPLES)
    assert rollout.rewards.tolist() == REWARDS
    torch.testing.assert_close(rollout.advantages, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_kl_reward_mode_subtracts_beta_times_summed_kl_before_the_advantages():
    # k2 per token, summed over each completion's real tokens, times beta, off the reward.
    ref = other_model()
    module = make_module(
        "kl=k2",
        "kl.mode=reward",
        "beta=0.5",
        "advantage=group_mean",
        rewards=Scripted(REWARDS),
        reference=ref,
    )
    rollout = module.make_rollout(EXAMPLES)
    c = rollout.completions
    with torch.no_grad():
        logp, _ = completion_logprobs(module.policy, c)
        ref_logp, _ = completion_logprobs(ref, c)
    k2 = 0.5 * (logp.double() - ref_logp.double()) ** 2
    penalised = torch.tensor(REWARDS, dtype=torch.float64) - 0.5 * (k2 * c.completion_mask).sum(1)
    grouped = penalised.view(2, G)
    expected = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    assert (k2 * c.completion_mask).sum() > 1e-3  # the two models differ: the test can fail
    torch.testing.assert_close(rollout.advantages.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rollout.ref_logp, ref_logp)


def test_kl_none_builds_no_reference_and_ignores_beta():
    module = make_module("kl=none", "beta=0.3")
    assert module.reference_model is None
    assert module.algo.kl.loss_beta == 0.0 and not module.algo.kl.active
    assert make_module("kl=k1", "beta=0.3").reference_model is not None


# --------------------------------------------------------------------------- the loss path

LENGTHS = [1, 2, 3, MAX_NEW]  # the last one hits max_new_tokens with no EOS: truncated
ADV = [2.0, -1.0, 0.5, 1.0]


def hand_rollout(module: GRPOModule) -> Rollout:
    """One group of G=4 completions of "3+4=" with LENGTHS tokens and advantages ADV."""
    tok = module.tokenizer
    prompt = tok(["3+4="] * G, return_tensors="pt", add_special_tokens=False)
    digit = tok.convert_tokens_to_ids("7")
    ids = torch.full((G, MAX_NEW), tok.pad_token_id)
    mask = torch.zeros((G, MAX_NEW), dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        ids[i, :n] = digit
        mask[i, :n] = 1
        if n < MAX_NEW:
            ids[i, n - 1] = tok.eos_token_id
    truncated = torch.tensor([n == MAX_NEW for n in LENGTHS])
    completions = Completions(
        prompt_ids=prompt["input_ids"],
        prompt_mask=prompt["attention_mask"],
        completion_ids=ids,
        completion_mask=mask,
        truncated=truncated,
    )
    rewards = torch.tensor(ADV)
    return Rollout(
        completions=completions,
        examples=[EXAMPLES[0]] * G,
        texts=tok.batch_decode(ids, skip_special_tokens=True),
        rewards=rewards,
        per_fn={"scripted": rewards},
        reward_errors={},
        advantages=torch.tensor(ADV),
    )


_FITTED: list[GRPOModule] = []


def loss_of(*overrides: str, shift=None, ref_shift=None) -> dict[str, float]:
    """The module's logged loss stats for hand_rollout under these options.

    shift (G, T): log pi_theta - log pi_old per token; ref_shift: log pi_theta - log pi_ref.
    One module is fitted for one rollout (a real trainer and optimizer attached; lr 0, so the
    policy never moves) and reused: each call gives it the Algorithm of ``overrides``.
    """
    if not _FITTED:
        _FITTED.append(make_module())
        fit(_FITTED[0], rollouts=1)
    module = _FITTED[0]
    module.algo = algo(*overrides)
    rollout = hand_rollout(module)
    with torch.no_grad():
        logp, entropy = completion_logprobs(module.policy, rollout.completions, with_entropy=True)
    rollout = dataclasses.replace(
        rollout,
        old_logp=None if shift is None else logp - shift,
        ref_logp=None if ref_shift is None else logp - ref_shift,
    )
    stats = module.inner_updates(rollout)
    stats["_entropy_seq_mean"] = float(
        ((entropy * rollout.completions.completion_mask).sum(1) / torch.tensor(LENGTHS)).mean()
    )
    return stats


def test_aggregation_options_weigh_completions_as_their_formulas_say():
    # With ratio 1 and no KL the per-token loss is -A_i. Hand values over LENGTHS=1,2,3,5:
    seq = loss_of("kl=none", "aggregation=seq_mean_token_mean")["loss"]
    tok = loss_of("kl=none", "aggregation=token_mean")["loss"]
    dr = loss_of("kl=none", "aggregation=seq_mean_token_sum_norm")["loss"]
    assert seq == pytest.approx(-(2 - 1 + 0.5 + 1) / 4, abs=1e-6)  # -mean_i A_i
    assert tok == pytest.approx(-(2 * 1 - 1 * 2 + 0.5 * 3 + 1 * 5) / 11, abs=1e-6)
    assert dr == pytest.approx(-(2 * 1 - 1 * 2 + 0.5 * 3 + 1 * 5) / (4 * MAX_NEW), abs=1e-6)


def test_mask_truncated_drops_the_truncated_completion_from_the_loss():
    seq = loss_of("kl=none", "loss.mask_truncated=true")["loss"]
    tok = loss_of("kl=none", "aggregation=token_mean", "loss.mask_truncated=true")["loss"]
    # the truncated row (A=1, 5 tokens) counts 0; seq-mean still divides by the N=4 rows
    assert seq == pytest.approx(-(2 - 1 + 0.5) / 4, abs=1e-6)
    assert tok == pytest.approx(-(2 * 1 - 1 * 2 + 0.5 * 3) / 6, abs=1e-6)


@pytest.mark.parametrize(
    ("kl", "c", "per_token_kl"),
    [
        ("k1", 0.3, 0.3),  # log pi - log pi_ref
        ("k2", 0.3, 0.5 * 0.3**2),
        ("k3", 0.3, math.exp(-0.3) + 0.3 - 1),  # r - log r - 1 with r = pi_ref/pi = e^-c
    ],
)
def test_kl_loss_mode_adds_beta_times_the_estimator(kl, c, per_token_kl):
    stats = loss_of(f"kl={kl}", "beta=0.5", ref_shift=torch.full((G, MAX_NEW), c))
    assert stats["kl"] == pytest.approx(per_token_kl, abs=1e-6)
    assert stats["loss"] == pytest.approx(-(2 - 1 + 0.5 + 1) / 4 + 0.5 * per_token_kl, abs=1e-6)


def test_kl_reward_mode_keeps_the_kl_out_of_the_loss_but_logs_it():
    stats = loss_of("kl=k1", "kl.mode=reward", "beta=0.5", ref_shift=torch.full((G, MAX_NEW), 0.3))
    assert stats["loss"] == pytest.approx(-(2 - 1 + 0.5 + 1) / 4, abs=1e-6)
    assert stats["kl"] == pytest.approx(0.3, abs=1e-6)


def test_entropy_coef_subtracts_coef_times_the_entropy():
    base = loss_of("kl=none")
    bonus = loss_of("kl=none", "loss.entropy_coef=0.1")
    assert base["_entropy_seq_mean"] > 0.5  # a random policy: the bonus is large enough to see
    assert bonus["loss"] == pytest.approx(base["loss"] - 0.1 * base["_entropy_seq_mean"], abs=1e-5)


def row_shift(log_rho: list[float], wiggle: bool) -> torch.Tensor:
    """(G, T) log-ratios whose mean over each row's real tokens is log_rho[i].

    wiggle: add a zero-mean (per row) pattern, so token ratios differ from the sequence ratio.
    """
    shift = torch.tensor(log_rho).unsqueeze(1).repeat(1, MAX_NEW)
    if wiggle:
        for i, n in enumerate(LENGTHS):
            w = torch.linspace(-0.5, 0.5, n) if n > 1 else torch.zeros(1)
            shift[i, :n] += w - w.mean()
    return shift


# Ratios: row 0 (A=2) rho 1.5 -> clipped at 1+eps_high=1.28 -> 2.56; row 1 (A=-1) rho 5 ->
# min(-5, -1.28) = -5, dual clip c=3 -> max(-5, -3) = -3; row 2 (A=.5) rho .5 -> min(.25, .4)
# = .25; row 3 (A=1) rho 1 -> 1.
CLIP_OPTS = (
    "kl=none",
    "surrogate.epsilon_low=0.2",
    "surrogate.epsilon_high=0.28",
    "surrogate.dual_clip=3",
)
LOG_RHO = [math.log(1.5), math.log(5.0), math.log(0.5), 0.0]


def test_clip_higher_and_dual_clip_give_the_hand_surrogate():
    stats = loss_of(*CLIP_OPTS, shift=row_shift(LOG_RHO, wiggle=False))
    assert stats["loss"] == pytest.approx(-(2.56 - 3 + 0.25 + 1) / 4, abs=1e-5)
    no_dual = loss_of(*CLIP_OPTS[:-1], shift=row_shift(LOG_RHO, wiggle=False))
    assert no_dual["loss"] == pytest.approx(-(2.56 - 5 + 0.25 + 1) / 4, abs=1e-5)
    # rows 0 and 1 are past the clip range with gradient removed: high (A>0) 1 token of 11,
    # low (A<0 and rho < 0.8): none; row 2 has A>0 and rho .5: not counted either
    assert stats["clip_ratio/high_mean"] == pytest.approx(1 / 11, abs=1e-6)
    assert stats["clip_ratio/low_mean"] == pytest.approx(0.0, abs=1e-6)


def test_sequence_ratio_level_uses_the_length_normalised_sequence_ratio():
    # Same per-row mean log-ratio, tokens spread around it: GSPO sees only the row mean.
    # surrogate=gspo with CLIP_OPTS' clip range (not the paper's 3e-4 / 4e-4)
    gspo = loss_of("surrogate=gspo", *CLIP_OPTS, shift=row_shift(LOG_RHO, True))
    assert gspo["loss"] == pytest.approx(-(2.56 - 3 + 0.25 + 1) / 4, abs=1e-5)
    shift = row_shift(LOG_RHO, True)
    token = loss_of("surrogate=ppo_clip", *CLIP_OPTS, shift=shift)
    # token level: each token clips its own ratio; reference in plain float64 Python
    expected = 0.0
    for i, (n, a) in enumerate(zip(LENGTHS, ADV)):
        row = 0.0
        for t in range(n):
            rho = math.exp(float(shift[i, t]))
            s = min(rho * a, min(max(rho, 0.8), 1.28) * a)
            row += max(s, 3 * a) if a < 0 else s
        expected += -row / n
    assert token["loss"] == pytest.approx(expected / 4, abs=1e-5)
    assert abs(token["loss"] - gspo["loss"]) > 1e-3


# --------------------------------------------------------------------------- training options


@pytest.mark.parametrize(
    "aggregation", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]
)
@pytest.mark.parametrize("micro", [1, 2])
def test_microbatching_gives_the_same_update_as_one_backward(aggregation, micro):
    # hand_rollout has completions of 1, 2, 3 and 5 tokens, so a wrong weight per micro-batch
    # (per row where it should be per token, or the reverse) changes the summed gradient.
    def one_step(*extra: str) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        module = attach(make_module("kl=none", f"aggregation={aggregation}", *extra, lr=1e-2))
        rollout = hand_rollout(module)
        with torch.no_grad():
            logp, _ = completion_logprobs(module.policy, rollout.completions)
        # ratios != 1, some clipped
        rollout = dataclasses.replace(rollout, old_logp=logp - row_shift(LOG_RHO, wiggle=True))
        stats = module.inner_updates(rollout)
        params = list(module.policy.parameters())
        return [p.detach().clone() for p in params], [p.grad.clone() for p in params], stats

    whole_w, whole_g, whole = one_step()
    split_w, split_g, split = one_step(f"train.microbatch_size={micro}")
    assert any(g.abs().sum() > 0 for g in whole_g)
    for a, b in zip(whole_g, split_g):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
    # AdamW's first step is lr * g / (|g| + 1e-8): where |g| is near 1e-8 it magnifies float
    # rounding of g (1e-10 here) to 1e-5 of a weight, so weights are compared at 1% of lr = 1e-2.
    for a, b in zip(whole_w, split_w):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)
    for key in ("loss", "surrogate", "ratio_mean", "clip_ratio/region_mean"):
        assert split[key] == pytest.approx(whole[key], abs=1e-6), key


def test_later_minibatches_of_a_rollout_use_the_sampling_policy_as_pi_old():
    # mu = 1 with 2 mini-batches of 4 of the 8 completions: two optimizer steps per rollout, so
    # mini-batch 2 runs on a policy that has moved since sampling and must be clipped against
    # pi_old = the sampling policy, not against itself (ratio 1).
    # Rows, not groups, are shuffled into the mini-batches (shared_prefix=auto would turn the
    # prefix sharing on for these whole-group mini-batches and shuffle groups instead).
    module = attach(
        make_module(
            "kl=none",
            "train.minibatch_size=4",
            "train.shared_prefix=false",
            lr=1e-2,
            rewards=Scripted(REWARDS),
        )
    )
    sampling_policy = copy.deepcopy(module.policy)
    torch.manual_seed(0)  # the rollout must not depend on what ran before in this process
    rollout = module.make_rollout(EXAMPLES)
    with torch.no_grad():
        pi_old, _ = completion_logprobs(sampling_policy, rollout.completions)
    assert rollout.old_logp is not None, "two optimizer steps per rollout need pi_old log-probs"
    torch.testing.assert_close(rollout.old_logp, pi_old)

    policies = [sampling_policy]  # the policy each mini-batch's forward sees
    opt = module.optimizers().optimizer
    opt.register_step_post_hook(lambda *_: policies.append(copy.deepcopy(module.policy)))
    torch.manual_seed(7)
    order = torch.randperm(8)  # the shuffle inner_updates draws first under the same seed
    torch.manual_seed(7)
    stats = module.inner_updates(rollout)
    assert len(policies) == 3  # two optimizer steps

    a = module.algo
    expected = []
    for policy, idx in ((policies[0], order[:4]), (policies[1], order[4:])):
        sub = select_rows(rollout.completions, idx)
        with torch.no_grad():
            logp, _ = completion_logprobs(policy, sub)
        _, s = objective.grpo_loss(
            logp,
            pi_old[idx],
            rollout.advantages[idx],
            sub.completion_mask,
            eps_low=a.surrogate.epsilon_low,
            eps_high=a.surrogate.epsilon_high,
            aggregation="seq_mean_token_mean",
            max_len=MAX_NEW,
        )
        expected.append(s)
    assert expected[0].ratio_mean == pytest.approx(1.0, abs=1e-6)  # on-policy first step
    # the policy moved: off-policy (a pi_old taken from the moved policy gives 1 to ~1e-7)
    assert abs(expected[1].ratio_mean - 1.0) > 1e-4
    for key, field in (("loss", "loss"), ("ratio_mean", "ratio_mean")):
        want = (float(getattr(expected[0], field)) + float(getattr(expected[1], field))) / 2
        assert stats[key] == pytest.approx(want, abs=1e-5), key


def test_pi_old_and_pi_ref_log_probs_are_computed_in_micro_batches_to_the_same_values():
    ref = other_model()
    module = make_module(
        "kl=k1",
        "train.minibatch_size=4",
        "train.microbatch_size=2",
        rewards=Scripted(REWARDS),
        reference=ref,
    )
    sampling_policy = copy.deepcopy(module.policy)
    rollout = module.make_rollout(EXAMPLES)
    with torch.no_grad():  # one forward over all 8 rows, as a reference
        pi_old, _ = completion_logprobs(sampling_policy, rollout.completions)
        pi_ref, _ = completion_logprobs(ref, rollout.completions)
    torch.testing.assert_close(rollout.old_logp, pi_old)
    torch.testing.assert_close(rollout.ref_logp, pi_ref)


def test_num_minibatches_splits_the_rollout_into_that_many_optimizer_steps():
    module = attach(
        make_module("kl=none", "train.num_minibatches=2", lr=1e-2, rewards=Scripted(REWARDS))
    )
    opt = module.optimizers().optimizer
    rollout = module.make_rollout(EXAMPLES)
    assert rollout.old_logp is not None  # 2 steps on one rollout: pi_old is needed
    module.inner_updates(rollout)
    # 8 completions in 2 mini-batches of 4: two optimizer steps
    assert opt.state[next(module.policy.parameters())]["step"].item() == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.num_minibatches=2", "train.minibatch_size=4"],
            "train.num_minibatches=2 and train.minibatch_size=4",
        ),
        (["train.num_minibatches=3"], "train.num_minibatches=3 is invalid: it must divide"),
        (["train.num_minibatches=0"], "train.num_minibatches=0 is invalid: expected null or an"),
        (
            ["train.num_minibatches=2", "train.microbatch_size=3"],
            "train.microbatch_size=3 is invalid: it must divide the mini-batch of 4",
        ),
    ],
)
def test_bad_num_minibatches_fails_before_compute_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose("train.prompts_per_step=2", f"G={G}", *overrides)  # validates
    assert message in str(err.value)


def test_mu_reuses_the_rollout_old_logprobs_for_every_minibatch_update():
    module = attach(
        make_module("kl=none", "mu=2", "train.minibatch_size=4", lr=1e-2, rewards=Scripted(REWARDS))
    )
    sampling_policy = copy.deepcopy(module.policy)
    opt = module.optimizers().optimizer
    rollout = module.make_rollout(EXAMPLES)
    with torch.no_grad():
        pi_old, _ = completion_logprobs(sampling_policy, rollout.completions)
    torch.testing.assert_close(rollout.old_logp, pi_old)  # pi_old = the sampling policy
    stats = module.inner_updates(rollout)
    # mu 2 passes x 2 mini-batches of 4 of the 8 completions = 4 optimizer steps
    assert opt.state[next(module.policy.parameters())]["step"].item() == 4
    with torch.no_grad():
        moved, _ = completion_logprobs(module.policy, rollout.completions)
    assert (moved - pi_old).abs().max() > 1e-3  # the policy moved ...
    torch.testing.assert_close(rollout.old_logp, pi_old)  # ... and pi_old stayed put
    # the first update sees ratio 1, the later ones the moved policy over the same pi_old
    assert abs(stats["ratio_mean"] - 1.0) > 1e-4


@pytest.mark.parametrize(
    ("every", "mix", "rollouts", "ref_weight"),
    [
        (1, 0.5, 2, 0.25),  # two TR-DPO mixes: ref <- .5 ref + .5 pi, twice
        (1, 1.0, 1, 0.0),  # hard copy
        (2, 1.0, 1, 1.0),  # not yet due: unchanged
    ],
)
def test_ref_sync_mixes_the_reference_towards_the_policy(every, mix, rollouts, ref_weight):
    ref = other_model()
    ref0 = [p.detach().clone() for p in ref.parameters()]
    module = make_module(
        "kl=k3",
        f"train.ref_sync_every={every}",
        f"train.ref_sync_mix={mix}",
        rewards=Scripted(REWARDS),
        reference=ref,
    )
    fit(module, rollouts=rollouts)  # lr 0: the policy stays where it started
    for p_ref, p0, p in zip(ref.parameters(), ref0, module.policy.parameters()):
        torch.testing.assert_close(p_ref, ref_weight * p0 + (1 - ref_weight) * p.detach())
    assert not torch.equal(ref0[0], next(module.policy.parameters()))


def test_dynamic_sampling_replaces_zero_variance_groups_and_logs_the_drop_rate():
    first, fresh = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]
    module = make_module("kl=none", "train.dynamic_sampling=true", rewards=Scripted(first, fresh))
    rollout = module.make_rollout(EXAMPLES)
    assert rollout.stats["dynamic_sampling/drop_rate"] == 0.5  # 1 of 2 groups had no signal
    assert rollout.stats["dynamic_sampling/tries"] == 2.0
    # reward is the kept batch's mean (4/8), sampled_reward the first sample's (2/8)
    assert (
        rollout.stats["reward"] == 0.5 and rollout.stats["dynamic_sampling/sampled_reward"] == 0.25
    )
    assert rollout.rewards.tolist() == first[:4] + fresh
    torch.testing.assert_close(
        rollout.advantages, torch.tensor([1.0, -1, -1, 1, -1, 1, 1, -1]), atol=1e-5, rtol=0
    )
    assert rollout.examples[:4] == [EXAMPLES[0]] * 4 and rollout.examples[4] != EXAMPLES[1]

    once = make_module(
        "kl=none",
        "train.dynamic_sampling=true",
        "train.dynamic_sampling_max_tries=1",
        rewards=Scripted(first, fresh),
    )
    kept = once.make_rollout(EXAMPLES)
    assert kept.stats["dynamic_sampling/drop_rate"] == 0.5
    assert kept.advantages[4:].tolist() == [0.0] * 4  # the dead group stays, with A = 0

    off = make_module("kl=none", rewards=Scripted(first, fresh)).make_rollout(EXAMPLES)
    assert "dynamic_sampling/drop_rate" not in off.stats


def fresh_prompts(module: GRPOModule, n_groups: int):
    """The replacement prompts dynamic sampling would draw next for ``n_groups`` dead groups."""
    return module.dynamic_sampling.fresh_prompts(module.task, n_groups)


def test_dynamic_sampling_retries_draw_fresh_prompts_each_time():
    module = make_module("kl=none", "train.dynamic_sampling=true")
    draws = [fresh_prompts(module, 3) for _ in range(4)]  # 4 retries, 3 dead groups each
    # 80 training prompts: four draws of 3 agreeing by chance has probability ~1e-17
    assert len({tuple(ex.prompt for ex in d) for d in draws}) == 4


def test_dynamic_sampling_prompts_depend_on_the_seed():
    seed0 = fresh_prompts(make_module("kl=none", "seed=0"), 4)
    seed1 = fresh_prompts(make_module("kl=none", "seed=1"), 4)
    assert [ex.prompt for ex in seed0] != [ex.prompt for ex in seed1]
    again = fresh_prompts(make_module("kl=none", "seed=0"), 4)
    assert [ex.prompt for ex in again] == [ex.prompt for ex in seed0]  # reproducible


def test_each_rank_draws_its_own_replacement_prompts():
    seeds = {prompt_seed(seed, rank) for seed in range(3) for rank in range(4)}
    assert len(seeds) == 12  # no two (seed, rank) pairs share a stream
    draws = {
        rank: torch.randint(80, (8,), generator=torch.Generator().manual_seed(prompt_seed(0, rank)))
        for rank in (0, 1)
    }
    assert not torch.equal(draws[0], draws[1])


def test_a_resumed_run_continues_the_replacement_prompt_stream():
    module = make_module("kl=none", "train.dynamic_sampling=true")
    fresh_prompts(module, 3)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    expected = [ex.prompt for ex in fresh_prompts(module, 3)]
    resumed = make_module("kl=none", "train.dynamic_sampling=true")
    resumed.on_load_checkpoint(checkpoint)
    assert [ex.prompt for ex in fresh_prompts(resumed, 3)] == expected


def test_each_rank_resumes_its_own_replacement_prompt_stream():
    task = ArithmeticTask(max_operand=9, eval_size=20, seed=0)

    def stream(rank: int) -> DynamicSampling:
        s = DynamicSampling(enabled=True, max_tries=4, seed=0)
        s.rank = rank
        return s

    def prompts(s: DynamicSampling) -> list[str]:
        return [ex.prompt for ex in s.fresh_prompts(task, 3)]

    ranks = [stream(0), stream(1)]
    first = [prompts(s) for s in ranks]
    saved = [s.state_dict() for s in ranks]  # what a 2-rank checkpoint holds, rank by rank
    expected = [prompts(s) for s in ranks]
    assert expected[0] != expected[1]
    for rank in (1, 0):
        resumed = stream(rank)
        resumed.load_state_dict(saved, rollouts_done=1)
        assert prompts(resumed) == expected[rank], rank
    # A checkpoint with rank 0's stream alone (as written before every rank's was kept): rank 1
    # starts a stream of its own, replaying neither rank 0's nor its own first prompts.
    old = stream(1)
    old.load_state_dict([saved[0]], rollouts_done=1)
    drawn = prompts(old)
    assert drawn not in (expected[0], expected[1], first[1])


def nan_gradient_on(param: torch.nn.Parameter):
    """Fault injection: the gradient of ``param`` becomes NaN in every backward (the loss stays
    finite), as 0 x inf on a padding token would make it."""
    return param.register_hook(lambda grad: torch.full_like(grad, math.nan))


def test_a_nan_gradient_skips_the_step_and_counts_it():
    module = attach(make_module("kl=none", lr=1e-2, rewards=Scripted(REWARDS)))
    params = list(module.policy.parameters())
    opt = module.optimizers().optimizer
    module.inner_updates(module.make_rollout(EXAMPLES))  # one good step: Adam has state
    weights = [p.detach().clone() for p in params]
    adam = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    hook = nan_gradient_on(params[-1])
    stats = module.inner_updates(module.make_rollout(EXAMPLES))
    assert math.isfinite(stats["loss"])  # the loss alone would not have caught it
    assert (stats["skipped_steps"], stats["skipped_steps_total"]) == (1.0, 1.0)
    for w, p in zip(weights, params):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=0)
    for state, p in zip(adam, params):
        for k, v in state.items():
            torch.testing.assert_close(opt.state[p][k], v, rtol=0, atol=0)
    hook.remove()
    stats = module.inner_updates(module.make_rollout(EXAMPLES))
    assert (stats["skipped_steps"], stats["skipped_steps_total"]) == (0.0, 1.0)
    assert not torch.equal(params[0].detach(), weights[0])  # a finite gradient steps again


def test_consecutive_nan_gradients_stop_the_run_with_what_to_try():
    module = make_module(
        "kl=none", "train.max_consecutive_skipped_steps=3", lr=1e-2, rewards=Scripted(REWARDS)
    )
    nan_gradient_on(next(module.policy.parameters()))
    with pytest.raises(FloatingPointError) as err:
        fit(module, rollouts=5)
    message = str(err.value)
    assert "3 optimizer steps in a row" in message and "rollout 3" in message
    assert "train.lr" in message and "checkpoints" in message.lower()
    assert module.rollouts_done == 2  # stopped in the third rollout, not after five


def test_a_finite_step_resets_the_consecutive_skip_count():
    module = attach(
        make_module(
            "kl=none", "train.max_consecutive_skipped_steps=2", lr=1e-2, rewards=Scripted(REWARDS)
        )
    )
    param = next(module.policy.parameters())
    for _ in range(2):
        hook = nan_gradient_on(param)
        module.inner_updates(module.make_rollout(EXAMPLES))  # 1 skip: below the limit of 2
        hook.remove()
        module.inner_updates(module.make_rollout(EXAMPLES))  # a good step in between
    hook = nan_gradient_on(param)
    module.inner_updates(module.make_rollout(EXAMPLES))
    with pytest.raises(FloatingPointError, match="2 optimizer steps in a row"):
        module.inner_updates(module.make_rollout(EXAMPLES))


def test_max_consecutive_skipped_steps_must_be_at_least_one():
    with pytest.raises(ConfigError, match=r"train.max_consecutive_skipped_steps=0 is invalid"):
        compose("train.max_consecutive_skipped_steps=0")


# --------------------------------------------------------------------------- through the CLI


def run_of(tracking_uri: str):
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


@pytest.mark.slow
def test_cli_k1_rloo_token_mean_run_logs_its_options(run_cli, tracking_uri):
    run_cli(
        "train",
        *fast_without("train.rollouts"),
        "train.rollouts=1",
        "kl=k1",
        "advantage=rloo",
        "aggregation=token_mean",
    )
    _, run = run_of(tracking_uri)
    p, m = run.data.params, run.data.metrics
    assert (p["kl.estimator"], p["kl.mode"], p["kl.beta"]) == ("k1", "loss", "0.04")
    assert p["advantage._target_"] == "grpo_lab.grpo.advantages.RLOO"
    assert p["aggregation._target_"] == "grpo_lab.grpo.aggregation.TokenMean"
    assert "loss.aggregation" not in p
    assert {"loss", "kl", "surrogate", "clip_ratio/region_mean"} <= set(m)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # pi_theta == pi_ref on the first rollout


@pytest.mark.slow
def test_cli_k2_reward_mode_batch_std_sum_norm_mu2_ref_sync_dynamic_sampling(
    run_cli, tracking_uri, tmp_path
):
    run_cli(
        "train",
        *fast_without("train.rollouts"),
        "train.rollouts=2",
        "kl=k2",
        "kl.mode=reward",
        "advantage=batch_std",
        "aggregation=seq_mean_token_sum_norm",
        "mu=2",
        "train.minibatch_size=8",
        "train.ref_sync_every=1",
        "train.ref_sync_mix=0.5",
        "train.dynamic_sampling=true",
        "train.dynamic_sampling_max_tries=2",
    )
    client, run = run_of(tracking_uri)
    p, m = run.data.params, run.data.metrics
    assert (p["kl.estimator"], p["kl.mode"]) == ("k2", "reward")
    assert p["advantage._target_"] == "grpo_lab.grpo.advantages.BatchStd"
    assert p["aggregation._target_"] == "grpo_lab.grpo.aggregation.SeqMeanTokenSumNorm"
    assert p["aggregation.max_len"] == "6"  # sampler.max_new_tokens
    assert (p["mu"], p["train.minibatch_size"]) == ("2", "8")
    assert (p["train.ref_sync_every"], p["train.ref_sync_mix"]) == ("1", "0.5")
    assert p["train.dynamic_sampling"] == "True"
    assert 0.0 <= m["dynamic_sampling/drop_rate"] <= 1.0
    assert m["dynamic_sampling/tries"] in (1.0, 2.0)
    assert m["kl"] >= 0  # k2 >= 0; logged although it is in the reward, not the loss
    # metrics are logged once per rollout ...
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 2
    # ... and the trainer counted 2 rollouts x mu 2 x 2 mini-batches of 8 of the 16
    # completions = 8 optimizer steps (the checkpoint holds trainer.global_step)
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 8


@pytest.mark.slow
def test_cli_mu2_minibatches_and_microbatches_clip_against_the_sampling_policy(
    run_cli, tracking_uri, tmp_path
):
    # As a user would: mu 2 over 2 mini-batches of 8 of the 16 completions, each in 4
    # micro-batches of 2, on one CPU device. A varying reward so that every update moves.
    tests_dir = str(Path(__file__).parent)  # signal_rewards.py
    run_cli(
        "train",
        *fast_without("train.rollouts"),
        "train.rollouts=2",
        "mu=2",
        "train.num_minibatches=2",
        "train.microbatch_size=2",
        "reward=custom",
        "reward.functions.custom._target_=signal_rewards.text_checksum",
        "train.lr=1e-2",
        "train.warmup_steps=0",
        env={
            "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
        },
    )
    client, run = run_of(tracking_uri)
    p = run.data.params
    assert (p["mu"], p["train.num_minibatches"], p["train.microbatch_size"]) == ("2", "2", "2")
    # 2 rollouts x mu 2 x 2 mini-batches = 8 optimizer steps, none skipped
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 8
    history = {
        key: [m.value for m in client.get_metric_history(run.info.run_id, key)]
        for key in ("ratio_mean", "clip_ratio/region_mean", "grad_norm", "skipped_steps_total")
    }
    assert history["skipped_steps_total"] == [0.0, 0.0]
    assert all(g > 0 for g in history["grad_norm"])
    # Steps 2-4 of each rollout run on a policy that moved since sampling: the mean ratio leaves
    # 1 (it would be exactly 1 were pi_old the current policy), and lr 1e-2 moves it past 1 +- 0.2
    # somewhere (clip_ratio counts a token only where the clip removed its gradient).
    assert all(abs(r - 1.0) > 1e-3 for r in history["ratio_mean"]), history["ratio_mean"]
    assert max(history["clip_ratio/region_mean"]) > 0.0, history["clip_ratio/region_mean"]
