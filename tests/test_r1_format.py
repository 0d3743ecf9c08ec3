"""reward=r1_format: DeepSeek-R1's <think>...</think><answer>...</answer> form, on a hand-made table."""

from __future__ import annotations

import time

import pytest
from hydra import compose, initialize_config_dir

from grpo_lab.paths import config_dir
from grpo_lab.rewards import r1_format_reward
from grpo_lab.tasks import Example
from grpo_lab.train import build_rewards

CASES = [
    # (completion, score, why)
    ("<think>3+4=7</think><answer>7</answer>", 1.0, "the form, no whitespace"),
    ("<think>\n3+4=7\n</think>\n<answer>\n7\n</answer>", 1.0, "open-r1's newlines"),
    ("  <think>a</think>  \n <answer>7</answer>\n\n ", 1.0, "whitespace before, between, after"),
    ("<think></think><answer></answer>", 1.0, "empty blocks: structure only"),
    ("<think>a < b and c > d</think><answer>x</answer>", 1.0, "angle brackets inside"),
    ("<think>a</think><answer>7</answer>\nextra", 0.0, "text after </answer> (open-r1 lets it in)"),
    ("Sure! <think>a</think><answer>7</answer>", 0.0, "text before <think>"),
    ("<think>a</think> so <answer>7</answer>", 0.0, "text between the blocks"),
    ("<answer>7</answer><think>a</think>", 0.0, "blocks in the wrong order"),
    ("<think>a</think>", 0.0, "no answer"),
    ("<answer>7</answer>", 0.0, "no think"),
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0, "two answers"),
    ("<think>a</think><answer>1</answer> </answer>", 0.0, "a stray closing tag after"),
    ("<think><think>a</think></think><answer>7</answer>", 0.0, "nested think"),
    ("<think>a<answer>6</answer></think><answer>7</answer>", 0.0, "an answer tag inside think"),
    ("<think>a</think><answer>7", 0.0, "unclosed answer (cut off)"),
    ("<THINK>a</THINK><ANSWER>7</ANSWER>", 0.0, "tags are case-sensitive"),
    ("<think >a</think><answer>7</answer>", 0.0, "a space inside a tag"),
    ("<think>a</think>\u200b<answer>7</answer>", 0.0, "a zero-width space is not whitespace"),
    ("", 0.0, "empty"),
]


@pytest.mark.parametrize(
    "completion, score", [(c, s) for c, s, _ in CASES], ids=[why for _, _, why in CASES]
)
def test_r1_format_scores_the_hand_made_table(completion, score):
    assert r1_format_reward([completion], [Example(prompt="q", answer="7")]) == [score]


def test_r1_format_is_linear_on_hostile_text():
    ex = [Example(prompt="q", answer="7")] * 3
    hostile = [
        "<think>" + "</think><answer>" * 50_000,  # many tags: refused by the count
        "<think>" + " " * 1_000_000 + "</think>" + "\n" * 1_000_000 + "<answer>x</answer>",
        "<think>" + "<" * 1_000_000 + "</think><answer>" + ">" * 1_000_000 + "</answer> x",
    ]
    t0 = time.perf_counter()
    assert r1_format_reward(hostile, ex) == [0.0, 1.0, 0.0]
    assert time.perf_counter() - t0 < 2.0


def test_the_shipped_option_composes_with_accuracy_and_is_logged_alone():
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["reward=[accuracy,r1_format]"])
    assert dict(cfg.reward.weights) == {"accuracy": 1.0, "r1_format": 1.0}
    rewards = build_rewards(cfg)
    # accuracy without a task compares the stripped text: only the bare "7" is right
    out = rewards(
        ["<think>a</think><answer>7</answer>", "7"], [Example(prompt="q", answer="7")] * 2
    )
    assert out.per_fn["r1_format"].tolist() == [1.0, 0.0]
    assert out.per_fn["accuracy"].tolist() == [0.0, 1.0]
    assert out.total.tolist() == [1.0, 1.0]
