"""Typed schemas and range rules: a bad config fails before compute, naming key, value, allowed."""

from __future__ import annotations

import functools
from fnmatch import fnmatch
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import DictConfig, ListConfig, OmegaConf

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
    assert "loss.epsilon_low='wide' is invalid: expected a number in (0, 1)" in msg


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
    assert proc.returncode == 2
    assert proc.stderr.startswith("invalid config:\n"), proc.stderr[-3000:]
    assert "G='abc' is invalid" in proc.stderr and "loss.dual_clip='foo' is invalid" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    # nothing was started: no MLflow experiment/run, no checkpoint folder
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    assert exp is None or not client.search_runs([exp.experiment_id])
    assert not list(Path(tmp_path).rglob("checkpoints"))


# ----------------------------------------------------------------- every numeric key has a bound

# Every option of every group, and the eval command's config: what the walks below compose.
SHIPPED = [("config", ())]
SHIPPED += [
    ("config", (f"{group}={path.stem}",))
    for group in ("policy", "task", "reward", "sampler", "trainer", "logger")
    for path in sorted((CONF / group).glob("*.yaml"))
]
SHIPPED += [("eval", ())]

# Keys whose default is null and that hold a string, a path or a list when set: no bound needed.
NOT_NUMERIC_NULLABLE = {
    "ckpt_path",
    "run_id",
    "paths.output_dir",
    "logger.run_name",
    "policy.init_from",
    "policy.attn_implementation",
    "sampler.stop_strings",
    "reward.functions.format.pattern",
    "task.eval_path",
    "task.demonstration_field",
    "task.system_prompt",
    "task.answer_pattern",
    "task.config",
    "task.datasets",
}


@functools.cache
def compose_shipped(name: str, overrides: tuple[str, ...]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def leaves(node, prefix: str = ""):
    """(dotted key, resolved value) of every scalar leaf; ``???`` (mandatory) values skipped."""
    for key in node:
        if OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            yield from leaves(value, f"{prefix}{key}.")
        elif not isinstance(value, ListConfig):
            yield f"{prefix}{key}", value


def is_numeric_or_null(value) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def test_every_numeric_key_of_the_shipped_configs_has_a_rule():
    """A new numeric key without a bound fails here (train.log_samples_every=0 once slipped
    through to a ZeroDivisionError after the SFT warm start)."""
    from grpo_lab.config import RULES

    unchecked: dict[str, str] = {}  # key -> the first config it is in
    for name, overrides in SHIPPED:
        for key, value in leaves(compose_shipped(name, overrides)):
            if not is_numeric_or_null(value) or key in NOT_NUMERIC_NULLABLE:
                continue
            if not any(fnmatch(key, pattern) for pattern in RULES):
                unchecked.setdefault(key, f"{name} {' '.join(overrides)}")
    assert not unchecked, "numeric keys without a rule in config.RULES:\n" + "\n".join(
        f"{key} ({where})" for key, where in sorted(unchecked.items())
    )


def bad_values(bound) -> list:
    """Values just outside a bound, worked out here from its limits (not from its predicate)."""
    bad: list = ["abc", True]
    lower = bound.ge if bound.ge is not None else bound.gt
    if bound.ge is not None:
        bad.append(bound.ge - 1)
    if bound.gt is not None:
        bad.append(bound.gt)
    if bound.le is not None:
        bad.append(bound.le + 1)
    if bound.lt is not None:
        bad.append(bound.lt)
    if bound.integer:
        bad.append((lower or 0) + 1.5)  # inside the range, but not an integer
    if not bound.nullable:
        bad.append(None)
    return [v for v in bad if v not in bound.special]


def edge_values(bound) -> list:
    """The closed ends of a bound: allowed."""
    return [v for v in (bound.ge, bound.le) if v is not None]


def test_every_bound_rejects_values_just_outside_it_naming_key_value_and_what_is_allowed():
    from grpo_lab.config import RULES, Bound

    where = {}  # each key of the shipped configs -> the first config that has it
    for name, overrides in SHIPPED:
        cfg = compose_shipped(name, overrides)
        for key, _ in leaves(cfg):
            where.setdefault(key, cfg)
    problems = []
    for pattern, rule in RULES.items():
        if not isinstance(rule, Bound):
            continue
        keys = [k for k in where if fnmatch(k, pattern)]
        assert keys, f"{pattern} is in no shipped config"
        for key in keys:
            for value, allowed in [(v, False) for v in bad_values(rule)] + [
                (v, True) for v in edge_values(rule)
            ]:
                cfg = where[key].copy()
                OmegaConf.update(cfg, key, value, merge=False)
                line = f"{key}={value!r} is invalid: expected {rule.allowed}"
                try:
                    validate(cfg)
                    message = ""
                except ConfigError as err:
                    message = str(err)
                if allowed and line in message:
                    problems.append(f"{key}={value!r} (the edge) was rejected: {message}")
                if not allowed and line not in message:
                    problems.append(f"{key}={value!r}: no line {line!r} in {message!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        # each of these passed the check and failed (or did nothing) after the SFT warm start
        (
            "train.log_samples_every=0",
            "train.log_samples_every=0 is invalid: expected an integer >= 1",
        ),
        ("train.checkpoint_every=-5", "train.checkpoint_every=-5 is invalid: expected an integer"),
        ("train.eval_batch_size=0", "train.eval_batch_size=0 is invalid: expected an integer >= 1"),
        ("sft.batch_size=0", "sft.batch_size=0 is invalid: expected an integer >= 1"),
        ("sft.lr=-1", "sft.lr=-1 is invalid: expected a number > 0"),
        ("policy.hidden_size=0", "policy.hidden_size=0 is invalid: expected an integer >= 1"),
        ("trainer.max_steps=-1", "trainer.max_steps=-1 is invalid: expected null or an integer"),
        ("reward.weights.format=abc", "reward.weights.format='abc' is invalid: expected a number"),
        (
            "task.flawed_demo_fraction=2",
            "task.flawed_demo_fraction=2 is invalid: expected a number",
        ),
    ],
)
def test_keys_that_slipped_through_are_checked_now(override, line):
    assert line in errors_of(override)


def test_policy_hidden_size_must_split_into_the_heads():
    msg = errors_of("policy.hidden_size=130")  # 130 / 4 heads is not whole
    assert "policy.hidden_size=130 is invalid: it must be a multiple of policy.num_heads=4" in msg


def test_arithmetic_operand_range_is_checked_before_compute():
    msg = errors_of("task.min_operand=50", "task.max_operand=10")
    assert "task.max_operand=10 is invalid: it must be >= task.min_operand=50" in msg


def test_eval_k_above_n_is_a_config_error():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=["ckpt=x.ckpt", "eval.n=4", "eval.k=8"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "eval.k=8 is invalid: expected 1 <= eval.k <= eval.n (eval.n=4)" in str(err.value)


def test_a_users_own_task_is_not_held_to_the_shipped_tasks_bounds():
    # task=custom: its keys mean what the user's class says, so eval_size=0 is the class's business
    validate(cfg_of("task=custom", "task._target_=my.Task", "+task.eval_size=0"))


def test_lora_dropout_is_a_clear_error_not_a_silent_no_op():
    # The policy stays in eval mode (pi_old == pi_theta), so LoRA dropout never applied.
    msg = errors_of("+policy.lora.dropout=0.1")
    assert "policy.lora.dropout is no longer an option: LoRA dropout never applied" in msg
    assert "dropout" not in OmegaConf.to_yaml(cfg_of("policy=pretrained", "policy.name_or_path=x"))


def test_lora_dropout_from_an_older_runs_config_loads_only_as_zero():
    from grpo_lab.policy import tiny_llama

    old = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj"]}
    tiny_llama(hidden_size=32, intermediate_size=64, lora={**old, "dropout": 0.0})
    with pytest.raises(ValueError, match=r"policy.lora.dropout=0.1 is not supported"):
        tiny_llama(hidden_size=32, intermediate_size=64, lora={**old, "dropout": 0.1})


def _composed(*overrides: str) -> DictConfig:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_lora_with_reference_refresh_is_a_config_error_before_compute():
    # With LoRA the reference is the base model with the adapters off: nothing to refresh.
    # This used to pass the check and fail in GRPOModule after the SFT warm start.
    with pytest.raises(ConfigError, match=r"train.ref_sync_every=2 is invalid with policy.lora"):
        validate(_composed("policy.lora.enabled=true", "train.ref_sync_every=2", "beta=0.04"))
    validate(_composed("policy.lora.enabled=true", "train.ref_sync_every=2", "beta=0"))
    validate(_composed("policy.lora.enabled=true", "train.ref_sync_every=2", "kl=none"))


@pytest.mark.parametrize(
    "override",
    [
        "reward.weights.accuracy=nan",
        "reward.weights.accuracy=inf",
        "train.lr=inf",
        "sft.lr=inf",
        "beta=inf",
        "advantage.eps=inf",
        "loss.entropy_coef=inf",
        "train.lr=nan",
    ],
)
def test_non_finite_numbers_are_rejected_before_compute(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        validate(_composed(override))
    assert f"{key}={float(value)!r} is invalid: expected a finite value" in str(err.value)


def test_an_infinite_upper_clip_is_allowed():
    validate(_composed("loss.epsilon_high=inf"))
