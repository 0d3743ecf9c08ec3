"""surrogate=sapo: a temperature-controlled sigmoid gate instead of the hard clip (SAPO)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lab.grpo.surrogates import SAPO
from one_step import ADV, RHO, fixed_rollout, grads, module, one_step, reference_grads


def gate(rho: float, tau: float) -> float:
    return 4.0 / tau / (1.0 + math.exp(-tau * (rho - 1.0)))


def test_sapo_gate_by_hand_with_a_temperature_per_advantage_sign():
    # rho = 2 with A = +1 (tau 1): 4 sigmoid(1) = 2.9242; rho = 0.5 with A = -2 (tau 2):
    # -2 * 2 sigmoid(-1) = -1.0758
    logp = torch.log(torch.tensor([[0.5], [0.2]], dtype=torch.float64)).requires_grad_()
    old = torch.log(torch.tensor([[0.25], [0.4]], dtype=torch.float64))
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    objective, _ = SAPO(tau_pos=1.0, tau_neg=2.0)(logp, old, adv, torch.ones(2, 1))
    want = torch.tensor([[gate(2.0, 1.0)], [-2.0 * gate(0.5, 2.0)]], dtype=torch.float64)
    torch.testing.assert_close(objective, want, check_dtype=False)
    assert want[0, 0].item() == pytest.approx(2.9242, abs=1e-4)
    # d/dlogp = A * 4 sigmoid'(tau (rho - 1)) * rho: slope 1 at rho = 1, less away from it
    objective.sum().backward()
    s1, s2 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))
    expected = torch.tensor([[4 * s1 * (1 - s1) * 2.0], [-2.0 * 4 * s2 * (1 - s2) * 0.5]])
    torch.testing.assert_close(logp.grad, expected.double())


def test_sapo_slope_at_rho_one_is_the_policy_gradient():
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    objective, _ = SAPO()(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([1.5]), None)
    objective.sum().backward()
    assert logp.grad.item() == pytest.approx(1.5)  # A * d rho / d logp at rho = 1


def test_sapo_temperatures_must_be_positive_before_compute():
    from grpo_lab.config import ConfigError

    with pytest.raises(ConfigError, match=r"surrogate.tau_neg=0 is invalid"):
        module("surrogate=sapo", "surrogate.tau_neg=0")


def test_one_sapo_step_gives_the_gated_gradient_and_not_ppo_clips():
    tau_pos, tau_neg = 1.0, 1.05
    sapo = module("surrogate=sapo")
    ppo = module()
    rollout = fixed_rollout(sapo, off_policy=True)

    def sapo_formula(i, logp, entropy):
        a = ADV[i]
        tau = tau_pos if a > 0 else tau_neg
        rho = torch.tensor(RHO[i], dtype=torch.float64) * torch.exp(logp - logp.detach())
        return -(torch.sigmoid(tau * (rho - 1.0)) * 4.0 / tau * a)

    want = reference_grads(sapo, rollout.completions, sapo_formula)
    metrics = one_step(sapo, rollout)
    torch.testing.assert_close(grads(sapo), want, rtol=1e-4, atol=1e-6)
    one_step(ppo, fixed_rollout(ppo, off_policy=True))
    assert not torch.allclose(grads(ppo), want, rtol=1e-2, atol=1e-4)
    assert metrics["clip_ratio/region_mean"] == 0.0  # a gate clips nothing
