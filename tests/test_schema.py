"""Typed schemas and range rules: a bad config fails before compute, naming key, value, allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from grpo_lab.config import ConfigError, validate
from grpo_lab.paths import config_dir
from grpo_lab.train import algo_config

CONF = config_dir()
GROUP_OPTIONS = {
    "kl": ["k1", "k2", "k3", "none"],
    "advantage": ["batch_std", "group", "group_mean", "rloo"],
    "loss": ["seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean"],
}


def cfg_of(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def errors_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate(cfg_of(*overrides))
    return str(err.value)


def test_each_group_has_exactly_the_documented_options():
    for group, options in GROUP_OPTIONS.items():
        assert sorted(p.stem for p in (CONF / group).glob("*.yaml")) == options


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g, opts in GROUP_OPTIONS.items() for o in opts]
)
def test_every_option_opens_with_its_formula_and_validates(override):
    group, option = override.split("=")
    text = (CONF / group / f"{option}.yaml").read_text()
    assert text.startswith("# ") and "=" in text.splitlines()[0]  # a formula on line one
    validate(cfg_of(override))


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        (["kl=k1"], "kl_estimator", "k1"),
        (["kl=k2", "kl.mode=reward"], "kl_mode", "reward"),
        (["kl=none", "beta=0.1"], "beta", 0.0),
        (["kl=k3", "beta=0.1"], "beta", 0.1),
        (["advantage=group_mean"], "advantage_scale", "none"),
        (["advantage=batch_std"], "advantage_scale", "batch_std"),
        (["advantage=rloo"], "advantage_scale", "rloo"),
        (["advantage.unbiased_std=true"], "unbiased_std", True),
        (["loss=token_mean"], "aggregation", "token_mean"),
        (["loss=seq_mean_token_sum_norm"], "aggregation", "seq_mean_token_sum_norm"),
        (["epsilon=0.3"], "epsilon_high", 0.3),  # epsilon_low/high follow ${epsilon}
        (["loss.epsilon_high=0.28"], "epsilon_high", 0.28),
        (["loss.ratio_level=sequence"], "ratio_level", "sequence"),
        (["loss.dual_clip=3"], "dual_clip", 3),
        (["loss.entropy_coef=0.01"], "entropy_coef", 0.01),
        (["loss.mask_truncated=true"], "mask_truncated", True),
        (["train.ref_sync_mix=0.5"], "ref_sync_mix", 0.5),
        (["train.dynamic_sampling=true"], "dynamic_sampling", True),
    ],
)
def test_algo_config_maps_each_option_to_the_module(overrides, field, expected):
    assert getattr(algo_config(cfg_of(*overrides)), field) == expected


def test_wrong_types_are_named_with_value_and_what_is_allowed():
    msg = errors_of("G=abc", "loss.dual_clip=foo", "loss.mask_truncated=yes", "mu=1.5")
    assert "G='abc' is invalid: expected an integer >= 2" in msg
    assert "loss.dual_clip='foo' is invalid: expected null or a number > 1" in msg
    assert "loss.mask_truncated='yes' is invalid: expected true or false" in msg
    assert "mu=1.5 is invalid: expected an integer >= 1" in msg
    assert msg.count("\n  ") == 4  # one line per bad key, nothing else flagged


def test_option_outside_an_enum_lists_the_allowed_ones():
    msg = errors_of("kl.estimator=k4", "advantage.scale=zscore", "train.scheduler=cos")
    assert "kl.estimator='k4' is invalid: expected one of k1, k2, k3, none" in msg
    assert (
        "advantage.scale='zscore' is invalid: expected one of group_std, batch_std, none, rloo"
        in msg
    )
    assert "train.scheduler='cos' is invalid: expected one of constant, cosine, linear" in msg


def test_unknown_and_missing_keys_of_a_group_are_rejected():
    msg = errors_of("+loss.eps_high=0.3", "~kl.mode")
    assert "loss.eps_high is not a key of loss; allowed keys: aggregation, epsilon_low, " in msg
    assert "kl.mode is missing: expected one of loss, reward" in msg


def test_a_bad_interpolated_value_is_reported_where_it_lands():
    msg = errors_of("epsilon=wide")
    assert "epsilon='wide' is invalid" in msg
    assert "loss.epsilon_low='wide' is invalid: expected a number with 0 < epsilon_low < 1" in msg


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("train.ref_sync_mix=0", "a number in (0, 1]"),
        ("train.ref_sync_mix=1.5", "a number in (0, 1]"),
        ("train.ref_sync_every=-1", "an integer >= 0"),
        ("train.dynamic_sampling_max_tries=0", "an integer >= 1"),
        ("train.dynamic_sampling=maybe", "true or false"),
        ("advantage.eps=0", "a number > 0"),
        ("loss.dual_clip=0.5", "null or a number > 1"),
        ("G=1", "an integer >= 2"),
    ],
)
def test_out_of_range_values_fail(override, allowed):
    key, value = override.split("=")
    msg = errors_of(override)
    assert f"{key}=" in msg and value in msg and allowed in msg


@pytest.mark.parametrize(
    "override", ["train.ref_sync_mix=1.0", "train.ref_sync_mix=0.01", "train.ref_sync_every=0"]
)
def test_values_on_the_edge_of_a_range_pass(override):
    validate(cfg_of(override))


@pytest.mark.slow
def test_unknown_group_option_is_rejected_by_the_cli_with_the_available_ones(run_cli):
    proc = run_cli("train", "loss=nope", check=False, timeout=60)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Could not find 'loss/nope'" in out
    listed = out.split("Available options in 'loss':", 1)[1].split()[:3]
    assert sorted(listed) == GROUP_OPTIONS["loss"]


@pytest.mark.slow
def test_cli_rejects_bad_values_before_any_compute(run_cli, tracking_uri, tmp_path):
    proc = run_cli("train", "G=abc", "loss.dual_clip=foo", check=False, timeout=60)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "ConfigError" in out
    assert "G='abc' is invalid" in out and "loss.dual_clip='foo' is invalid" in out
    # nothing was started: no MLflow experiment/run, no checkpoint folder
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    assert exp is None or not client.search_runs([exp.experiment_id])
    assert not list(Path(tmp_path).rglob("checkpoints"))
