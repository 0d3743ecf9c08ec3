"""grpo.batching.Batching: how a rollout of B*G completions is cut into mini-batches (one optimizer
step each) and micro-batches (one forward/backward each), when the prompt is shared per group,
the order rows are visited in, and what the config check says about bad sizes."""

from __future__ import annotations

import pytest
import torch

from grpo_lab.config import ConfigError
from grpo_lab.grpo.batching import Batching
from grpo_lab.train import optimizer_steps
from helpers import compose

# --------------------------------------------------------------------------- sizes


def test_num_minibatches_splits_the_rollout_into_that_many_steps():
    b = Batching(B=16, G=8, num_minibatches=4)
    assert b.rollout_size == 128
    assert b.minibatch() == 32  # completions per optimizer step
    assert b.microbatch() == 32  # one forward per mini-batch when no microbatch_size
    assert b.steps_per_rollout(mu=1) == 4
    assert b.steps_per_rollout(mu=2) == 8  # mu passes x mini-batches
    assert b.errors() == []


def test_minibatch_size_gives_the_same_cut_as_its_count():
    b = Batching(B=16, G=8, minibatch_size=32, microbatch_size=8)
    assert (b.minibatch(), b.microbatch(), b.steps_per_rollout(1)) == (32, 8, 4)
    assert b.errors() == []


def test_without_settings_the_whole_rollout_is_one_step():
    b = Batching(B=16, G=8)
    assert (b.minibatch(), b.microbatch(), b.steps_per_rollout(1)) == (128, 128, 1)


def test_sizes_follow_the_rollout_actually_passed():
    # a rollout of n rows (another B than the config's): num_minibatches still cuts it in parts
    b = Batching(B=16, G=8, num_minibatches=4)
    assert (b.minibatch(16), b.steps_per_rollout(1, 16)) == (4, 4)
    # a fixed minibatch_size does not change with n; a last partial mini-batch still counts
    b = Batching(B=16, G=8, minibatch_size=32)
    assert (b.minibatch(48), b.steps_per_rollout(1, 48)) == (32, 2)
    assert b.microbatch(48) == 32


def test_from_config_reads_train_and_G():
    cfg = compose(
        "G=4", "train.prompts_per_step=6", "train.num_minibatches=3", "train.microbatch_size=4"
    )
    b = Batching.from_config(cfg)
    assert b == Batching(
        B=6, G=4, minibatch_size=None, num_minibatches=3, microbatch_size=4, shared_prefix="auto"
    )
    assert optimizer_steps(cfg) == cfg.train.rollouts * 3


# --------------------------------------------------------------------------- shared prefix


@pytest.mark.parametrize(
    ("settings", "shared"),
    [
        (dict(), True),  # the whole rollout: whole groups
        (dict(num_minibatches=4), True),  # 32 = 4 groups of 8
        (dict(minibatch_size=32, microbatch_size=8), True),  # micro-batches of one group
        (dict(minibatch_size=32, microbatch_size=4), False),  # half groups
        (dict(minibatch_size=4), False),
        (dict(num_minibatches=32), False),  # mini-batches of 4
    ],
)
def test_shared_prefix_auto_is_on_exactly_when_every_batch_holds_whole_groups(settings, shared):
    assert Batching(B=16, G=8, **settings).shared is shared


@pytest.mark.parametrize("value", [True, False])
def test_shared_prefix_true_or_false_is_taken_as_given(value):
    assert Batching(B=16, G=8, shared_prefix=value).shared is value
    assert Batching(B=16, G=8, minibatch_size=4, shared_prefix=value).shared is value


# --------------------------------------------------------------------------- order


def test_order_without_shuffle_is_the_rows_in_order():
    assert Batching(B=4, G=4).order(16, shuffle=False).tolist() == list(range(16))


def test_shuffled_order_keeps_each_group_together_with_the_shared_prefix():
    b = Batching(B=16, G=8, num_minibatches=4)
    assert b.shared
    torch.manual_seed(0)
    order = b.order(128, shuffle=True)
    assert sorted(order.tolist()) == list(range(128))  # a permutation of the rows
    groups = order.view(16, 8)  # each run of G rows is one whole group, in order
    assert (groups == groups[:, :1] + torch.arange(8)).all()
    assert (groups[:, 0] % 8 == 0).all()
    assert groups[:, 0].tolist() != list(range(0, 128, 8))  # the groups were shuffled
    # so every mini-batch (32) holds whole groups: each of its groups with all its G rows
    for mini in order.split(b.minibatch()):
        counts = torch.bincount(mini // 8)
        assert set(counts[counts > 0].tolist()) == {8}


def test_shuffled_order_without_the_shared_prefix_mixes_rows_of_groups():
    b = Batching(B=16, G=8, minibatch_size=4, shared_prefix=False)
    torch.manual_seed(0)
    order = b.order(128, shuffle=True)
    assert sorted(order.tolist()) == list(range(128))
    groups = order.view(16, 8) // 8
    assert not (groups == groups[:, :1]).all()  # rows of different groups share a run


# --------------------------------------------------------------------------- errors


def test_errors_name_both_keys_when_both_are_set():
    (msg,) = Batching(B=16, G=8, minibatch_size=32, num_minibatches=4).errors()
    assert msg == (
        "train.num_minibatches=4 and train.minibatch_size=32 are both set: give one of them "
        "and set the other to null"
    )


def test_errors_say_what_a_minibatch_size_must_divide_and_what_would():
    (msg,) = Batching(B=3, G=4, minibatch_size=5).errors()
    assert msg == (
        "train.minibatch_size=5 is invalid: it must divide the rollout batch "
        "train.prompts_per_step * G = 3 * 4 = 12 (e.g. 1, 2, 3, 4, 6, 12)"
    )
    (msg,) = Batching(B=3, G=4, num_minibatches=5).errors()
    assert msg.startswith("train.num_minibatches=5 is invalid: it must divide the rollout batch")


def test_errors_say_what_a_microbatch_size_must_divide():
    (msg,) = Batching(B=2, G=4, num_minibatches=2, microbatch_size=3).errors()
    assert msg == (
        "train.microbatch_size=3 is invalid: it must divide the mini-batch of 4 completions "
        "(e.g. 1, 2, 4)"
    )


def test_shared_prefix_true_with_partial_groups_names_each_size():
    errors = Batching(B=3, G=4, minibatch_size=6, microbatch_size=3, shared_prefix=True).errors()
    assert errors == [
        f"train.{key} is invalid with train.shared_prefix=true: completions per batch must be "
        "a multiple of G=4 (whole groups); or set train.shared_prefix=false"
        for key in ("minibatch_size=6", "microbatch_size=3")
    ]
    (msg,) = Batching(B=4, G=4, num_minibatches=8, shared_prefix=True).errors()
    assert msg.startswith("train.num_minibatches=8 (mini-batches of 2) is invalid with")
    # auto and false take partial groups
    assert Batching(B=3, G=4, minibatch_size=6).errors() == []
    assert Batching(B=3, G=4, minibatch_size=6, shared_prefix=False).errors() == []


# --------------------------------------------------------------------------- the config check


@pytest.mark.parametrize(("value", "ok"), [("auto", True), ("false", True), ("true", False)])
def test_shared_prefix_true_needs_whole_groups_in_the_config_check(value, ok):
    overrides = ["train.prompts_per_step=3", "G=4", "train.minibatch_size=6"]
    if ok:
        compose(*overrides, f"train.shared_prefix={value}")  # validates
        return
    with pytest.raises(ConfigError, match=r"train.minibatch_size=6 is invalid with train.shared"):
        compose(*overrides, f"train.shared_prefix={value}")


@pytest.mark.parametrize("value", ["1", "0", "1.0"])
def test_train_shared_prefix_takes_only_auto_true_or_false(value):
    """train.shared_prefix=1 passed the check (1 == True in Python) and then skipped the
    whole-groups check, which asks ``is True``: with mini-batches of partial groups the run
    did its SFT warm start and first rollout, then crashed in the update (the shared prefix
    read 1 as true). Now 1, 0 and 1.0 are config errors naming the key."""
    with pytest.raises(ConfigError) as err:
        compose(
            "train.prompts_per_step=3",
            "G=4",
            "train.minibatch_size=6",  # one and a half groups
            f"train.shared_prefix={value}",
        )
    assert f"train.shared_prefix={value} is invalid: expected auto, true or false" in str(err.value)
