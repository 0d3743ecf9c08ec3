"""correction=tis|mis: importance weights pi_old / q on the policy-gradient term (q: the
sampler's distribution), truncated (TIS) or masked (MIS), per token or per completion."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lab.grpo.corrections import MIS, TIS
from one_step import (
    ADV,
    LENGTHS,
    OLD_OVER_Q,
    fixed_rollout,
    grads,
    module,
    one_step,
    reference_grads,
)


def weights(part):
    """pi_old / q = [1.8, 0.5, 4] on a completion of 3 tokens, [1.5] on one of 1 (then padding)."""
    old = torch.log(torch.tensor([[0.36, 0.2, 0.8], [0.3, 0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.2, 0.4, 0.2], [0.2, 0.9, 0.9]])) * torch.tensor(
        [[1, 1, 1], [1, 0, 0]]
    )
    return part(old, q, torch.tensor([[1, 1, 1], [1, 0, 0]]))


def test_tis_truncates_each_token_ratio_at_the_cap():
    w, stats = weights(TIS(cap=2.0))
    torch.testing.assert_close(w[0], torch.tensor([1.8, 0.5, 2.0]))  # 4 -> 2
    assert w[1, 0].item() == pytest.approx(1.5)
    assert stats["sampling/importance_sampling_ratio/clipped_fraction"].item() == pytest.approx(
        1 / 4
    )
    assert stats["sampling/importance_sampling_ratio/mean"].item() == pytest.approx(
        (1.8 + 0.5 + 2 + 1.5) / 4
    )


def test_mis_masks_each_token_above_the_cap_and_keeps_the_ratio_below_it():
    w, stats = weights(MIS(cap=3.0, level="token"))
    torch.testing.assert_close(w[0], torch.tensor([1.8, 0.5, 0.0]))
    assert stats["sampling/importance_sampling_ratio/masked_fraction"].item() == pytest.approx(
        1 / 4
    )


def test_sequence_level_uses_the_product_or_the_geometric_mean_of_the_ratios():
    # row 0: product 1.8 * 0.5 * 4 = 3.6, geometric mean 3.6^(1/3); row 1: 1.5
    w, _ = weights(TIS(cap=10.0, level="sequence"))
    torch.testing.assert_close(w[0], torch.full((3,), 3.6))
    w, _ = weights(TIS(cap=10.0, level="sequence", sequence_ratio="geometric_mean"))
    torch.testing.assert_close(w[0], torch.full((3,), 3.6 ** (1 / 3)))
    w, _ = weights(MIS(cap=3.0))  # TRL's default: sequence mask at 3
    torch.testing.assert_close(w[0], torch.zeros(3))  # 3.6 > 3: the whole completion masked
    assert w[1, 0].item() == pytest.approx(1.5)


def test_a_huge_ratio_gives_a_finite_weight():
    old, q = torch.zeros(1, 2), torch.tensor([[-400.0, -400.0]])  # ratio e^800 per token
    for part in (TIS(level="sequence"), MIS(level="sequence"), TIS(), MIS(level="token")):
        w, _ = part(old, q, torch.ones(1, 2))
        assert torch.isfinite(w).all()


def test_a_correction_without_the_samplers_log_probs_says_what_to_do():
    with pytest.raises(ValueError, match="sampling_logp"):
        TIS()(torch.zeros(1, 2), None, torch.ones(1, 2))


def correction_formula(w_rows):
    def per_row(i, logp, entropy):  # on-policy: rho = 1 in value, pi_theta/pi_old in gradient
        rho = torch.exp(logp - logp.detach())
        return -(torch.tensor(w_rows[i], dtype=torch.float64) * rho * ADV[i])

    return per_row


@pytest.mark.parametrize(
    ("overrides", "w_rows", "capped"),
    [
        # TIS, token level, cap 2 (verl's): every ratio above 2 (4, 3.5, 2.2) truncated to 2
        (
            ["correction=tis"],
            [[min(r, 2.0) for r in row] for row in OLD_OVER_Q],
            ("clipped_fraction", sum(r > 2 for row in OLD_OVER_Q for r in row)),
        ),
        # MIS, sequence level, product, cap 3 (TRL's): products 0.5, 2.28, 3.6, 5.93
        (
            ["correction=mis"],
            [[math.prod(row) if math.prod(row) <= 3 else 0.0] * len(row) for row in OLD_OVER_Q],
            ("masked_fraction", LENGTHS[2] + LENGTHS[3]),
        ),
    ],
)
def test_one_corrected_step_weighs_each_tokens_policy_gradient(overrides, w_rows, capped):
    corrected, plain = module(*overrides), module()
    rollout = fixed_rollout(corrected, off_policy=False, with_q=True)
    want = reference_grads(corrected, rollout.completions, correction_formula(w_rows))
    metrics = one_step(corrected, rollout)
    torch.testing.assert_close(grads(corrected), want, rtol=1e-4, atol=1e-6)
    one_step(plain, fixed_rollout(plain, off_policy=False, with_q=True))
    assert not torch.allclose(grads(plain), want, rtol=1e-2, atol=1e-4)  # no correction differs
    name, count = capped
    assert metrics[f"sampling/importance_sampling_ratio/{name}"] == pytest.approx(
        count / sum(LENGTHS), abs=1e-6
    )
    mean_w = sum(sum(row) for row in w_rows) / sum(LENGTHS)
    assert metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(mean_w, rel=1e-4)
