"""Validation of the composed config before any compute, with errors that say what to fix."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from grpo_lab import schema
from grpo_lab.grpo.batching import Batching
from grpo_lab.grpo.fields import Range as Bound
from grpo_lab.schema import SCHEMAS


class ConfigError(ValueError):
    """One or more config values are out of range; the message lists each key, value and rule."""


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class Rule:
    """A key that is not a bounded number: a predicate and what it allows, in words."""

    ok: Callable[[Any], bool]
    allowed: str

    def __call__(self, value: Any) -> bool:
        return self.ok(value)


def _int(**kw: Any) -> Bound:
    return Bound(integer=True, **kw)


def _num(**kw: Any) -> Bound:
    return Bound(integer=False, **kw)


def _rule(ok: Callable[[Any], bool], allowed: str) -> Rule:
    """A key whose rule is not a range: a predicate and what it allows, in words."""
    return Rule(ok, allowed)


def _choice(*options: str | Enum) -> Rule:
    names = tuple(o.value if isinstance(o, Enum) else o for o in options)
    return _rule(lambda v: v in names, "one of " + ", ".join(names))


# Lightning's precision settings (conf/trainer/*); Hydra reads the short forms as ints.
PRECISIONS = (
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "32",
    "16",
    "64",
)

_BOOL = _rule(lambda v: isinstance(v, bool), "true or false")
_SEED = _int(ge=0, le=2**32 - 1)  # numpy's and Lightning's seed range
_FRACTION = _num(ge=0, le=1)

# key -> its rule. Keys absent from the config are skipped; ``*`` stands for one key level.
# Keys under ``task.`` and ``reward.functions.<name>.`` are checked only for grpo_lab's own
# tasks and rewards: a user's class gives its arguments their own meaning.
RULES: dict[str, Rule | Bound] = {
    # the paper's symbols
    "G": _int(ge=2, why="a group needs two completions to compare"),
    "epsilon": _num(gt=0, lt=1),
    "beta": _num(ge=0, why="0 turns the KL term and the reference model off"),
    "mu": _int(ge=1),
    "seed": _SEED,
    "num_threads": _int(ge=1, nullable=True, why="null = torch's default"),
    "resume": _rule(lambda v: v is None or v == "auto", "null or auto (grpo_lab/resume.py)"),
    # train.*
    "train.rollouts": _int(ge=1),
    "train.prompts_per_step": _int(ge=1),
    "train.minibatch_size": _int(ge=1, nullable=True),
    "train.num_minibatches": _int(ge=1, nullable=True),
    "train.microbatch_size": _int(ge=1, nullable=True),
    # isinstance, not ``in (True, False)``: 1 == True, and 1 would skip the whole-groups check
    "train.shared_prefix": _rule(
        lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"
    ),
    "train.compile": _BOOL,
    "train.lr": _num(gt=0),
    "train.weight_decay": _num(ge=0),
    "train.max_grad_norm": _num(gt=0, nullable=True),
    "train.max_consecutive_skipped_steps": _int(
        ge=1, why="optimizer steps with a non-finite gradient in a row before the run stops"
    ),
    "train.scheduler": _choice(*schema.Scheduler),
    "train.warmup_steps": _int(ge=0),
    "train.eval_every": _int(ge=1),
    "train.eval_size": _int(ge=1),
    "train.eval_batch_size": _int(ge=1),
    "train.checkpoint_every": _int(ge=1, why="last.ckpt is kept as well"),
    "train.log_samples_every": _int(ge=1),
    "train.num_samples_logged": _int(ge=1),
    "train.ref_sync_every": _int(ge=0, why="0 = never refresh the reference"),
    "train.ref_sync_mix": _num(gt=0, le=1, why="1 = hard copy"),
    "train.dynamic_sampling": _BOOL,
    "train.dynamic_sampling_max_tries": _int(ge=1, why="1 = sample once, only log the drop rate"),
    # sft.*
    "sft.enabled": _BOOL,
    "sft.steps": _int(ge=0, why="0 = no warm start"),
    "sft.batch_size": _int(ge=1),
    "sft.lr": _num(gt=0),
    "sft.num_examples": _int(ge=1, nullable=True, why="null = the whole train split"),
    # sampler.*
    "sampler.max_new_tokens": _int(ge=1),
    "sampler.temperature": _num(gt=0),
    "sampler.top_k": _int(ge=0, why="0 = off"),
    "sampler.top_p": _num(gt=0, le=1, why="1 = off"),
    "sampler.min_p": _num(ge=0, lt=1, why="0 = off"),
    # policy.*
    "policy.hidden_size": _int(ge=1),
    "policy.num_layers": _int(ge=1),
    "policy.num_heads": _int(ge=1),
    "policy.intermediate_size": _int(ge=1),
    "policy.max_position_embeddings": _int(ge=1),
    "policy.seed": _SEED,
    "policy.trust_remote_code": _BOOL,
    "policy.model_impl": _choice("auto", "transformers"),
    "policy.use_chat_template": _rule(lambda v: v in ("auto", True, False), "auto, true or false"),
    "policy.lora.enabled": _BOOL,
    "policy.lora.r": _int(ge=1),
    "policy.lora.alpha": _num(gt=0),
    "reward.on_error": _choice(*schema.RewardOnError),
    # task.* of the shipped tasks
    "task.seed": _SEED,
    "task.eval_size": _int(ge=1),
    "task.train_size": _int(ge=1),
    "task.min_operand": _int(ge=0),
    "task.max_operand": _int(ge=0),
    "task.flawed_demo_fraction": _FRACTION,
    "task.num_numbers": _int(ge=2, le=6),
    "task.max_number": _int(ge=2),
    "task.max_target": _int(ge=1),
    "task.use_all": _BOOL,
    "task.trap_fraction": _FRACTION,
    "task.max_int": _int(ge=1),
    "task.max_decimals": _int(ge=1),
    "task.eval_fraction": _num(gt=0, lt=1),
    "task.max_examples": _int(ge=1, nullable=True, why="null = every row"),
    "task.correct_threshold": _num(why="score_answer >= this counts as correct"),
    "task.max_answer_chars": _int(ge=1),
    # reward.* of the shipped rewards
    "reward.weights.*": _num(),
    "reward.functions.length.target": _int(ge=0, why="tokens allowed for free"),
    "reward.functions.length.scale": _num(ge=0),
    "reward.functions.overlong.max_len": _int(
        ge=1, nullable=True, why="null = sampler.max_new_tokens"
    ),
    "reward.functions.overlong.cache": _int(ge=1, nullable=True, why="null = max_len // 5"),
    "reward.functions.math_verify.timeout_s": _num(gt=0, why="seconds per completion"),
    "reward.functions.math_verify.max_chars": _int(ge=1),
    "reward.functions.math_verify.float_rounding": _int(ge=0),
    "reward.functions.math_verify.numeric_precision": _int(ge=1),
    "reward.functions.math_verify.strict": _BOOL,
    "reward.functions.*.max_length": _int(ge=1),
    "reward.functions.*.batch_size": _int(ge=1),
    "reward.functions.*.local_files_only": _BOOL,
    # trainer.* (lightning.Trainer)
    "trainer.devices": _rule(
        lambda v: (_is_int(v) and (v >= 1 or v == -1)) or isinstance(v, str) or _is_list(v),
        "an integer >= 1, -1 (all), auto, or a list of device indices",
    ),
    "trainer.num_nodes": _int(ge=1),
    "trainer.max_steps": _int(ge=1, nullable=True, why="null = derived from train.rollouts"),
    "trainer.max_epochs": _int(ge=1, nullable=True, special=(-1,), why="-1 = no limit"),
    "trainer.log_every_n_steps": _int(ge=1),
    "trainer.num_sanity_val_steps": _int(ge=-1, why="-1 = all"),
    "trainer.precision": _rule(lambda v: str(v) in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
    "trainer.strategy": _rule(
        lambda v: not str(v).startswith("deepspeed") or importlib.util.find_spec("deepspeed"),
        "a strategy whose package is installed (deepspeed needs: pip install deepspeed)",
    ),
    # grpo-lab eval (conf/eval.yaml)
    "eval.size": _int(ge=1, nullable=True, why="null = the run's train.eval_size"),
    "eval.n": _int(ge=1),
    "eval.k": _int(ge=1),
    "eval.batch_size": _int(ge=1, nullable=True, why="null = the run's train.eval_batch_size"),
    "eval.table_rows": _int(ge=1),
    "policy_from_run": _BOOL,
    "sweep.fail_fast": _BOOL,
    "sweep.stop_timeout_s": _num(gt=0, why="seconds a stopped sweep waits for its jobs' saves"),
}

# Keys that were options once and did nothing: key -> why they are gone (a clear error, not a
# silent no-op). Checked on the command line (cli) and in the composed config (validate).
REMOVED: dict[str, str] = {
    "policy.lora.dropout": (
        "LoRA dropout never applied: the policy stays in eval mode so that pi_old, pi_theta and "
        "pi_ref are the same function of the weights (the ratio is 1 at the first inner step), "
        "so dropout is off everywhere; leave the key out"
    ),
}


def _is_list(v: Any) -> bool:
    return OmegaConf.is_list(v) or isinstance(v, list | tuple)


def _get(cfg: Mapping, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key; a ``???`` value counts as absent."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        if isinstance(node, DictConfig) and OmegaConf.is_missing(node, part):
            return False, None
        node = node[part]
    return node != "???", node


def _expand(cfg: Mapping, pattern: str) -> Iterator[str]:
    """The dotted keys of the config that a RULES pattern names (``*`` = any one key level)."""
    head, star, rest = pattern.partition("*")
    if not star:
        if _get(cfg, pattern)[0]:
            yield pattern
        return
    present, node = _get(cfg, head.rstrip(".")) if head else (True, cfg)
    if present and isinstance(node, Mapping):
        for name in node:
            yield from _expand(cfg, f"{head}{name}{rest}")


def _is_ours(cfg: Mapping, key: str) -> bool:
    """False for a key of a user's own task or reward class (its ``_target_`` is not grpo_lab's)."""
    parts = key.split(".")
    if parts[0] == "task":
        part = "task"
    elif parts[:2] == ["reward", "functions"] and len(parts) > 3:
        part = ".".join(parts[:3])
    else:
        return True
    _, target = _get(cfg, f"{part}._target_")
    return isinstance(target, str) and target.startswith("grpo_lab.")


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


@functools.cache
def _structured(group_schema: type) -> DictConfig:
    return OmegaConf.structured(group_schema)


def schema_errors(cfg: Mapping) -> dict[str, str]:
    """Type errors against ``schema.SCHEMAS``: full key -> message (missing/unknown keys too)."""
    errors: dict[str, str] = {}
    for path, (group_schema, strict) in SCHEMAS.items():
        present, node = (True, cfg) if not path else _get(cfg, path)
        if not present or not isinstance(node, Mapping):
            continue
        prefix = f"{path}." if path else ""
        types = get_type_hints(group_schema)
        names = [f.name for f in dataclasses.fields(group_schema)]
        typed = _structured(group_schema)  # its fields check a value on assignment
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
                typed[name] = value  # one key at a time, so each bad key is named
            except OmegaConfBaseException:
                key = prefix + name
                allowed = RULES[key].allowed if key in RULES else _describe(types[name])
                errors[key] = f"{key}={value!r} is invalid: expected {allowed}"
    return errors


# The algorithm's parts: config group -> its dataclass, read from ``_target_`` (``loss`` is one
# class). A part's fields are its keys, with their types and ranges (``grpo.fields``).
PART_GROUPS = ("advantage", "kl", "surrogate", "aggregation", "correction", "loss")


def _part_class(group: str, node: Mapping) -> type | None | str:
    """The dataclass of a part's config node; None for a user's own class (its arguments mean
    what it says); a message when grpo_lab's class cannot be found."""
    if group == "loss":
        from grpo_lab.grpo.loss import LossOptions

        return LossOptions
    target = node.get("_target_")
    if not (isinstance(target, str) and target.startswith("grpo_lab.")):
        return None
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return f"{group}._target_={target!r} is not a class of grpo_lab"
    return cls if dataclasses.is_dataclass(cls) else None


@functools.cache
def _open_structured(part: type) -> DictConfig:
    typed = OmegaConf.structured(part)
    OmegaConf.set_readonly(typed, False)  # the parts are frozen; this copy only checks types
    return typed


def part_errors(cfg: Mapping) -> dict[str, str]:
    """Errors in the algorithm's parts against their dataclasses: unknown or missing keys, wrong
    types, values out of the field's range. full key -> message."""
    from grpo_lab.grpo import fields as part_fields

    errors: dict[str, str] = {}
    for group in PART_GROUPS:
        present, node = _get(cfg, group)
        if not present or not isinstance(node, Mapping):
            continue
        cls = _part_class(group, node)
        if isinstance(cls, str):
            errors[f"{group}._target_"] = cls
            continue
        if cls is None:
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        types = get_type_hints(cls)
        option = f"{group} ({cls.__name__})" if group != "loss" else group
        for key in node:
            if key != "_target_" and key not in fields:
                allowed = ", ".join(fields) or "none"
                errors[f"{group}.{key}"] = (
                    f"{group}.{key} is not a key of {option}; allowed keys: {allowed}"
                )
        typed = _open_structured(cls) if fields else None
        for name, f in fields.items():
            key = f"{group}.{name}"
            rule = part_fields.rule_of(f)
            allowed = rule.allowed if rule is not None else _describe(types[name])
            if name not in node:
                errors[key] = f"{key} is missing: expected {allowed}"
                continue
            try:
                value = node[name]
            except OmegaConfBaseException as err:
                errors[key] = f"{key} cannot be resolved: {err}"
                continue
            # OmegaConf would take "yes" or "on" for true; the config means a YAML boolean
            if types[name] is bool and not isinstance(value, bool):
                errors[key] = f"{key}={value!r} is invalid: expected {allowed}"
                continue
            try:
                typed[name] = value
            except OmegaConfBaseException:
                errors[key] = f"{key}={value!r} is invalid: expected {allowed}"
                continue
            if rule is not None and not rule(value):
                finite = _is_num(value) and not math.isfinite(value)
                errors[key] = (
                    f"{key}={value!r} is invalid: expected "
                    + ("a finite value, " if finite else "")
                    + allowed
                )
    return errors


def rule_errors(cfg: Mapping, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, str]:
    """Range errors against ``RULES`` (and removed keys): full key -> message."""
    errors: dict[str, str] = {}
    for key, why in REMOVED.items():
        if _get(cfg, key)[0]:
            errors[key] = f"{key} is no longer an option: {why}"
    for pattern, rule in RULES.items():
        for key in _expand(cfg, pattern):
            if key in skip or key in errors or not _is_ours(cfg, key):
                continue
            try:
                _, value = _get(cfg, key)
            except OmegaConfBaseException as err:
                errors[key] = f"{key} cannot be resolved: {err}"
                continue
            if not rule(value):
                finite = _is_num(value) and not math.isfinite(value)
                errors[key] = (
                    f"{key}={value!r} is invalid: expected "
                    + ("a finite value, " if finite else "")
                    + rule.allowed
                )
    return errors


# AdamW on float16 weights: its eps=1e-8 is 0 in float16 (the smallest float16 is 6e-8), the
# second moment of small gradients underflows to 0 as well, and the update m / (sqrt(v) + eps)
# becomes inf or NaN. Reproduced on the CPU: the GRPO loss is NaN at rollout 2 with either
# policy.model_impl. Mixed precision keeps float32 weights (and Adam's state) and is fine, and so
# are LoRA adapters, which peft keeps in float32 on a float16 model.
FLOAT16_WHY = (
    "AdamW on float16 weights turns the loss NaN within a few rollouts (its eps=1e-8 is 0 in "
    "float16 and its updates overflow)"
)
FLOAT16_INSTEAD = (
    "use policy.dtype=float32 with trainer.precision=16-mixed on a GPU (float32 weights, "
    "float16 compute), or policy.dtype=bfloat16 (or trainer.precision=bf16-mixed)"
)


def float16_training_errors(cfg: Mapping) -> list[str]:
    """A training config (``grpo-lab train`` and ``sft``) that would train float16 weights.

    ``grpo-lab eval`` trains nothing (its config has no ``train``): float16 is fine there. LoRA
    trains float32 adapters on a float16 model, but the SFT warm start trains the whole model.
    """
    if not _get(cfg, "train")[0]:
        return []
    errors = []
    if _get(cfg, "policy.dtype")[1] == "float16":
        lora = _get(cfg, "policy.lora.enabled")[1] is True
        sft = _get(cfg, "sft.enabled")[1] is True and bool(_get(cfg, "sft.steps")[1])
        if not lora:
            errors.append(
                f"policy.dtype=float16 is invalid for training: {FLOAT16_WHY}; "
                f"{FLOAT16_INSTEAD}. (grpo-lab eval takes policy.dtype=float16, and so does "
                "training LoRA adapters, policy.lora.enabled=true, without the SFT warm start)"
            )
        elif sft:
            errors.append(
                "policy.dtype=float16 with sft.enabled=true is invalid: the SFT warm start "
                f"trains the whole model, not the LoRA adapters, and {FLOAT16_WHY}; set "
                f"sft.enabled=false, or {FLOAT16_INSTEAD}"
            )
    if str(_get(cfg, "trainer.precision")[1]) == "16-true":
        errors.append(
            "trainer.precision=16-true is invalid for training: it casts the weights to "
            f"float16, and {FLOAT16_WHY}; {FLOAT16_INSTEAD}"
        )
    return errors


def cross_errors(cfg: Mapping) -> list[str]:
    """Checks that involve two keys, each already valid on its own."""
    errors = []

    def value(key: str) -> Any:
        return _get(cfg, key)[1]

    B, G = value("train.prompts_per_step"), value("G")
    if _is_int(B) and _is_int(G):
        errors += Batching(
            B=B,
            G=G,
            minibatch_size=value("train.minibatch_size"),
            num_minibatches=value("train.num_minibatches"),
            microbatch_size=value("train.microbatch_size"),
            shared_prefix=value("train.shared_prefix"),
        ).errors()
    strategy, clip = str(value("trainer.strategy")), value("train.max_grad_norm")
    if strategy.startswith("fsdp") and clip is not None:
        errors.append(
            f"train.max_grad_norm={clip} is invalid with trainer.strategy={strategy}: Lightning's "
            "FSDP precision plugin cannot clip by norm in manual optimization; set "
            "train.max_grad_norm=null (untested on GPUs here)"
        )
    if strategy.startswith("deepspeed"):
        errors.append(
            f"trainer.strategy={strategy} is not supported yet: ZeRO keeps gradients in its own "
            "partitioned buffers, while the GRPO step clips and checks for non-finite gradients "
            "on p.grad, so both would silently do nothing; use trainer=ddp or trainer=fsdp"
        )
    lora, every = value("policy.lora.enabled"), value("train.ref_sync_every")
    beta = value("kl.beta")
    kl_on = value("kl.estimator") != "none" and _is_num(beta) and beta > 0
    if lora is True and kl_on and _is_int(every) and every > 0:
        errors.append(
            f"train.ref_sync_every={every} is invalid with policy.lora.enabled=true: with LoRA "
            "the reference is the frozen base model (adapters disabled), so there is no separate "
            "reference to refresh; set train.ref_sync_every=0"
        )
    width, heads = value("policy.hidden_size"), value("policy.num_heads")
    if _is_int(width) and _is_int(heads) and width % heads:
        errors.append(
            f"policy.hidden_size={width} is invalid: it must be a multiple of "
            f"policy.num_heads={heads} (each head gets hidden_size / num_heads dimensions)"
        )
    lo, hi = value("task.min_operand"), value("task.max_operand")
    if _is_int(lo) and _is_int(hi) and hi < lo and _is_ours(cfg, "task.max_operand"):
        errors.append(f"task.max_operand={hi} is invalid: it must be >= task.min_operand={lo}")
    n, k = value("eval.n"), value("eval.k")
    if _is_int(n) and _is_int(k) and k > n:
        errors.append(f"eval.k={k} is invalid: expected 1 <= eval.k <= eval.n (eval.n={n})")
    if _get(cfg, "reward.functions.overlong")[0] and _is_ours(
        cfg, "reward.functions.overlong.cache"
    ):
        max_len = value("reward.functions.overlong.max_len") or value("sampler.max_new_tokens")
        cache = value("reward.functions.overlong.cache")
        if _is_int(max_len) and _is_int(cache) and cache > max_len:
            errors.append(
                f"reward.functions.overlong.cache={cache} is invalid: it must be <= max_len "
                f"(L_max = {max_len})"
            )
    errors += float16_training_errors(cfg)
    for key in ("ckpt_path", "ckpt"):
        path = value(key)
        if isinstance(path, str) and path and not Path(path).is_file():
            errors.append(
                f"{key}={path!r} does not exist; give a .ckpt written by a run, e.g. "
                "outputs/<date>/<time>-<id>/checkpoints/last.ckpt"
            )
    return errors


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every bad key, its value and what is allowed.

    First the values left ``???``, the types (``schema.SCHEMAS``: wrong type, option outside the
    allowed ones), the algorithm's parts against their dataclasses (``part_errors``: unknown or
    missing keys, types and ranges), and the ranges (``RULES``) of keys that typed correctly; then the checks across keys (``cross_errors``) once every key is
    right on its own.
    """
    errors = [
        f"{key} is missing: it has no default, give one ({key}=...)"
        for key in sorted(OmegaConf.missing_keys(cfg))
    ]
    try:  # resolved once into plain dicts: many times faster to read than key by key
        view: Mapping = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException:
        view = cfg  # an interpolation that fails: read key by key, naming the key
    typed, parts = schema_errors(view), part_errors(view)
    errors += [
        *typed.values(),
        *rule_errors(view, skip=set(typed) | set(parts)).values(),
        *parts.values(),  # after the top-level keys: epsilon=2 before surrogate.epsilon_low=2
    ]
    if not errors:
        errors = cross_errors(view)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def removed_override_errors(overrides: list[str]) -> list[str]:
    """Command-line overrides of a ``REMOVED`` key (``policy.lora.dropout=0.1``): what to say.

    Checked before Hydra composes, which would otherwise only say the key is not in the config.
    """
    errors = []
    for arg in overrides:
        key = arg.lstrip("+~").split("=", 1)[0]
        if key in REMOVED:
            errors.append(f"{key} is no longer an option: {REMOVED[key]}")
    return errors


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
