"""Validation of the composed config before any compute, with errors that say what to fix."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from enum import Enum
from typing import Any, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from grpo_lab import schema
from grpo_lab.schema import SCHEMAS


class ConfigError(ValueError):
    """One or more config values are out of range; the message lists each key, value and rule."""


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _rule(pred: Callable[[Any], bool], allowed: str) -> tuple[Callable[[Any], bool], str]:
    return pred, allowed


def _choice(*options: str | Enum) -> tuple[Callable[[Any], bool], str]:
    names = tuple(o.value if isinstance(o, Enum) else o for o in options)
    return (lambda v: v in names), "one of " + ", ".join(names)


# key -> (predicate, what is allowed). Keys absent from the config are skipped.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "G": _rule(
        lambda v: _is_int(v) and v >= 2,
        "an integer >= 2 (a group needs two completions to compare)",
    ),
    "epsilon": _rule(lambda v: _is_num(v) and 0 < v < 1, "a number with 0 < epsilon < 1"),
    "beta": _rule(
        lambda v: _is_num(v) and v >= 0,
        "a number >= 0 (0 turns the KL term and the reference model off)",
    ),
    "mu": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "seed": _rule(_is_int, "an integer"),
    "loss.epsilon_low": _rule(
        lambda v: _is_num(v) and 0 < v < 1, "a number with 0 < epsilon_low < 1"
    ),
    "loss.epsilon_high": _rule(lambda v: _is_num(v) and v > 0, "a number > 0"),
    "loss.aggregation": _choice(*schema.Aggregation),
    "loss.ratio_level": _choice(*schema.RatioLevel),
    "loss.dual_clip": _rule(lambda v: v is None or (_is_num(v) and v > 1), "null or a number > 1"),
    "loss.entropy_coef": _rule(_is_num, "a number"),
    "loss.mask_truncated": _rule(lambda v: isinstance(v, bool), "true or false"),
    "kl.estimator": _choice(*schema.KLEstimator),
    "kl.mode": _choice(*schema.KLMode),
    "advantage.scale": _choice(*schema.AdvantageScale),
    "advantage.eps": _rule(lambda v: _is_num(v) and v > 0, "a number > 0"),
    "advantage.unbiased_std": _rule(lambda v: isinstance(v, bool), "true or false"),
    "train.rollouts": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.prompts_per_step": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.minibatch_size": _rule(
        lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"
    ),
    "train.num_minibatches": _rule(
        lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"
    ),
    "train.microbatch_size": _rule(
        lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"
    ),
    "train.lr": _rule(lambda v: _is_num(v) and v > 0, "a number > 0"),
    "train.weight_decay": _rule(lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "train.max_grad_norm": _rule(
        lambda v: v is None or (_is_num(v) and v > 0), "null or a number > 0"
    ),
    "train.max_consecutive_skipped_steps": _rule(
        lambda v: _is_int(v) and v >= 1,
        "an integer >= 1 (optimizer steps with a non-finite gradient in a row before the run stops)",
    ),
    "train.scheduler": _choice(*schema.Scheduler),
    "train.warmup_steps": _rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "train.eval_every": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.eval_size": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.ref_sync_every": _rule(
        lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = never refresh the reference)"
    ),
    "train.ref_sync_mix": _rule(
        lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1] (1 = hard copy)"
    ),
    "train.dynamic_sampling": _rule(lambda v: isinstance(v, bool), "true or false"),
    "train.dynamic_sampling_max_tries": _rule(
        lambda v: _is_int(v) and v >= 1, "an integer >= 1 (1 = sample once, only log the drop rate)"
    ),
    "sampler.max_new_tokens": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "sampler.temperature": _rule(lambda v: _is_num(v) and v > 0, "a number > 0"),
    "sampler.top_k": _rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "sampler.top_p": _rule(lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "sampler.min_p": _rule(lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1) (0 = off)"),
    "policy.use_chat_template": _rule(lambda v: v in ("auto", True, False), "auto, true or false"),
    "policy.lora.enabled": _rule(lambda v: isinstance(v, bool), "true or false"),
    "policy.lora.r": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "policy.lora.alpha": _rule(lambda v: _is_num(v) and v > 0, "a number > 0"),
    "policy.lora.dropout": _rule(lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "sft.steps": _rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
}


def _get(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _describe(tp: Any) -> str:
    """What a schema field's type allows, in words."""
    if get_origin(tp) is Union:
        inner = [a for a in get_args(tp) if a is not type(None)]
        return "null or " + _describe(inner[0])
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(m.value for m in tp)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def schema_errors(cfg: DictConfig) -> dict[str, str]:
    """Type errors against ``schema.SCHEMAS``: full key -> message (missing/unknown keys too)."""
    errors: dict[str, str] = {}
    for path, (group_schema, strict) in SCHEMAS.items():
        present, node = (True, cfg) if not path else _get(cfg, path)
        if not present or not isinstance(node, DictConfig):
            continue
        prefix = f"{path}." if path else ""
        types = get_type_hints(group_schema)
        names = [f.name for f in dataclasses.fields(group_schema)]
        if strict:
            for key in node:
                if key not in types:
                    errors[prefix + str(key)] = (
                        f"{prefix}{key} is not a key of {path}; allowed keys: {', '.join(names)}"
                    )
            for name in names:
                if name not in node:
                    errors[prefix + name] = (
                        f"{prefix}{name} is missing: expected {_describe(types[name])}"
                    )
        for name in names:
            if name not in node or prefix + name in errors:
                continue
            try:
                value = node[name]  # resolves interpolations such as ${epsilon}
            except OmegaConfBaseException as err:
                errors[prefix + name] = f"{prefix}{name} cannot be resolved: {err}"
                continue
            try:
                # One key at a time, so each bad key is named; the others stay MISSING.
                OmegaConf.merge(OmegaConf.structured(group_schema), {name: value})
            except OmegaConfBaseException:
                key = prefix + name
                allowed = RULES[key][1] if key in RULES else _describe(types[name])
                errors[key] = f"{key}={value!r} is invalid: expected {allowed}"
    return errors


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every bad key, its value and what is allowed.

    First the types (``schema.SCHEMAS``: wrong type, option outside the allowed ones, missing or
    unknown key of kl/advantage/loss), then the ranges (``RULES``) of keys that typed correctly.
    """
    typed = schema_errors(cfg)
    errors = list(typed.values())
    for key, (ok, allowed) in RULES.items():
        if key in typed:
            continue
        present, value = _get(cfg, key)
        if present and not ok(value):
            errors.append(f"{key}={value!r} is invalid: expected {allowed}")
    _, B = _get(cfg, "train.prompts_per_step")
    _, G = _get(cfg, "G")
    _, mini = _get(cfg, "train.minibatch_size")
    _, micro = _get(cfg, "train.microbatch_size")
    _, parts = _get(cfg, "train.num_minibatches")
    if not errors and _is_int(B) and _is_int(G):
        n = B * G
        if mini is not None and parts is not None:
            errors.append(
                f"train.num_minibatches={parts} and train.minibatch_size={mini} are both set: "
                "give one of them and set the other to null"
            )
        if mini is not None and n % mini:
            errors.append(
                f"train.minibatch_size={mini} is invalid: it must divide the rollout batch "
                f"train.prompts_per_step * G = {B} * {G} = {n} (e.g. {_divisors(n)})"
            )
        if parts is not None and n % parts:
            errors.append(
                f"train.num_minibatches={parts} is invalid: it must divide the rollout batch "
                f"train.prompts_per_step * G = {B} * {G} = {n} (e.g. {_divisors(n)})"
            )
        step = mini or (n // parts if parts and not n % parts else n)
        if micro is not None and step % micro:
            errors.append(
                f"train.microbatch_size={micro} is invalid: it must divide the mini-batch of "
                f"{step} completions (e.g. {_divisors(step)})"
            )
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
