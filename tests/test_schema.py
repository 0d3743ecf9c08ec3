"""Typed schemas and range rules: a bad config fails before compute, naming key, value, allowed."""

from __future__ import annotations

import dataclasses
import functools
from fnmatch import fnmatch
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import get_class
from mlflow import MlflowClient
from omegaconf import DictConfig, ListConfig, OmegaConf

from grpo_lab.config import PART_GROUPS, ConfigError, validate
from grpo_lab.grpo.advantages import RLOO, BatchStd, GroupMean, GroupZScore
from grpo_lab.grpo.aggregation import SeqMeanTokenSumNorm, TokenMean
from grpo_lab.grpo.batching import Batching
from grpo_lab.grpo.corrections import NoCorrection
from grpo_lab.grpo.fields import Range, rule_of
from grpo_lab.grpo.kl import KL
from grpo_lab.grpo.loss import LossOptions
from grpo_lab.grpo.step import Algorithm
from grpo_lab.grpo.surrogates import GSPO, PPOClip
from grpo_lab.paths import config_dir
from helpers import compose

CONF = config_dir()
# The algorithm's part groups (``loss`` is a plain node): every option file of each, so an option
# added to conf/ is checked here without editing this file.
PART_OPTION_GROUPS = [g for g in PART_GROUPS if g != "loss"]
GROUP_OPTIONS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml")) for group in PART_OPTION_GROUPS
}


def cfg_of(*overrides: str) -> DictConfig:
    return compose(*overrides, check=False)


def errors_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate(cfg_of(*overrides))
    return str(err.value)


def test_each_part_group_has_the_options_the_paper_recipes_need():
    # at least these; a new option file joins the checks below by itself
    needed = {
        "kl": {"k1", "k2", "k3", "none"},
        "advantage": {"batch_std", "group", "group_mean", "rloo"},
        "surrogate": {"gspo", "ppo_clip"},
        "aggregation": {"seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean"},
        "correction": {"none"},
    }
    assert set(GROUP_OPTIONS) == set(needed)
    for group, options in needed.items():
        assert options <= set(GROUP_OPTIONS[group]), group
    assert not (CONF / "loss").exists()  # the old loss group is a plain node now


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g, opts in GROUP_OPTIONS.items() for o in opts]
)
def test_every_option_opens_with_its_formula_and_validates(override):
    group, option = override.split("=")
    text = (CONF / group / f"{option}.yaml").read_text()
    assert text.startswith("# ")
    if not (group == "correction" and option == "none"):  # no correction: nothing to write
        assert "=" in text.splitlines()[0]  # a formula on line one
    assert "_target_: grpo_lab.grpo." in text  # a part: its class's fields are its keys
    validate(cfg_of(override))


@pytest.mark.parametrize(
    ("overrides", "attr", "expected"),
    [
        (["kl=k1"], "kl", KL("k1", 0.0, "loss")),
        (["kl=k2", "kl.mode=reward"], "kl", KL("k2", 0.0, "reward")),
        (["kl=k2", "kl.mode=reward", "beta=0.1"], "kl.loss_beta", 0.0),  # in the reward
        (["kl=k2", "kl.mode=reward", "beta=0.1"], "kl.in_reward", True),
        (["kl=none", "beta=0.1"], "kl", KL("none", 0.1, "loss")),
        (["kl=none", "beta=0.1"], "kl.loss_beta", 0.0),  # kl=none ignores beta ...
        (["kl=none", "beta=0.1"], "kl.active", False),  # ... and builds no reference
        (["kl=k3", "beta=0.1"], "kl", KL("k3", 0.1, "loss")),
        (["kl=k3", "beta=0.1"], "kl.loss_beta", 0.1),
        (["kl=k3", "kl.beta=0.2"], "kl.beta", 0.2),
        (["advantage=group"], "advantage", GroupZScore(eps=1e-6, unbiased_std=False)),
        (["advantage=group_mean"], "advantage", GroupMean()),
        (["advantage=batch_std"], "advantage", BatchStd()),
        (["advantage=rloo"], "advantage", RLOO()),
        (["advantage.unbiased_std=true"], "advantage", GroupZScore(unbiased_std=True)),
        (["advantage=batch_std", "advantage.eps=0.01"], "advantage", BatchStd(eps=0.01)),
        (["aggregation=token_mean"], "aggregation", TokenMean()),
        (["aggregation=seq_mean_token_sum_norm"], "aggregation", SeqMeanTokenSumNorm(max_len=6)),
        (
            ["aggregation=seq_mean_token_sum_norm", "sampler.max_new_tokens=9"],
            "aggregation",
            SeqMeanTokenSumNorm(max_len=9),  # L_max follows the sampler's budget
        ),
        (["surrogate=ppo_clip"], "surrogate", PPOClip(0.2, 0.2, None)),
        (["epsilon=0.3"], "surrogate", PPOClip(0.3, 0.3)),  # epsilon_low/high follow ${epsilon}
        (["surrogate.epsilon_high=0.28"], "surrogate", PPOClip(0.2, 0.28)),
        (["surrogate.dual_clip=3"], "surrogate", PPOClip(0.2, 0.2, 3.0)),
        (["surrogate=gspo"], "surrogate", GSPO(3e-4, 4e-4)),  # the paper's range, not epsilon
        (["surrogate=gspo", "epsilon=0.3"], "surrogate", GSPO(3e-4, 4e-4)),
        (
            ["surrogate=gspo", "surrogate.epsilon_low=0.2", "surrogate.epsilon_high=0.2"],
            "surrogate.ratio_level",
            "sequence",
        ),
        (["correction=none"], "correction", NoCorrection()),
        (["loss.entropy_coef=0.01"], "loss", LossOptions(entropy_coef=0.01)),
        (["loss.mask_truncated=true"], "loss", LossOptions(mask_truncated=True)),
        (["G=4", "mu=2"], "mu", 2),
        (
            ["G=4", "train.prompts_per_step=4", "train.minibatch_size=8"],
            "batching",
            Batching(B=4, G=4, minibatch_size=8),
        ),
    ],
)
def test_each_option_builds_its_part_with_its_values(overrides, attr, expected):
    got = Algorithm.from_config(compose(*overrides))  # validated, then built as the module does
    for name in attr.split("."):
        got = getattr(got, name)
    assert got == expected
    assert type(got) is type(expected)  # GSPO is a PPOClip subclass: the class must match too


def test_train_knobs_reach_the_module():
    from grpo_lab.policy import tiny_llama
    from helpers import module_of

    module = module_of(
        "train.ref_sync_mix=0.5",
        "train.dynamic_sampling=true",
        "train.dynamic_sampling_max_tries=2",
        "seed=3",
        policy=tiny_llama(hidden_size=32, intermediate_size=64),
    )
    assert module.train_cfg.ref_sync_mix == 0.5
    ds = module.dynamic_sampling
    assert (ds.enabled, ds.max_tries, ds.seed) == (True, 2, 3)


def test_wrong_types_are_named_with_value_and_what_is_allowed():
    msg = errors_of("G=abc", "surrogate.dual_clip=foo", "loss.mask_truncated=yes", "mu=1.5")
    assert "G='abc' is invalid: expected an integer >= 2" in msg
    assert "surrogate.dual_clip='foo' is invalid: expected null or a number > 1" in msg
    assert "loss.mask_truncated='yes' is invalid: expected true or false" in msg
    assert "mu=1.5 is invalid: expected an integer >= 1" in msg
    assert msg.count("\n  ") == 4  # one line per bad key, nothing else flagged


def test_option_outside_an_enum_lists_the_allowed_ones():
    msg = errors_of("kl.estimator=k4", "kl.mode=both", "train.scheduler=cos")
    assert "kl.estimator='k4' is invalid: expected one of k1, k2, k3, none" in msg
    assert "kl.mode='both' is invalid: expected one of loss, reward" in msg
    assert "train.scheduler='cos' is invalid: expected one of constant, cosine, linear" in msg


def test_unknown_and_missing_keys_of_a_group_are_rejected():
    msg = errors_of("+surrogate.eps_high=0.3", "+loss.epsilon_low=0.1", "~kl.mode")
    assert (
        "surrogate.eps_high is not a key of surrogate (PPOClip); allowed keys: epsilon_low, "
        "epsilon_high, dual_clip" in msg
    )
    # the surrogate's knobs left the loss node: it names what it has now
    assert (
        "loss.epsilon_low is not a key of loss; allowed keys: entropy_coef, mask_truncated" in msg
    )
    assert "kl.mode is missing: expected one of loss, reward" in msg


def test_an_option_without_fields_takes_no_keys():
    msg = errors_of("advantage=rloo", "+advantage.eps=0.1")
    assert "advantage.eps is not a key of advantage (RLOO); allowed keys: none" in msg


def test_a_target_that_is_not_a_class_of_grpo_lab_is_named():
    msg = errors_of("surrogate._target_=grpo_lab.grpo.surrogates.Nope")
    assert "surrogate._target_='grpo_lab.grpo.surrogates.Nope' is not a class of grpo_lab" in msg


def test_a_bad_interpolated_value_is_reported_where_it_lands():
    msg = errors_of("epsilon=wide")
    assert "epsilon='wide' is invalid" in msg
    assert "surrogate.epsilon_low='wide' is invalid: expected a number in (0, 1)" in msg


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("train.ref_sync_mix=0", "a number in (0, 1]"),
        ("train.ref_sync_mix=1.5", "a number in (0, 1]"),
        ("train.ref_sync_every=-1", "an integer >= 0"),
        ("train.dynamic_sampling_max_tries=0", "an integer >= 1"),
        ("train.dynamic_sampling=maybe", "true or false"),
        ("advantage.eps=0", "a number > 0"),
        ("surrogate.dual_clip=0.5", "null or a number > 1"),
        ("kl.beta=-1", "a number >= 0"),
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
    proc = run_cli("train", "surrogate=nope", check=False, timeout=60)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Could not find 'surrogate/nope'" in out
    listed = out.split("Available options in 'surrogate':", 1)[1].split()
    assert sorted(listed[: len(GROUP_OPTIONS["surrogate"])]) == GROUP_OPTIONS["surrogate"]


@pytest.mark.slow
def test_the_cli_rewrites_an_old_name_and_says_so(run_cli):
    # `loss=<aggregation>` from before the parts: rewritten to aggregation=..., with a note; an
    # unknown option then lists the aggregation group's options
    proc = run_cli("train", "loss=nope", check=False, timeout=60)
    assert proc.returncode != 0
    assert "[grpo-lab] note: loss=nope is now aggregation=nope" in proc.stderr
    out = proc.stdout + proc.stderr
    assert "Could not find 'aggregation/nope'" in out
    listed = out.split("Available options in 'aggregation':", 1)[1].split()
    assert sorted(listed[: len(GROUP_OPTIONS["aggregation"])]) == GROUP_OPTIONS["aggregation"]


@pytest.mark.slow
def test_cli_rejects_bad_values_before_any_compute(run_cli, tracking_uri, tmp_path):
    proc = run_cli("train", "G=abc", "surrogate.dual_clip=foo", check=False, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("invalid config:\n"), proc.stderr[-3000:]
    assert "G='abc' is invalid" in proc.stderr
    assert "surrogate.dual_clip='foo' is invalid" in proc.stderr
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
    for group in ("policy", "task", "reward", "sampler", "trainer", "logger", *PART_OPTION_GROUPS)
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
    "task.name",  # task=hf: the dataset's config name
    "task.data_files",
    "task.revision",
    "task.config",
    "task.datasets",
}


@functools.cache
def compose_shipped(name: str, overrides: tuple[str, ...]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides))


def part_rule(cfg: DictConfig, key: str):
    """The range of a part's field (``grpo.fields``) when ``key`` is one (``surrogate.epsilon_low``),
    else None: a part's dataclass is its schema, so its numeric fields need no RULES entry."""
    group, _, name = key.partition(".")
    if group not in PART_GROUPS or "." in name:
        return None
    cls = LossOptions if group == "loss" else get_class(cfg[group]._target_)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return rule_of(fields[name]) if name in fields else None


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
        cfg = compose_shipped(name, overrides)
        for key, value in leaves(cfg):
            if not is_numeric_or_null(value) or key in NOT_NUMERIC_NULLABLE:
                continue
            if part_rule(cfg, key) is not None:
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
    return [v for v in bad if v not in getattr(bound, "special", ())]


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
    checks = []  # (key, its rule): RULES' bounds, then the parts' field ranges
    for pattern, rule in RULES.items():
        if not isinstance(rule, Bound):
            continue
        keys = [k for k in where if fnmatch(k, pattern)]
        assert keys, f"{pattern} is in no shipped config"
        checks += [(key, rule) for key in keys]
    part_keys = [(key, part_rule(where[key], key)) for key in where]
    part_keys = [(key, rule) for key, rule in part_keys if isinstance(rule, Range)]
    assert {"advantage.eps", "kl.beta", "surrogate.epsilon_low", "aggregation.max_len"} <= {
        key for key, _ in part_keys
    }
    checks += part_keys
    problems = []
    for key, rule in checks:
        if True:
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
        cfg = hydra_compose("eval", overrides=["ckpt=x.ckpt", "eval.n=4", "eval.k=8"])
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
    return cfg_of(*overrides)


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
        "kl.beta=inf",
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
    validate(_composed("surrogate.epsilon_high=inf"))
