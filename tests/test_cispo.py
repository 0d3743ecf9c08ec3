"""surrogate=cispo: the clipped, detached importance weight times A log pi (MiniMax-M1)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lab.grpo.surrogates import CISPO
from one_step import ADV, LENGTHS, RHO, fixed_rollout, grads, module, one_step, reference_grads


def test_cispo_weight_is_the_ratio_clipped_to_absolute_bounds_and_detached():
    # rho = [2, 0.5, 1.2]: 2 is capped at 1.5, 0.5 raised to 0.8, 1.2 kept
    old = torch.log(torch.tensor([[0.25, 0.4, 0.5]], dtype=torch.float64))
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.6]], dtype=torch.float64)).requires_grad_()
    mask = torch.ones(1, 3)
    objective, log_ratio = CISPO(min_weight=0.8, max_weight=1.5)(
        logp, old, torch.tensor([-2.0], dtype=torch.float64), mask
    )
    w = torch.tensor([1.5, 0.8, 1.2], dtype=torch.float64)
    torch.testing.assert_close(objective, (-2.0 * w * logp).detach())
    objective.sum().backward()
    torch.testing.assert_close(logp.grad, -2.0 * w.unsqueeze(0))  # d/dlogp of sg(w) A logp
    torch.testing.assert_close(log_ratio.exp().detach(), torch.tensor([[2.0, 0.5, 1.2]]).double())


def test_cispo_clip_fractions_count_weights_clipped_on_each_side():
    log_ratio = torch.log(torch.tensor([[2.0, 0.5, 1.2, 9.0]]))
    mask = torch.tensor([[1, 1, 1, 0]])
    fr = CISPO(min_weight=0.8, max_weight=1.5).clip_fractions(log_ratio, torch.ones(1), mask)
    assert (fr["low"].item(), fr["high"].item()) == pytest.approx((1 / 3, 1 / 3))
    assert fr["region"].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("bad", ["surrogate.max_weight=1", "surrogate.min_weight=-0.1"])
def test_cispo_bounds_out_of_range_fail_before_compute(bad):
    from grpo_lab.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        module("surrogate=cispo", bad)


def test_one_cispo_step_gives_the_formulas_gradient_and_not_ppo_clips():
    """On an off-policy rollout (rho from RHO), CISPO keeps the gradient of the tokens PPO's clip
    drops: every token contributes -clip(rho, 0, 1.3) * A * grad log pi."""
    cap = 1.3
    cispo = module("surrogate=cispo", f"surrogate.max_weight={cap}")
    ppo = module()  # the default surrogate, same seed, same weights
    rollout = fixed_rollout(cispo, off_policy=True)

    def cispo_formula(i, logp, entropy):
        w = torch.tensor([min(r, cap) for r in RHO[i]], dtype=torch.float64)
        return -(w * ADV[i] * logp)

    want = reference_grads(cispo, rollout.completions, cispo_formula)
    metrics = one_step(cispo, rollout)
    torch.testing.assert_close(grads(cispo), want, rtol=1e-4, atol=1e-6)
    one_step(ppo, fixed_rollout(ppo, off_policy=True))
    assert not torch.allclose(grads(ppo), want, rtol=1e-2, atol=1e-4)  # the default differs
    # rho above the cap: 1.5 (row 0), 5.0 (row 2); no lower bound
    high = sum(r > cap for row in RHO for r in row) / sum(LENGTHS)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(high, abs=1e-6)
    assert math.isfinite(metrics["loss"])
