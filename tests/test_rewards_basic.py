"""Rule-based rewards and their weighted combination (grpo_lab.rewards)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from grpo_lab.config import ConfigError, validate
from grpo_lab.paths import config_dir
from grpo_lab.rewards import RewardError, RewardSet, accuracy_reward, format_reward
from grpo_lab.tasks import ArithmeticTask, Example
from grpo_lab.tasks.arithmetic import parse_int_answer


@pytest.mark.parametrize(
    "completion, parsed",
    [
        ("82", "82"),
        (" 82 ", "82"),
        ("82\n", "82"),
        ("-7", "-7"),
        ("8 2", None),
        ("82abc", None),
        ("abc82", None),
        ("", None),
        ("   ", None),
        ("8.2", None),
        ("82=82", None),
    ],
)
def test_parse_int_answer_accepts_only_a_bare_integer(completion, parsed):
    assert parse_int_answer(completion) == parsed


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(max_operand=9, eval_size=10)


def test_accuracy_reward_compares_the_parsed_answer_with_the_reference(task):
    example = Example(prompt="37+45=", answer="82")
    completions = [" 82 ", "82", "8 2", "82abc", "", "81"]
    scores = accuracy_reward(completions, [example] * len(completions), task=task)
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_accuracy_reward_without_a_task_compares_stripped_text():
    examples = [Example(prompt="q", answer="yes")] * 3
    assert accuracy_reward([" yes\n", "Yes", "yes!"], examples) == [1.0, 0.0, 0.0]


def test_format_reward_needs_a_full_match_and_no_truncation():
    examples = [Example(prompt="q", answer="1")] * 5
    completions = ["42", " -3 ", "4 2", "abc", "42"]
    truncated = [False, False, False, False, True]
    assert format_reward(completions, examples, truncated=truncated) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert format_reward(["x=1"], examples[:1], pattern=r"x=\d") == [1.0]


EXAMPLES = [Example(prompt=f"{i}+0=", answer=str(i)) for i in range(3)]
TEXTS = ["0", "1", "x"]


def test_reward_set_total_is_the_weighted_sum_with_none_as_zero():
    def first(completions, examples, **_):
        return [1.0, 0.0, 1.0]

    def second(completions, examples, **_):
        return [0.5, 0.5, None]

    out = RewardSet({"first": first, "second": second}, weights={"first": 2.0, "second": 0.5})(
        TEXTS, EXAMPLES
    )
    # 2 * [1, 0, 1] + 0.5 * [0.5, 0.5, 0 (None)]
    torch.testing.assert_close(out.total, torch.tensor([2.25, 0.25, 2.0]))
    torch.testing.assert_close(out.per_fn["first"], torch.tensor([1.0, 0.0, 1.0]))
    second_scores = out.per_fn["second"]
    assert second_scores[:2].tolist() == [0.5, 0.5] and math.isnan(second_scores[2].item())


def test_reward_set_weights_default_to_one_and_context_reaches_the_functions():
    seen = {}

    def length_bonus(completions, examples, lengths, **ctx):
        seen.update(ctx)
        return [0.1 * n for n in lengths]

    out = RewardSet({"acc": accuracy_reward, "len": length_bonus})(
        TEXTS, EXAMPLES, lengths=[1, 2, 3], truncated=[False] * 3
    )
    # acc: "0" and "1" are right, "x" is not
    torch.testing.assert_close(out.total, torch.tensor([1.1, 1.2, 0.3]))
    assert seen == {"truncated": [False] * 3}


def test_a_raising_reward_function_is_named_in_the_error():
    def broken(completions, examples, **_):
        raise KeyError("answer_key")

    rewards = RewardSet({"acc": accuracy_reward, "broken": broken})
    with pytest.raises(RewardError, match="'broken' raised KeyError") as err:
        rewards(TEXTS, EXAMPLES)
    assert isinstance(err.value.__cause__, KeyError)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_raise_naming_the_function_and_the_way_out(bad):
    def scorer(completions, examples, **_):
        return [1.0, bad, 0.0]

    with pytest.raises(RewardError, match=r"'scorer' returned .* sample 1.*finite.*return None"):
        RewardSet({"scorer": scorer})(TEXTS, EXAMPLES)


@pytest.mark.parametrize(
    "returned, said",
    [([1.0, 0.0], "2 scores"), ([1.0] * 4, "4 scores"), (None, "None")],
)
def test_wrong_length_scores_raise_naming_the_function_and_the_expected_length(returned, said):
    def scorer(completions, examples, **_):
        return returned

    with pytest.raises(RewardError, match=f"'scorer' returned {said}; expected a list of 3"):
        RewardSet({"scorer": scorer})(TEXTS, EXAMPLES)


def test_non_numeric_scores_raise_naming_the_function():
    def scorer(completions, examples, **_):
        return [1.0, "high", 0.0]

    with pytest.raises(
        RewardError, match="'scorer' returned 'high' for sample 1; expected a number or None"
    ):
        RewardSet({"scorer": scorer})(TEXTS, EXAMPLES)


def test_weights_for_unknown_functions_raise_naming_the_allowed_ones():
    with pytest.raises(ValueError, match=r"\['formt'\].*allowed: \['accuracy', 'format'\]"):
        RewardSet({"accuracy": accuracy_reward, "format": format_reward}, weights={"formt": 0.1})


def test_an_empty_reward_set_raises():
    with pytest.raises(ValueError, match="reward.functions"):
        RewardSet({})


# ---------------------------------------------------------------- reward.on_error


def test_on_error_defaults_to_raise_and_accepts_only_raise_or_zero():
    assert RewardSet({"acc": accuracy_reward}).on_error == "raise"
    with pytest.raises(
        ValueError, match=r"reward.on_error='skip' is invalid; allowed: raise, zero"
    ):
        RewardSet({"acc": accuracy_reward}, on_error="skip")


def test_on_error_is_checked_with_the_config_before_compute():
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        good = compose("config", overrides=["reward.on_error=zero"])
        bad = compose("config", overrides=["reward.on_error=skip"])
    validate(good)
    with pytest.raises(
        ConfigError, match=r"reward.on_error='skip' is invalid: expected one of raise, zero"
    ):
        validate(bad)


def test_on_error_zero_scores_a_raising_function_0_for_its_batch_and_warns_once(caplog):
    calls = []

    def broken(completions, examples, **_):
        calls.append(len(completions))
        raise KeyError("answer_key")

    rewards = RewardSet(
        {"acc": accuracy_reward, "broken": broken}, weights={"broken": 2.0}, on_error="zero"
    )
    with caplog.at_level(logging.WARNING):
        first = rewards(TEXTS, EXAMPLES)
        second = rewards(TEXTS, EXAMPLES)
    assert calls == [3, 3]  # called once per batch: no per-sample retries
    for out in (first, second):
        # acc: "0" and "1" right, "x" wrong; broken: 0 for all three (weight 2 x 0)
        assert out.total.tolist() == [1.0, 1.0, 0.0]
        assert out.per_fn["broken"].tolist() == [0.0, 0.0, 0.0]
        assert out.errors["broken"].tolist() == [True, True, True]
        assert out.errors["acc"].tolist() == [False, False, False]
    said = [r.getMessage() for r in caplog.records if "'broken'" in r.getMessage()]
    assert len(said) == 1, said  # once per function, not once per call
    assert "KeyError" in said[0] and "answer_key" in said[0] and "rewards/broken/errors" in said[0]


def test_on_error_zero_scores_each_non_finite_sample_0_and_keeps_none_apart():
    def scorer(completions, examples, **_):
        return [None, math.nan, 0.5]

    def blows_up(completions, examples, **_):
        return [math.inf, 1.0, -math.inf]

    out = RewardSet(
        {"acc": accuracy_reward, "scorer": scorer, "blows_up": blows_up},
        weights={"scorer": 2.0},
        on_error="zero",
    )(TEXTS, EXAMPLES)
    # acc [1, 1, 0] + 2 * scorer [0 (None), 0 (NaN -> 0), 0.5] + blows_up [0 (inf), 1, 0 (-inf)]
    assert out.total.tolist() == [1.0, 2.0, 1.0]
    scorer_scores = out.per_fn["scorer"].tolist()
    assert math.isnan(scorer_scores[0]) and scorer_scores[1:] == [0.0, 0.5]  # None stays "n/a"
    assert out.errors["scorer"].tolist() == [False, True, False]  # None is not an error
    assert out.per_fn["blows_up"].tolist() == [0.0, 1.0, 0.0]
    assert out.errors["blows_up"].tolist() == [True, False, True]


def test_on_error_raise_reports_no_errors_tensor():
    assert RewardSet({"acc": accuracy_reward})(TEXTS, EXAMPLES).errors == {}


@pytest.mark.parametrize(
    "returned, said",
    [([1.0, 0.0], "returned 2 scores"), (None, "returned None"), ([1.0, "high", 0.0], "'high'")],
)
def test_on_error_zero_still_raises_on_the_wrong_number_or_type_of_scores(returned, said):
    def scorer(completions, examples, **_):
        return returned

    with pytest.raises(RewardError, match=f"'scorer' {said}" if "returned" in said else said):
        RewardSet({"scorer": scorer}, on_error="zero")(TEXTS, EXAMPLES)
