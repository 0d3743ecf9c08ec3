"""The GRPO math in grpo_lab.objective against hand values and float64 references.

Every expected value here is worked out by hand (in the comments) or by an independent
float64 formula written in the test, never copied from running the code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from grpo_lab import objective
from grpo_lab.objective import (
    aggregate,
    clip_fractions,
    clipped_surrogate,
    group_advantages,
    group_reward_std,
    grpo_loss,
    importance_log_ratio,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalised_rewards,
    selective_log_softmax,
    token_entropy,
)

F64 = torch.float64


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def log_ratios(ratios) -> torch.Tensor:
    """log rho for a nested list of ratios, in float64."""
    return torch.log(t(ratios))


# --------------------------------------------------------------------------- advantages


def test_half_correct_group_gives_plus_minus_one_advantage():
    # mean 0.5, population std sqrt(mean((r - 0.5)^2)) = 0.5, so A = +-0.5 / 0.5 = +-1.
    rewards = t([1, 1, 1, 1, 0, 0, 0, 0], torch.float32)
    adv = group_advantages(rewards, group_size=8)
    expected = t([1, 1, 1, 1, -1, -1, -1, -1], torch.float32)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert adv.dtype == torch.float32


def test_unbiased_std_uses_bessel_correction():
    # sample std = sqrt(8 * 0.25 / 7) = sqrt(2/7) = 0.5345..., A = +-0.5 / 0.5345 = +-0.935
    rewards = t([1, 1, 1, 1, 0, 0, 0, 0])
    adv = group_advantages(rewards, group_size=8, unbiased_std=True)
    a = 0.5 / (math.sqrt(2 / 7) + 1e-6)
    assert a == pytest.approx(0.9354, abs=1e-4)
    torch.testing.assert_close(adv, t([a] * 4 + [-a] * 4))


@pytest.mark.parametrize("scale", ["group_std", "batch_std", "none", "rloo"])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.7, 0.1, 123.456])
def test_equal_rewards_give_exactly_zero_advantage(scale, value):
    # 0.7 and 123.456 are not exact in binary: the float mean of 8 copies can miss them
    # by an ulp, which a division by (std + eps) would magnify into a visible advantage.
    for dtype in (torch.float32, F64):
        rewards = torch.full((8,), value, dtype=dtype)
        adv = group_advantages(rewards, group_size=8, scale=scale)
        assert torch.equal(adv, torch.zeros_like(adv)), (scale, value, dtype, adv)


@pytest.mark.parametrize("unbiased_std", [False, True])
def test_batch_mixing_dead_and_live_groups_is_finite_and_zero_on_dead_groups(unbiased_std):
    # groups of 8: all right, half right, all wrong, all 0.7 (inexact in binary)
    rewards = t([1] * 8 + [1, 0] * 4 + [0] * 8 + [0.7] * 8, torch.float32)
    adv = group_advantages(rewards, group_size=8, unbiased_std=unbiased_std)
    assert torch.isfinite(adv).all()
    std = math.sqrt(8 * 0.25 / (7 if unbiased_std else 8))
    a = 0.5 / (std + 1e-6)
    torch.testing.assert_close(adv[8:16], t([a, -a] * 4, torch.float32))
    assert torch.equal(adv[:8], torch.zeros(8)) and torch.equal(adv[16:], torch.zeros(16))


def test_group_reward_std_is_zero_exactly_for_constant_groups():
    # Dynamic sampling and frac_reward_zero_std test `std == 0`: an ulp of noise hides a dead
    # group (the float32 std of eight 0.7s is 6e-8, not 0).
    rewards = t([0.7] * 8 + [1, 0] * 4, torch.float32)
    std = group_reward_std(rewards, group_size=8)
    assert std[0].item() == 0.0
    assert std[1].item() == pytest.approx(0.5)


def test_batch_std_divides_by_the_std_of_the_whole_batch():
    rewards = t([1, 0, 3, 3])
    adv = group_advantages(rewards, group_size=2, scale="batch_std")
    # group means 0.5 and 3 -> centred [0.5, -0.5, 0, 0]
    # batch mean 1.75, squared deviations 0.5625 + 3.0625 + 1.5625 + 1.5625 = 6.75, var = 6.75/4
    batch_std = math.sqrt(6.75 / 4)
    expected = t([0.5, -0.5, 0, 0]) / (batch_std + 1e-6)
    torch.testing.assert_close(adv, expected)


def test_scale_none_only_subtracts_the_group_mean():
    # Dr. GRPO: A_i = r_i - mean_g(r), no division.
    rewards = t([1, 0, 0, 0, 3, 1, 2, 2])
    adv = group_advantages(rewards, group_size=4, scale="none")
    torch.testing.assert_close(adv, t([0.75, -0.25, -0.25, -0.25, 1, -1, 0, 0]))


def test_rloo_subtracts_the_mean_of_the_other_completions():
    rewards = t([3, 1, 0, 0, 1, 0, 0, 1])
    adv = group_advantages(rewards, group_size=4, scale="rloo")
    # group 1: 3 - (1+0+0)/3 = 8/3; 1 - (3+0+0)/3 = 0; 0 - (3+1+0)/3 = -4/3 (twice)
    # group 2: 1 - (0+0+1)/3 = 2/3; 0 - (1+0+1)/3 = -2/3
    expected = t([8 / 3, 0, -4 / 3, -4 / 3, 2 / 3, -2 / 3, -2 / 3, 2 / 3])
    torch.testing.assert_close(adv, expected)


@pytest.mark.parametrize(
    "rewards, group_size",
    [(torch.zeros(2, 4), 4), (torch.zeros(6), 4), (torch.zeros(()), 1)],
    ids=["2-d", "length-not-divisible", "0-d"],
)
def test_bad_reward_shape_raises(rewards, group_size):
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, group_size)


def test_unknown_advantage_scale_raises_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: group_std, batch_std, none, rloo"):
        group_advantages(t([1, 0]), 2, scale="z-score")


# --------------------------------------------------------------------------- KL estimators


def _kl_inputs():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g, dtype=F64) * 4
    ref_logp = -torch.rand(3, 5, generator=g, dtype=F64) * 4
    return logp, ref_logp


def _elementwise(fn, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Apply a python-float formula elementwise: an independent float64 reference."""
    return t([[fn(x, y) for x, y in zip(ra, rb)] for ra, rb in zip(a.tolist(), b.tolist())])


def test_kl_k1_k2_k3_match_their_formulas_per_token():
    logp, ref = _kl_inputs()
    torch.testing.assert_close(kl_k1(logp, ref), _elementwise(lambda x, y: x - y, logp, ref))
    torch.testing.assert_close(
        kl_k2(logp, ref), _elementwise(lambda x, y: 0.5 * (x - y) ** 2, logp, ref)
    )
    # k3 = exp(ref - logp) - (ref - logp) - 1
    k3 = _elementwise(lambda x, y: math.exp(y - x) - (y - x) - 1, logp, ref)
    torch.testing.assert_close(kl_k3(logp, ref), k3)
    for name, fn in [("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)]:
        torch.testing.assert_close(kl_estimate(logp, ref, name), fn(logp, ref))


def test_kl_k3_is_nonnegative_and_zero_where_policies_agree():
    x = torch.linspace(-20, 20, 401, dtype=F64)
    logp, ref = x.unsqueeze(0).expand(401, -1), x.unsqueeze(1).expand(-1, 401)
    assert (kl_k3(logp, ref) >= 0).all()
    assert torch.equal(kl_k3(x, x), torch.zeros_like(x))
    assert torch.equal(kl_k2(x, x), torch.zeros_like(x))


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_unbiased_estimators_average_to_the_exact_kl(name):
    # E_{x ~ pi}[k(x)] over the whole vocabulary equals sum_x pi(x) log(pi(x) / ref(x)).
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(7, generator=g, dtype=F64), dim=0)
    ref = torch.log_softmax(torch.randn(7, generator=g, dtype=F64), dim=0)
    exact = sum(math.exp(a) * (a - b) for a, b in zip(logp.tolist(), ref.tolist()))
    expectation = (logp.exp() * kl_estimate(logp, ref, name)).sum()
    assert expectation.item() == pytest.approx(exact, rel=1e-12)


def test_unknown_kl_estimator_raises_naming_the_allowed_ones():
    logp, ref = _kl_inputs()
    with pytest.raises(ValueError, match=r"'k4'.*allowed: \['k1', 'k2', 'k3'\]"):
        kl_estimate(logp, ref, "k4")


# --------------------------------------------------------------------------- surrogate

EPS_LOW, EPS_HIGH = 0.2, 0.28  # clip-higher (DAPO): the range is [0.8, 1.28]


@pytest.mark.parametrize(
    "ratio, adv, expected",
    [
        (1.1, 1.0, 1.1),  # inside the range: rho A
        (1.5, 1.0, 1.28),  # A > 0 above 1 + eps_high: clipped to 1.28 A
        (1.25, 2.0, 2.5),  # above 1 + eps_low but below 1 + eps_high: not clipped
        (0.5, 1.0, 0.5),  # A > 0 below the range: min keeps rho A (the pessimistic one)
        (0.9, -1.0, -0.9),  # inside the range
        (0.5, -1.0, -0.8),  # A < 0 below 1 - eps_low: clipped to 0.8 A
        (0.79, -2.0, -1.6),  # just below 0.8: clipped
        (1.5, -1.0, -1.5),  # A < 0 above the range: min keeps rho A
        (1.0, 0.0, 0.0),
    ],
)
def test_clipped_surrogate_matches_hand_values(ratio, adv, expected):
    value = clipped_surrogate(log_ratios([[ratio]]), t([adv]), EPS_LOW, EPS_HIGH)
    assert value.item() == pytest.approx(expected, abs=1e-12)


def test_clipped_surrogate_accepts_per_token_advantages():
    ratios = [[1.5, 0.5], [1.5, 0.5]]
    adv = t([[1.0, -1.0], [-1.0, 1.0]])
    value = clipped_surrogate(log_ratios(ratios), adv, EPS_LOW, EPS_HIGH)
    torch.testing.assert_close(value, t([[1.28, -0.8], [-1.5, 0.5]]))


@pytest.mark.parametrize(
    "ratio, adv, expected",
    [
        (5.0, -1.0, -3.0),  # min(-5, -1.28) = -5, bounded below by c A = -3
        (2.0, -1.0, -2.0),  # -2 > -3: unchanged
        (0.5, -1.0, -0.8),  # ordinary clip, above c A
        (5.0, 1.0, 1.28),  # positive advantages are never dual-clipped
    ],
)
def test_dual_clip_bounds_negative_advantage_objective_below(ratio, adv, expected):
    value = clipped_surrogate(log_ratios([[ratio]]), t([adv]), EPS_LOW, EPS_HIGH, dual_clip=3.0)
    assert value.item() == pytest.approx(expected, abs=1e-12)


def test_clip_fractions_count_only_real_tokens_whose_gradient_was_clipped():
    ratios = [
        [1.5, 1.0, 0.7],  # A > 0: 1.5 clipped high; 0.7 is below the range but min keeps it
        [0.5, 1.5, 0.1],  # A < 0: 0.5 clipped low; 1.5 kept; 0.1 is padding
        [0.5, 1.5, 1.0],  # A = 0: nothing to clip
    ]
    mask = t([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    fr = clip_fractions(log_ratios(ratios), t([1.0, -1.0, 0.0]), mask, EPS_LOW, EPS_HIGH)
    # 8 real tokens, one clipped low and one clipped high.
    assert fr["low"].item() == pytest.approx(1 / 8)
    assert fr["high"].item() == pytest.approx(1 / 8)
    assert fr["region"].item() == pytest.approx(2 / 8)


# --------------------------------------------------------------------------- aggregation

MASK = t([[1, 1, 0, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("seq_mean_token_mean", (4 / 2 + 20 / 4) / 2),  # mean of per-sequence means 2 and 5
        ("token_mean", (4 + 20) / 6),  # 24 over 6 real tokens
        ("seq_mean_token_sum_norm", (4 / 4 + 20 / 4) / 2),  # sums over the constant L = 4
    ],
)
@pytest.mark.parametrize("pad", [0.0, 1e30, -1e30])
def test_aggregate_matches_hand_values_and_ignores_padding(mode, expected, pad):
    per_token = t([[1, 3, pad, pad], [2, 4, 6, 8]])
    assert aggregate(per_token, MASK, mode, max_len=4).item() == pytest.approx(expected)


def test_aggregate_unknown_mode_and_missing_max_len_raise():
    x = t([[1.0, 2.0]])
    with pytest.raises(ValueError, match="allowed: seq_mean_token_mean, token_mean"):
        aggregate(x, torch.ones_like(x), "sum")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(x, torch.ones_like(x), "seq_mean_token_sum_norm")


# --------------------------------------------------------------------------- log-probs


def _logits(dtype=F64):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 11, generator=g, dtype=F64) * 3
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    return logits.to(dtype), tokens


def test_selective_log_softmax_matches_log_softmax_gather():
    logits, tokens = _logits()
    expected = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, tokens), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_log_softmax_of_half_precision_logits_is_computed_in_float32(dtype):
    logits, tokens = _logits(dtype)
    out = selective_log_softmax(logits, tokens)
    assert out.dtype == torch.float32
    wide = logits.to(F64)  # the same (rounded) logits, exactly, in float64
    expected = torch.log_softmax(wide, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.to(F64), expected, rtol=0, atol=1e-5)


def test_token_entropy_matches_a_float64_reference():
    logits, _ = _logits()
    p = torch.softmax(logits, dim=-1)
    expected = -(p * torch.log(p)).sum(dim=-1)
    torch.testing.assert_close(token_entropy(logits).to(F64), expected, rtol=0, atol=1e-5)
    # A uniform distribution over V tokens has entropy log V.
    uniform = torch.zeros(2, 11)
    torch.testing.assert_close(token_entropy(uniform), torch.full((2,), math.log(11)))


# --------------------------------------------------------------------------- importance ratio


def _ratio_inputs():
    g = torch.Generator().manual_seed(3)
    logp = (-torch.rand(3, 4, generator=g, dtype=F64) * 3).requires_grad_()
    old = logp.detach() + torch.randn(3, 4, generator=g, dtype=F64) * 0.3
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    return logp, old, mask


def test_token_level_ratio_is_the_per_token_log_ratio():
    logp, old, mask = _ratio_inputs()
    torch.testing.assert_close(importance_log_ratio(logp, old, mask, "token"), logp - old)


def test_sequence_level_ratio_is_the_length_normalised_mean_log_ratio():
    logp, old, mask = _ratio_inputs()
    out = importance_log_ratio(logp, old, mask, "sequence")
    diff = (logp - old).detach().tolist()
    for i, row in enumerate(mask.tolist()):
        n = int(sum(row))
        expected = sum(diff[i][:n]) / n  # padding (the tail) never enters the mean
        torch.testing.assert_close(out[i].detach(), torch.full((4,), expected, dtype=F64))


@pytest.mark.parametrize("shift", [0.0, 0.05, 0.5, -0.5])
def test_sequence_level_loss_has_the_gradient_of_the_gspo_sequence_objective(shift):
    # GSPO: J = 1/N sum_i min(s_i A_i, clip(s_i, 1-eps_l, 1+eps_h) A_i), s_i = exp(mean_t log rho).
    # grpo_loss with ratio_level="sequence" (GSPO-token with A_it = A_i) must have its gradient.
    logp, old, mask = _ratio_inputs()
    old = old - shift  # shifts every s_i by exp(shift): inside or outside the clip range
    adv = t([1.0, -0.5, 2.0])
    loss, _ = grpo_loss(logp, old, adv, mask, eps_low=0.1, eps_high=0.1, ratio_level="sequence")
    (grad,) = torch.autograd.grad(loss, logp)

    logp_ref = logp.detach().clone().requires_grad_()
    log_s = ((logp_ref - old) * mask).sum(dim=1) / mask.sum(dim=1)
    s = log_s.exp()
    objective_ = torch.minimum(s * adv, s.clamp(0.9, 1.1) * adv).mean()
    (expected,) = torch.autograd.grad(-objective_, logp_ref)

    torch.testing.assert_close(loss, -objective_.detach())
    torch.testing.assert_close(grad * mask, expected)
    assert torch.equal(grad * (1 - mask), torch.zeros_like(grad))


def test_unknown_ratio_level_raises():
    logp, old, mask = _ratio_inputs()
    with pytest.raises(ValueError, match="allowed: token, sequence"):
        importance_log_ratio(logp, old, mask, "chunk")


# --------------------------------------------------------------------------- the loss


def _loss_inputs():
    """N = 4 completions (2 prompts x G = 2) of lengths 3, 1, 4, 2 over T = 4 columns."""
    g = torch.Generator().manual_seed(4)
    logp = (-torch.rand(4, 4, generator=g, dtype=F64) * 3).requires_grad_()
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    adv = group_advantages(t([1.0, 0.0, 0.2, 0.9]), group_size=2)
    ref = logp.detach() + torch.randn(4, 4, generator=g, dtype=F64) * 0.5
    return logp, mask, adv, ref


def test_on_policy_loss_is_minus_mean_advantage_with_gradient_minus_a_over_length():
    logp, mask, adv, _ = _loss_inputs()
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, eps_low=0.2, eps_high=0.28)
    (grad,) = torch.autograd.grad(loss, logp)
    # rho = 1 everywhere, so each sequence contributes 1/|o_i| sum_t A_i = A_i.
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-12)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)  # group-normalised advantages sum to 0
    # d loss / d logp_it = -A_i / (N |o_i|) on real tokens (the mean over N completions), else 0.
    N, lengths = 4, mask.sum(dim=1)
    expected = -(adv / (N * lengths)).unsqueeze(1) * mask
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "estimator, dkl_dlogp",
    [
        ("k1", lambda logp, ref: torch.ones_like(logp)),
        ("k2", lambda logp, ref: logp - ref),
        ("k3", lambda logp, ref: 1.0 - torch.exp(ref - logp)),
    ],
)
def test_kl_penalty_adds_beta_times_the_kl_gradient(estimator, dkl_dlogp):
    logp, mask, adv, ref = _loss_inputs()
    beta = 0.3
    loss, _ = grpo_loss(
        logp,
        logp.detach(),
        adv,
        mask,
        eps_low=0.2,
        eps_high=0.28,
        beta=beta,
        ref_logp=ref,
        kl_estimator=estimator,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    N, lengths = 4, mask.sum(dim=1).unsqueeze(1)
    per_token = -adv.unsqueeze(1) + beta * dkl_dlogp(logp.detach(), ref)
    torch.testing.assert_close(grad, per_token / (N * lengths) * mask, rtol=0, atol=1e-12)


def test_token_mean_gradient_is_minus_a_over_total_tokens():
    logp, mask, adv, _ = _loss_inputs()
    loss, _ = grpo_loss(
        logp, logp.detach(), adv, mask, eps_low=0.2, eps_high=0.28, aggregation="token_mean"
    )
    (grad,) = torch.autograd.grad(loss, logp)
    total = 3 + 1 + 4 + 2
    torch.testing.assert_close(grad, -adv.unsqueeze(1) / total * mask, rtol=0, atol=1e-12)


def test_seq_mean_token_sum_norm_gradient_is_minus_a_over_n_times_max_len():
    logp, mask, adv, _ = _loss_inputs()
    loss, _ = grpo_loss(
        logp,
        logp.detach(),
        adv,
        mask,
        eps_low=0.2,
        eps_high=0.28,
        aggregation="seq_mean_token_sum_norm",
        max_len=8,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -adv.unsqueeze(1) / (4 * 8) * mask, rtol=0, atol=1e-12)


def test_clipped_tokens_get_no_gradient_and_the_others_rho_a():
    # Off-policy (mu > 1): d(-min(rho A, clip(rho) A))/d logp = -rho A where unclipped, 0 where clipped.
    ratios = [[1.5, 1.1, 0.5], [0.5, 1.5, 1.0]]
    logp = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    old = -log_ratios(ratios)  # logp - old = log rho
    adv, mask = t([1.0, -1.0]), t([[1, 1, 1], [1, 1, 0]])
    loss, _ = grpo_loss(logp, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    (grad,) = torch.autograd.grad(loss, logp)
    # row 0 (A=+1, |o|=3): 1.5 clipped; 1.1 and 0.5 unclipped.
    # row 1 (A=-1, |o|=2): 0.5 clipped; 1.5 unclipped; the third token is padding.
    expected = t([[0.0, -1.1 / 3, -0.5 / 3], [0.0, 1.5 / 2, 0.0]]) / 2
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def test_loss_stats_match_hand_values():
    ratios = [[1.5, 1.0, 0.7], [0.5, 1.5, 0.1]]
    logp = torch.log(t([[0.3, 0.2, 0.1], [0.4, 0.25, 0.05]]))
    old = logp - log_ratios(ratios)
    ref = torch.log(t([[0.2, 0.2, 0.3], [0.5, 0.05, 0.9]]))
    entropy = t([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    adv, mask, beta = t([1.0, -1.0]), t([[1, 1, 1], [1, 1, 0]]), 0.1
    loss, stats = grpo_loss(
        logp,
        old,
        adv,
        mask,
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        beta=beta,
        ref_logp=ref,
        entropy=entropy,
    )
    # surrogate per token, clip range [0.8, 1.28]:
    #   row 0 (A=+1): min(1.5, 1.28)=1.28, 1.0, min(0.7, 0.8)=0.7 -> mean 2.98/3
    #   row 1 (A=-1): min(-0.5, -0.8)=-0.8, min(-1.5, -1.28)=-1.5 -> mean -2.3/2
    surrogate = (2.98 / 3 - 2.3 / 2) / 2
    # k3 with pi/ref probabilities: ref/pi - log(ref/pi) - 1
    p = [[0.3, 0.2, 0.1], [0.4, 0.25]]
    q = [[0.2, 0.2, 0.3], [0.5, 0.05]]
    k3 = [[qq / pp - math.log(qq / pp) - 1 for pp, qq in zip(pr, qr)] for pr, qr in zip(p, q)]
    kl_seq = (sum(k3[0]) / 3 + sum(k3[1]) / 2) / 2
    assert stats.surrogate.item() == pytest.approx(surrogate)
    assert stats.loss.item() == pytest.approx(-surrogate + beta * kl_seq)
    assert loss.item() == pytest.approx(-surrogate + beta * kl_seq)
    assert stats.kl.item() == pytest.approx((sum(k3[0]) + sum(k3[1])) / 5)
    assert stats.entropy.item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert stats.clip_low.item() == pytest.approx(1 / 5)
    assert stats.clip_high.item() == pytest.approx(1 / 5)
    assert stats.clip_region.item() == pytest.approx(2 / 5)
    assert stats.ratio_mean.item() == pytest.approx((1.5 + 1.0 + 0.7 + 0.5 + 1.5) / 5)


def test_entropy_bonus_lowers_the_loss_by_coef_times_mean_entropy():
    logp, mask, adv, _ = _loss_inputs()
    entropy = torch.full_like(mask, 2.0)
    base, _ = grpo_loss(logp, logp.detach(), adv, mask, eps_low=0.2, eps_high=0.2)
    bonus, _ = grpo_loss(
        logp,
        logp.detach(),
        adv,
        mask,
        eps_low=0.2,
        eps_high=0.2,
        entropy=entropy,
        entropy_coef=0.01,
    )
    assert (base - bonus).item() == pytest.approx(0.01 * 2.0)


def test_missing_reference_or_entropy_raises():
    logp, mask, adv, _ = _loss_inputs()
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp.detach(), adv, mask, eps_low=0.2, eps_high=0.2, beta=0.1)
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(logp, logp.detach(), adv, mask, eps_low=0.2, eps_high=0.2, entropy_coef=0.1)


# --------------------------------------------------------------------------- KL in the reward


def test_kl_penalised_rewards_subtract_beta_times_summed_real_token_kl():
    rewards = t([1.0, 0.0])
    logp = t([[-1.0, -2.0, 5.0], [-0.5, -0.5, -0.5]], F64).requires_grad_()
    ref = t([[-1.5, -1.0, -50.0], [-1.0, -0.25, 7.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    out_k1 = kl_penalised_rewards(rewards, logp, ref, mask, beta=0.1, estimator="k1")
    # k1 sums: row 0: 0.5 + (-1.0) = -0.5 (padding left out); row 1: 0.5 - 0.25 - 7.5 = -7.25
    torch.testing.assert_close(out_k1, t([1.0 + 0.05, 0.0 + 0.725]))
    assert not out_k1.requires_grad

    def k3(x, y):
        return math.exp(y - x) - (y - x) - 1

    out_k3 = kl_penalised_rewards(rewards, logp, ref, mask, beta=0.1, estimator="k3")
    row0 = k3(-1.0, -1.5) + k3(-2.0, -1.0)
    row1 = k3(-0.5, -1.0) + k3(-0.5, -0.25) + k3(-0.5, 7.0)
    torch.testing.assert_close(out_k3, t([1.0 - 0.1 * row0, -0.1 * row1]))


def test_objective_module_has_no_framework_imports():
    # The math module must stay pure tensor code (STYLE.md): no Lightning, Hydra or I/O.
    source = Path(objective.__file__).read_text()
    for name in ("lightning", "hydra", "mlflow", "transformers"):
        assert f"import {name}" not in source and f"from {name}" not in source


def test_infinite_values_on_padding_never_reach_the_loss():
    """k3 can overflow to inf where pi and pi_ref disagree wildly; on padding that must not turn
    the aggregate into NaN (inf * 0 = NaN)."""
    logp = torch.tensor([[-1.0, -2.0, -1e4]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, 1e4]])
    mask = torch.tensor([[1, 1, 0]])
    kl = kl_k3(logp, ref)
    assert torch.isinf(kl[0, 2])
    for mode in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"):
        value = aggregate(kl, mask, mode, max_len=3)
        assert torch.isfinite(value), mode
    expected = (math.exp(-0.5) + 0.5 - 1.0 + 0.0) / 2
    assert aggregate(kl, mask).item() == pytest.approx(expected)
    assert torch.isfinite(objective.masked_mean(kl, mask))


# Row of 2 real tokens and 1 padding token; the padding holds what a model can produce there:
# log pi_theta = -inf (a masked logit), log pi_old = -inf, log pi_ref = +1e4 (garbage).
PAD_LOGP = [[-1.0, -2.0, -math.inf]]
PAD_OLD = [[-1.0, -2.0, -math.inf]]
PAD_REF = [[-1.5, -2.0, 1e4]]


@pytest.mark.parametrize(
    ("aggregation", "denominator"),
    [("seq_mean_token_mean", 2), ("token_mean", 2), ("seq_mean_token_sum_norm", 3)],
)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_infinite_log_probs_on_padding_give_finite_gradients(aggregation, denominator, ratio_level):
    logp = t(PAD_LOGP).requires_grad_()
    mask = t([[1, 1, 0]])
    loss, stats = grpo_loss(
        logp,
        t(PAD_OLD),
        t([1.0]),
        mask,
        eps_low=0.2,
        eps_high=0.2,
        beta=0.1,
        ref_logp=t(PAD_REF),
        kl_estimator="k3",
        aggregation=aggregation,
        max_len=3,
        ratio_level=ratio_level,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(grad).all(), grad
    # Real tokens: rho = 1 (inside the clip range), so d(-rho A)/dlogp = -A = -1; k3's gradient
    # is 1 - e^(ref - logp): 1 - e^-0.5 on token 0, 0 on token 1; both / the aggregation's
    # denominator. Padding: exactly 0.
    expected = t([[-1.0 + 0.1 * (1 - math.exp(-0.5)), -1.0, 0.0]]) / denominator
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    kl_real = math.exp(-0.5) + 0.5 - 1.0  # k3 on token 0; token 1 agrees with pi_ref
    assert loss.item() == pytest.approx((-2.0 + 0.1 * kl_real) / denominator, abs=1e-12)
    assert stats.ratio_mean.item() == pytest.approx(1.0, abs=1e-12)
    assert stats.kl.item() == pytest.approx(kl_real / 2, abs=1e-12)
    assert stats.clip_region.item() == 0.0


def test_infinite_log_probs_on_padding_leave_the_kl_reward_penalty_finite():
    out = kl_penalised_rewards(t([1.0]), t(PAD_LOGP), t(PAD_REF), t([[1, 1, 0]]), 0.1, "k3")
    # penalty = beta * (k3 on token 0 + 0 on token 1); padding adds nothing
    assert out.item() == pytest.approx(1.0 - 0.1 * (math.exp(-0.5) + 0.5 - 1.0), abs=1e-12)


def test_clip_fractions_ignore_nan_log_ratios_on_padding():
    log_ratio = t([[math.log(1.5), math.nan, math.inf]])
    fr = clip_fractions(log_ratio, t([1.0]), t([[1, 0, 0]]), 0.2, 0.2)
    # one real token, rho 1.5 > 1.2 with A > 0: clipped high; padding counts for nothing
    assert (fr["high"].item(), fr["low"].item(), fr["region"].item()) == (1.0, 0.0, 1.0)
