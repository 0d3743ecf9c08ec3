"""loss.top_entropy_quantile: only the rollout's highest-entropy tokens get the policy gradient
(Wang et al. 2025, "Beyond the 80/20 rule"), the threshold taken over the whole rollout batch."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_lab.grpo.loss import LossOptions
from one_step import ADV, G, fixed_rollout, grads, module, one_step, reference_grads, reference_rows

ENTROPY = torch.tensor([[0.1, 0.9, 0.5], [0.7, 5.0, 5.0]])  # the 5.0s are padding
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_the_threshold_is_the_quantile_over_every_real_token():
    # real entropies 0.1, 0.5, 0.7, 0.9: the 0.5 quantile interpolates to 0.6 -> keep 0.9, 0.7
    keep, stats = LossOptions(top_entropy_quantile=0.5).select_tokens(ENTROPY, MASK)
    assert keep.tolist() == [[False, True, False], [True, False, False]]
    assert stats["entropy/threshold"] == pytest.approx(0.6)
    assert stats["entropy/selected_fraction"] == pytest.approx(0.5)


def test_quantile_one_selects_nothing_and_needs_no_entropy():
    options = LossOptions()
    assert not options.needs_old_entropy
    assert options.select_tokens(None, MASK) == (None, {})


def _rank_threshold(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = ENTROPY[rank : rank + 1], MASK[rank : rank + 1]  # each rank holds one completion
        _, stats = LossOptions(top_entropy_quantile=0.5).select_tokens(*rows)
        out[rank] = stats["entropy/threshold"]
    finally:
        dist.destroy_process_group()


@pytest.mark.xdist_group("processes")
def test_two_processes_take_the_threshold_over_both_ranks_tokens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank_threshold, args=(port, out), nprocs=2)
    # one process alone: rank 0's own tokens give 0.5; together they give 0.6, as one process
    assert dict(out) == {0: pytest.approx(0.6), 1: pytest.approx(0.6)}


def peaked(m):
    """A sharper policy than the random init (whose next-token entropies are all ~ln V), so the
    tokens' entropies differ clearly. The first token of every completion shares the prompt's
    distribution: 4 equal entropies, which the quantile below stays away from."""
    with torch.no_grad():
        m.policy.lm_head.weight.mul_(8)
    return m


def test_one_step_gives_the_policy_gradient_to_the_selected_tokens_only():
    rho_q = 0.15
    selecting = peaked(module(f"loss.top_entropy_quantile={rho_q}", "train.microbatch_size=2"))
    plain = peaked(module())
    sample = fixed_rollout(selecting, off_policy=False)
    # the rollout's advantages: the group z-score of the rewards ADV (population std, eps 1e-6)
    a = np.array(ADV)
    adv = (a - a.mean()) / (a.std() + 1e-6)
    entropies = [e.detach() for _, e in reference_rows(selecting.policy, sample.completions)]
    threshold = np.quantile(torch.cat(entropies).numpy(), 1 - rho_q)
    assert (torch.cat(entropies) - threshold).abs().min() > 1e-2  # no token on the threshold

    def per_row(i, logp, entropy):
        keep = (entropies[i] >= threshold).double()
        return -(keep * torch.exp(logp - logp.detach()) * adv[i])

    want = reference_grads(selecting, sample.completions, per_row)
    metrics = one_step(selecting, sample=sample)
    torch.testing.assert_close(grads(selecting), want, rtol=1e-4, atol=1e-6)
    kept = sum(int((e >= threshold).sum()) for e in entropies) / sum(len(e) for e in entropies)
    assert metrics["entropy/selected_fraction"] == pytest.approx(kept)
    assert 0 < kept < 1
    one_step(plain, sample=fixed_rollout(plain, off_policy=False))
    assert not torch.allclose(grads(plain), want, rtol=1e-2, atol=1e-4)


def test_the_micro_batch_size_does_not_change_which_tokens_are_kept():
    whole = peaked(module("loss.top_entropy_quantile=0.15"))
    split = peaked(module("loss.top_entropy_quantile=0.15", "train.microbatch_size=1"))
    one_step(whole, sample=fixed_rollout(whole, off_policy=False))
    one_step(split, sample=fixed_rollout(split, off_policy=False))
    torch.testing.assert_close(grads(split), grads(whole), rtol=1e-5, atol=1e-7)
    assert G == 4


def test_a_rollout_of_more_tokens_than_torch_quantile_takes():
    # torch.quantile refuses more than 2**24 values; a large rollout on all ranks has more
    n = 2**24 + 3
    entropy = torch.arange(n, dtype=torch.float32).flip(0).unsqueeze(0) / n  # (1, n)
    mask = torch.ones(1, n, dtype=torch.bool)
    keep, stats = LossOptions(top_entropy_quantile=0.25).select_tokens(entropy, mask)
    want = np.quantile(np.arange(n, dtype=np.float64) / n, 0.75)
    assert stats["entropy/threshold"] == pytest.approx(want, rel=1e-6)
    assert stats["entropy/selected_fraction"] == pytest.approx(0.25, abs=1e-6)
