"""Every option of every config group composes, validates and builds (as lightning-hydra-template's
test_configs): one case per yaml file, found on disk, so a new option is tested without editing
this file. A node with a ``_target_`` is instantiated where that is cheap; what needs the hub, a
GPU or an extra is composed and validated only, and the skip says why."""

from __future__ import annotations

import dataclasses
import functools

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from grpo_lab.config import ConfigError, validate
from grpo_lab.grpo.step import Algorithm
from grpo_lab.instantiate import instantiate
from grpo_lab.paths import config_dir
from grpo_lab.train import build_rewards
from helpers import compose

CONF = config_dir()
PART_GROUPS = ("advantage", "kl", "surrogate", "aggregation", "correction")
GROUPS = (
    *PART_GROUPS,
    "policy",
    "task",
    "reward",
    "sampler",
    "trainer",
    "logger",
    "experiment",
)
CASES = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
GPU_CASES = {("trainer", "gpu")}  # built where a CUDA device is present (the gpu marker)
PARAMS = [
    pytest.param(g, o, id=f"{g}={o}", marks=[pytest.mark.gpu] if (g, o) in GPU_CASES else [])
    for g, o in CASES
]

# Options that need a value no default can give (a user's path or class), and a cheap stand-in.
FILL_IN = {
    ("task", "jsonl"): lambda tmp: [f"task.path={_jsonl(tmp)}"],
    ("task", "custom"): lambda tmp: ["task._target_=grpo_lab.tasks.ArithmeticTask"],
    # a JSON file read by datasets' load_dataset("json", data_files=...)
    ("task", "hf"): lambda tmp: [
        "task.path=json",
        f"task.data_files={_jsonl(tmp)}",
        "task.prompt_field=prompt",
        "task.answer_field=answer",
        "task.answer_extraction=none",
    ],
    ("reward", "custom"): lambda tmp: [
        "reward.functions.custom._target_=grpo_lab.rewards.accuracy_reward"
    ],
    # not instantiated (NOT_BUILT): a name is enough to validate
    ("policy", "pretrained"): lambda tmp: ["policy.name_or_path=some/model"],
    ("reward", "model"): lambda tmp: ["reward.functions.model.model=some/model"],
    ("reward", "embedding"): lambda tmp: ["reward.functions.embedding.model=some/model"],
}
# Options composed and validated but not instantiated, and why.
NOT_BUILT = {
    ("policy", "pretrained"): "loads a model from the hub or a directory (test_pretrained_policy)",
    ("reward", "model"): "loads a reward model from the hub or a directory (test_rewards_extra)",
    ("reward", "embedding"): "loads an embedding model from the hub (test_rewards_extra)",
    ("task", "gsm8k"): "loads openai/gsm8k from the hub (task=hf is built from a local file)",
    ("trainer", "deepspeed"): "needs the deepspeed extra and GPUs (refused by the config check)",
    ("trainer", "fsdp"): "needs 2 GPUs",
    ("trainer", "ddp"): "starts 2 processes (test_ddp)",
    ("trainer", "ddp_spawn"): "starts 2 processes (test_ddp)",
}
# Options whose config the check refuses on purpose, with the line it gives.
REFUSED = {
    # without the extra: "pip install deepspeed"; with it: "not supported yet"
    ("trainer", "deepspeed"): r"trainer\.strategy='?deepspeed_stage_2'? is",
    ("trainer", "fsdp"): r"train\.max_grad_norm=1\.0 is invalid with trainer\.strategy=fsdp",
}


def _jsonl(tmp) -> str:
    path = tmp / "train.jsonl"
    path.write_text("\n".join(f'{{"prompt": "{a}+1=", "answer": "{a + 1}"}}' for a in range(20)))
    return str(path)


def test_every_group_has_options():
    for group in GROUPS:
        assert (CONF / group).is_dir() and list((CONF / group).glob("*.yaml")), group


def _missing(cfg: DictConfig) -> set[str]:
    return set(OmegaConf.missing_keys(cfg))


@functools.cache
def _default_missing() -> frozenset[str]:
    return frozenset(_missing(compose(check=False)))


@pytest.mark.parametrize(("group", "option"), PARAMS)
def test_option_composes_validates_and_builds(group, option, tmp_path):
    extra = FILL_IN.get((group, option), lambda _: [])(tmp_path)
    cfg = compose(f"{group}={option}", *extra, check=False)
    assert not _missing(cfg) - _default_missing(), f"{group}={option} leaves values ??? to fill"
    if (group, option) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[group, option]):
            validate(cfg)
    else:
        validate(cfg)
    if (group, option) in NOT_BUILT:
        pytest.skip(NOT_BUILT[group, option])
    build(group, cfg)


def build(group: str, cfg: DictConfig) -> None:
    """Instantiate what ``group`` configures, as grpo-lab train does, and check its type."""
    if group in PART_GROUPS:
        part = instantiate(cfg[group])
        assert dataclasses.is_dataclass(part) and group == type(part).GROUP
        # its fields are the node's keys, with the node's values
        keys = {k for k in cfg[group] if k != "_target_"}
        assert keys == {f.name for f in dataclasses.fields(part)}
        for key in keys:
            assert getattr(part, key) == cfg[group][key], key
    elif group == "experiment":
        algo = Algorithm.from_config(cfg)
        assert algo.G == cfg.G and algo.mu == cfg.mu
    elif group == "policy":
        policy = instantiate(cfg.policy, hidden_size=32, intermediate_size=64)
        assert isinstance(policy.model, torch.nn.Module) and policy.tokenizer is not None
    elif group == "task":
        task = instantiate(cfg.task)
        assert task.train() and task.eval()
    elif group == "reward":
        rewards = build_rewards(cfg)
        assert set(rewards.functions) == set(cfg.reward.functions)
    elif group == "sampler":
        sampler = instantiate(cfg.sampler)
        assert sampler.max_new_tokens == cfg.sampler.max_new_tokens
    elif group == "trainer":
        # grpo-lab train gives max_steps (from train.rollouts) and the logger
        trainer = instantiate(cfg.trainer, max_steps=1, logger=False, enable_progress_bar=False)
        assert isinstance(trainer, L.Trainer)
    elif group == "logger":
        # make_logger builds the MLflow logger from these keys (no _target_): they are there
        assert {"experiment_name", "tracking_uri", "run_name", "tags"} <= set(cfg.logger)
    else:
        raise AssertionError(f"no build for group {group}")
