"""Experiment presets: each composes to its paper's settings and trains through the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from grpo_lab.grpo.advantages import GroupMean, GroupZScore
from grpo_lab.grpo.aggregation import SeqMeanTokenMean, SeqMeanTokenSumNorm, TokenMean
from grpo_lab.grpo.kl import KL
from grpo_lab.grpo.step import Algorithm
from grpo_lab.grpo.surrogates import GSPO, PPOClip
from grpo_lab.paths import config_dir
from grpo_lab.train import optimizer_steps
from helpers import FAST, compose

PRESETS = ["countdown_r1", "dapo", "dr_grpo", "grpo_paper", "gsm8k_qwen", "gspo"]
GPU_PRESETS = {"countdown_r1", "gsm8k_qwen"}  # need a GPU and a hub: composed here, not trained
PAPERS = {  # arXiv id each preset must cite
    "countdown_r1": "2501.12948",
    "grpo_paper": "2402.03300",
    "dapo": "2503.14476",
    "dr_grpo": "2503.20783",
    "gspo": "2507.18071",
    "gsm8k_qwen": "2402.03300",
}
# What each preset must set, as the parts it builds (everything else: the project's defaults)
EXPECTED = {
    "countdown_r1": dict(kl=KL("k3", 0.001, "loss"), G=8),
    "gsm8k_qwen": dict(kl=KL("k3", 0.001, "loss"), G=5),
    "grpo_paper": dict(
        kl=KL("k3", 0.04, "loss"),
        surrogate=PPOClip(epsilon_low=0.2, epsilon_high=0.2),
        mu=1,
        aggregation=SeqMeanTokenMean(),
        advantage=GroupZScore(),
        dynamic_sampling=False,
    ),
    "dapo": dict(
        kl=KL("none", 0.0, "loss"),
        surrogate=PPOClip(epsilon_low=0.2, epsilon_high=0.28),
        aggregation=TokenMean(),
        advantage=GroupZScore(),
        dynamic_sampling=True,
    ),
    "dr_grpo": dict(
        kl=KL("none", 0.0, "loss"),
        dynamic_sampling=False,
        advantage=GroupMean(),
        aggregation=SeqMeanTokenSumNorm(max_len=6),  # L_max = sampler.max_new_tokens
        surrogate=PPOClip(epsilon_low=0.2, epsilon_high=0.2),
    ),
    "gspo": dict(
        kl=KL("none", 0.0, "loss"),
        dynamic_sampling=False,
        surrogate=GSPO(epsilon_low=3e-4, epsilon_high=4e-4),
        advantage=GroupZScore(),
        minibatch_size=None,
        num_minibatches=4,
    ),
}


def settings(cfg) -> dict:
    """The algorithm's parts built from ``cfg`` as the module builds them, and its knobs."""
    algo = Algorithm.from_config(cfg)
    return dict(
        kl=algo.kl,
        surrogate=algo.surrogate,
        advantage=algo.advantage,
        aggregation=algo.aggregation,
        mu=algo.mu,
        minibatch_size=algo.batching.minibatch_size,
        num_minibatches=algo.batching.num_minibatches,
        dynamic_sampling=cfg.train.dynamic_sampling,
        G=cfg.G,
    )


def test_every_preset_is_listed():
    assert sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")) == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_opens_with_its_paper_and_its_departures(name):
    text = (config_dir() / "experiment" / f"{name}.yaml").read_text()
    lines = text.splitlines()
    assert lines[0] == "# @package _global_"
    header = "\n".join(line for line in lines if line.startswith("#"))
    assert PAPERS[name] in header
    assert "Where this departs from the paper:" in header


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_to_its_paper_settings(name):
    got = settings(compose(f"experiment={name}"))  # validated
    for field, value in EXPECTED[name].items():
        assert got[field] == value, field
        assert type(got[field]) is type(value), field  # GSPO is a PPOClip: equal is not enough


@pytest.mark.parametrize(("B", "G"), [(16, 8), (4, 4), (3, 4)])
def test_gspo_splits_any_rollout_into_four_minibatches(B, G):
    cfg = compose("experiment=gspo", f"train.prompts_per_step={B}", f"G={G}", "train.rollouts=10")
    # validated: B*G = 128, 16, 12: each divisible by 4, so each is a valid gspo run
    assert optimizer_steps(cfg) == 10 * 1 * 4  # rollouts x mu x 4 mini-batches


def test_dapo_combines_the_accuracy_format_and_overlong_rewards():
    reward = compose("experiment=dapo").reward
    assert sorted(reward.functions) == ["accuracy", "format", "overlong"]
    assert dict(reward.weights) == {"accuracy": 1.0, "format": 0.1, "overlong": 1.0}
    assert reward.functions.overlong._target_ == "grpo_lab.rewards.overlong_penalty"


def test_countdown_r1_composes_to_reasoning_gym_countdown_with_the_r1_format():
    pytest.importorskip("reasoning_gym")
    from grpo_lab.instantiate import instantiate
    from grpo_lab.rewards import r1_format_reward

    cfg = compose("experiment=countdown_r1", "task.train_size=20", "task.eval_size=5")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.policy._target_ == "grpo_lab.policy.load_pretrained" and not cfg.sft.enabled
    assert dict(cfg.reward.weights) == {"reasoning_gym": 1.0, "r1_format": 0.1}
    assert cfg.reward.functions.r1_format._target_ == "grpo_lab.rewards.r1_format_reward"
    task = instantiate(cfg.task)
    ex = task.eval()[0]
    assert ex.meta["entry"]["metadata"]["source_dataset"] == "countdown"
    assert "<answer>" in task.system_prompt
    r1 = f"<think>try it</think>\n<answer>{ex.answer}</answer>"
    assert ex.demonstration == f"<think></think><answer>{ex.answer}</answer>"
    assert task.is_correct(r1, ex) and not task.is_correct(ex.answer, ex)  # the tag is the format
    assert r1_format_reward([r1, ex.answer, r1 + " more"], [ex] * 3) == [1.0, 0.0, 0.0]


def test_gsm8k_qwen_composes_to_qwen_instruct_on_gsm8k_with_math_verify_and_the_r1_format():
    cfg = compose("experiment=gsm8k_qwen")  # validated
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.policy._target_ == "grpo_lab.policy.load_pretrained" and not cfg.sft.enabled
    assert cfg.policy.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.policy.dtype == "bfloat16" and cfg.policy.lora.enabled is False
    assert cfg.task._target_ == "grpo_lab.tasks.HfTask"
    assert (cfg.task.path, cfg.task.name, cfg.task.eval_split) == ("openai/gsm8k", "main", "test")
    assert (cfg.task.answer_extraction, cfg.task.answer_format) == ("gsm8k", "boxed")
    assert "<answer>" in cfg.task.system_prompt and "\\boxed{}" in cfg.task.system_prompt
    assert dict(cfg.reward.weights) == {"math_verify": 1.0, "r1_format": 0.1}
    assert cfg.reward.functions.math_verify._target_ == "grpo_lab.rewards.MathVerifyReward"
    assert cfg.train.eval_size == 1319  # the whole GSM8K test split
    header = (config_dir() / "experiment" / "gsm8k_qwen.yaml").read_text()
    for figure in ("36.4", "56.7", "54.3", "2110.14168"):  # the published figures, GSM8K
        assert figure in header
    # LoRA is one override away, and the 1.5B model another
    lora = compose("experiment=gsm8k_qwen", "policy.lora.enabled=true")
    assert lora.policy.lora.enabled and lora.policy.lora.r == 64
    bigger = compose("experiment=gsm8k_qwen", "policy.name_or_path=Qwen/Qwen2.5-1.5B-Instruct")
    assert bigger.policy.name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"


def test_preset_values_give_way_to_the_command_line():
    got = settings(compose("experiment=dapo", "surrogate.epsilon_high=0.3", "beta=0.01", "kl=k3"))
    assert (got["surrogate"].epsilon_high, got["kl"].beta, got["kl"].estimator) == (0.3, 0.01, "k3")
    assert got["surrogate"].epsilon_low == 0.2  # the rest of the preset stays
    assert got["aggregation"] == TokenMean()


def test_default_experiment_is_unchanged_by_the_presets_machinery():
    got = settings(compose())
    # conf/config.yaml: beta 0 and dynamic sampling are the tuned defaults (README, "What the
    # default experiment shows"); experiment=grpo_paper restores the paper's beta 0.04
    assert (
        got["kl"],
        got["dynamic_sampling"],
        got["aggregation"],
        got["advantage"],
        got["surrogate"],
    ) == (
        KL("k3", 0.0, "loss"),
        True,
        SeqMeanTokenMean(),
        GroupZScore(),
        PPOClip(epsilon_low=0.2, epsilon_high=0.2),
    )
    assert not got["kl"].active  # beta 0: no KL term, no reference model


# --------------------------------------------------------------------------- through the CLI

# A preset sets beta and dynamic sampling itself: drop FAST's pins of them.
ONE_ROLLOUT = [
    o for o in FAST if not o.startswith(("train.rollouts=", "beta=", "train.dynamic_sampling="))
] + ["train.rollouts=1"]
# GSPO's clipping shows only when the policy moves between its 4 mini-batches: give the groups
# reward variance (a few-step SFT model is rarely right, so accuracy is 0 for all) and a step
# size that moves the sequence ratio past its 3e-4 / 4e-4 clip range.
SIGNAL = [
    "reward=custom",
    "reward.functions.custom._target_=signal_rewards.text_checksum",
    "train.lr=1e-2",
    "train.warmup_steps=0",
]
CLI_EXTRA = {"gspo": SIGNAL}
TESTS_ON_PATH = {  # signal_rewards.py sits beside this file
    "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p
    )
}
CLI_PARAMS = {
    "grpo_paper": {
        "kl.estimator": "k3",
        "beta": "0.04",
        "kl.beta": "0.04",
        "aggregation._target_": "grpo_lab.grpo.aggregation.SeqMeanTokenMean",
    },
    "dapo": {
        "kl.estimator": "none",
        "beta": "0.0",
        "surrogate.epsilon_high": "0.28",
        "aggregation._target_": "grpo_lab.grpo.aggregation.TokenMean",
        "train.dynamic_sampling": "True",
        "reward.weights.overlong": "1.0",
    },
    "dr_grpo": {
        "advantage._target_": "grpo_lab.grpo.advantages.GroupMean",
        "aggregation._target_": "grpo_lab.grpo.aggregation.SeqMeanTokenSumNorm",
        "aggregation.max_len": "6",
        "beta": "0.0",
    },
    "gspo": {
        "surrogate._target_": "grpo_lab.grpo.surrogates.GSPO",
        "surrogate.epsilon_low": "0.0003",
        "beta": "0.0",
        "train.num_minibatches": "4",
        "train.minibatch_size": "None",
    },
}
CLI_METRICS = {
    "grpo_paper": ["kl", "loss"],
    "dapo": ["dynamic_sampling/drop_rate", "rewards/overlong/mean", "clip_ratio/high_mean"],
    "dr_grpo": ["loss", "surrogate"],
    "gspo": ["ratio_mean", "clip_ratio/region_mean"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [p for p in PRESETS if p not in GPU_PRESETS])
def test_preset_trains_one_rollout_through_the_cli(name, run_cli, tracking_uri, tmp_path):
    proc = run_cli(
        "train", f"experiment={name}", *ONE_ROLLOUT, *CLI_EXTRA.get(name, []), env=TESTS_ON_PATH
    )
    assert "eval/accuracy =" in proc.stdout
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    for key, value in CLI_PARAMS[name].items():
        assert params[key] == value, key
    for metric in CLI_METRICS[name]:
        assert metric in run.data.metrics, metric
    if name != "grpo_paper":  # kl=none: no reference model, so the logged KL is exactly 0
        assert run.data.metrics.get("kl", 0.0) == 0.0
    m = run.data.metrics
    assert m["skipped_steps_total"] == 0.0
    if name != "gspo":
        # One optimizer step per rollout: pi_old is the current policy, exactly, so the ratio is
        # exactly 1 and nothing is clipped.
        assert (m["ratio_mean"], m["clip_ratio/region_mean"]) == (1.0, 0.0)
    if name == "grpo_paper":
        assert m["kl"] == 0.0  # the step's policy is still pi_ref: k3 = e^0 - 0 - 1 = 0
        # seq-mean of -A_i with A normalised within each group: 0 up to rounding
        assert abs(m["loss"]) < 1e-5
    if name == "dapo":
        assert 0.0 <= m["dynamic_sampling/drop_rate"] <= 1.0
        assert 1.0 <= m["dynamic_sampling/tries"] <= 4.0  # train.dynamic_sampling_max_tries
        assert -1.0 <= m["rewards/overlong/mean"] <= 0.0  # DAPO eq. 13 lies in [-1, 0]
    if name == "gspo":
        # B*G = 16 in 4 mini-batches of 4: 4 optimizer steps on the one rollout ...
        import torch

        (last,) = tmp_path.rglob("last.ckpt")
        assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
        # ... and mini-batches 2-4 run on a moved policy against pi_old = the sampling policy:
        # the sequence ratio leaves 1 and its narrow clip range bites. (Were pi_old the current
        # policy, ratio_mean would be exactly 1 and nothing clipped.)
        assert m["grad_norm"] > 0
        assert m["ratio_mean"] != 1.0
        assert m["clip_ratio/region_mean"] > 0.0
