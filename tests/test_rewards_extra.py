"""Reward options: length, overlong, format by task, embedding, reward model, user callables;
composition of conf/reward/ options; CLI runs that log each of them."""

from __future__ import annotations

import json
import math
import os
import textwrap

import pytest
import torch
from mlflow import MlflowClient
from transformers import BertConfig, BertForSequenceClassification, BertModel

from grpo_lab.module import GRPOModule
from grpo_lab.policy import tiny_llama
from grpo_lab.policy.tokenizer import char_tokenizer
from grpo_lab.rewards import (
    EmbeddingSimilarity,
    RewardModel,
    RewardSet,
    accuracy_reward,
    format_reward,
    length_penalty,
    overlong_penalty,
)
from grpo_lab.sampling import GenerateSampler
from grpo_lab.tasks import ArithmeticTask, CountdownTask, Example
from grpo_lab.train import build_rewards
from helpers import FAST, compose, cpu_trainer, module_of

# FAST without its arithmetic-only keys, and one rollout: the runs check wiring, not learning.
FAST_ANY_TASK = [o for o in FAST if not o.startswith(("task.", "train.rollouts="))] + [
    "train.rollouts=1"
]
EX = Example(prompt="p", answer="a")


# ---------------------------------------------------------------- length and overlong


def test_length_penalty_is_linear_beyond_target():
    # target 4, scale 0.5: lengths 2, 4, 5, 10 -> 0, 0, -0.5, -3
    got = length_penalty(["", "", "", ""], [EX] * 4, lengths=[2, 4, 5, 10], target=4, scale=0.5)
    assert got == [0.0, 0.0, -0.5, -3.0]
    assert length_penalty([""], [EX], lengths=[7], scale=0.01) == [pytest.approx(-0.07)]


def test_overlong_penalty_follows_dapo_eq13():
    # L_max = 20, L_cache = 4: 0 up to 16, then (16 - L) / 4, -1 past 20
    lengths = [3, 16, 17, 18, 20, 21]
    got = overlong_penalty(
        [""] * 6, [EX] * 6, lengths=lengths, max_new_tokens=64, max_len=20, cache=4
    )
    assert got == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]


def test_overlong_penalty_defaults_to_the_samplers_limit():
    # max_len null -> max_new_tokens = 10; cache null -> 10 // 5 = 2: soft window (8, 10]
    got = overlong_penalty([""] * 4, [EX] * 4, lengths=[8, 9, 10, 1], max_new_tokens=10)
    assert got == [0.0, -0.5, -1.0, 0.0]


def test_overlong_penalty_rejects_a_cache_wider_than_max_len():
    with pytest.raises(ValueError, match=r"max_len=4, cache=5; allowed: 0 < cache <= max_len"):
        overlong_penalty([""], [EX], lengths=[1], max_new_tokens=4, cache=5)


# ---------------------------------------------------------------- accuracy and format by task


def test_accuracy_and_format_use_the_tasks_rules():
    task = CountdownTask(train_size=5, eval_size=1)
    ex = Example(
        prompt="Use 3 7 25 50 to make 75:",
        answer="75",
        meta={"numbers": [3, 7, 25, 50], "target": 75},
    )
    completions = ["50+25", "75", "50+25+3-3", "fifty", "50+25"]
    assert accuracy_reward(completions, [ex] * 5, task=task) == [1.0, 0.0, 0.0, 0.0, 1.0]
    # format: any allowed integer expression that ended by itself
    assert format_reward(
        completions, [ex] * 5, pattern=None, task=task, truncated=[False, False, False, False, True]
    ) == [1.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="no task"):
        format_reward(["1"], [ex], pattern=None)


# ---------------------------------------------------------------- model-based rewards


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny BertModel and a num_labels=1 BertForSequenceClassification, each saved with a
    character tokenizer (PreTrainedTokenizerFast) to its own directory."""
    root = tmp_path_factory.mktemp("reward-models")
    tok = char_tokenizer()
    cfg = dict(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    paths = {}
    for name, model in (
        ("embed", BertModel(BertConfig(**cfg))),
        ("rm", BertForSequenceClassification(BertConfig(num_labels=1, **cfg))),
        ("rm2", BertForSequenceClassification(BertConfig(num_labels=2, **cfg))),
    ):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def _mean_pooled(model, tok, text):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state[0]  # (T, H), no padding
    return hidden.sum(0) / hidden.shape[0]


def test_embedding_similarity_is_cosine_of_mean_pooled_embeddings(tiny_models):
    reward = EmbeddingSimilarity(tiny_models["embed"])
    ex = Example(prompt="Which is bigger, 9.11 or 9.9?", answer="9.9")
    completions = ["9.9", "it is 9.11 I think, clearly", "   ", "9.9 "]
    scores = reward(completions, [ex] * 4)
    assert scores[0] == pytest.approx(1.0, abs=1e-5)  # same text as the answer: cos(x, x) = 1
    assert scores[2] is None  # nothing to embed
    # computed by hand from the model's hidden states, one text at a time (no padding)
    model, tok = BertModel.from_pretrained(tiny_models["embed"]).eval(), reward.tokenizer
    a, b = _mean_pooled(model, tok, completions[1]), _mean_pooled(model, tok, "9.9")
    assert scores[1] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-5)
    assert scores[1] < 0.999
    # padding is not pooled: "9.9 " scored next to a long completion equals scoring it alone
    assert scores[3] == pytest.approx(reward(["9.9 "], [ex])[0], abs=1e-5)
    # None is left out of the mean, counted as 0 in the total
    out = RewardSet({"embedding": reward})(completions, [ex] * 4)
    assert math.isnan(out.per_fn["embedding"][2]) and out.total[2] == 0.0


def test_embedding_tokenizer_round_trips_task_text(tiny_models):
    tok = EmbeddingSimilarity(tiny_models["embed"]).tokenizer
    text = "Use 3 7 25 to make 66: (25-3)*3 / Which is bigger, 9.11 or 9.9?"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_reward_model_scores_prompt_plus_completion(tiny_models):
    reward = RewardModel(tiny_models["rm"])
    a, b = Example(prompt="Q: 2+2? A:", answer="4"), Example(prompt="Q: say hi. A:", answer="hi")
    scores = reward([" 4", " 4", " a much longer completion"], [a, b, a])
    model = BertForSequenceClassification.from_pretrained(tiny_models["rm"]).eval()
    tok = reward.tokenizer
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([tok("Q: 2+2? A: 4")["input_ids"]])).logits[0, 0]
    assert scores[0] == pytest.approx(float(alone), abs=1e-5)
    assert scores[0] != pytest.approx(scores[1], abs=1e-6)  # the prompt is part of what is scored
    # a classifier head set by hand: weight 0, bias 0.5 -> every score is 0.5
    with torch.no_grad():
        reward.model.classifier.weight.zero_()
        reward.model.classifier.bias.fill_(0.5)
    assert reward([" 4", "x"], [a, b]) == [0.5, 0.5]


def test_reward_model_needs_one_label_and_a_real_path(tiny_models, tmp_path):
    with pytest.raises(ValueError, match=r"num_labels=2; allowed: 1"):
        RewardModel(tiny_models["rm2"])
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        RewardModel(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- composition of conf/reward/


def _compose(*overrides):
    return compose(*overrides, check=False)  # some options leave values ??? to fill in


def test_reward_options_merge_under_multi_select():
    cfg = _compose("reward=[accuracy,format,length,overlong]")
    assert list(cfg.reward.functions) == ["accuracy", "format", "length", "overlong"]
    assert dict(cfg.reward.weights) == {
        "accuracy": 1.0,
        "format": 0.1,
        "length": 1.0,
        "overlong": 1.0,
    }
    rewards = build_rewards(cfg)
    # "82" after "37+45=" (arithmetic default), 3 tokens with EOS, of max_new_tokens=6:
    # accuracy 1, format 1 (x0.1), length -0.03, overlong: cache 6//5=1, soft from 5 -> 0
    ex = Example(prompt="37+45=", answer="82")
    from grpo_lab.tasks import ArithmeticTask

    task = ArithmeticTask(max_operand=9, eval_size=10)
    out = rewards(
        ["82", "8 2"],
        [ex, ex],
        task=task,
        truncated=[False, True],
        lengths=[3, 6],
        max_new_tokens=6,
    )
    assert out.total[0].item() == pytest.approx(1.0 + 0.1 - 0.03 + 0.0)
    # "8 2" truncated at 6 tokens: accuracy 0, format 0, length -0.06, overlong -1
    assert out.total[1].item() == pytest.approx(-0.06 - 1.0)


def test_required_model_paths_and_custom_target_are_marked_missing():
    from omegaconf import MissingMandatoryValue

    for option, key in (("embedding", "model"), ("model", "model"), ("custom", "_target_")):
        cfg = _compose(f"reward=[accuracy,{option}]")
        with pytest.raises(MissingMandatoryValue):
            getattr(cfg.reward.functions[option], key)


# ---------------------------------------------------------------- CLI runs that log each reward


def _run_metrics(tracking_uri):
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("grpo_lab").experiment_id])
    assert run.info.status == "FINISHED"
    return client, run


@pytest.mark.slow
def test_cli_logs_accuracy_format_length_and_overlong_on_countdown(run_cli, tracking_uri):
    run_cli(
        "train",
        *FAST_ANY_TASK,
        "task=countdown",
        "task.num_numbers=3",
        "task.max_number=9",
        "task.train_size=40",
        "task.eval_size=8",
        "sampler.max_new_tokens=12",
        "sft.steps=3",
        "reward=[accuracy,format,length,overlong]",
        "reward.functions.length.scale=0.5",
    )
    client, run = _run_metrics(tracking_uri)
    m = run.data.metrics
    for name in ("accuracy", "format", "length", "overlong"):
        assert f"rewards/{name}/mean" in m, sorted(m)
    assert 0.0 <= m["eval/accuracy"] <= 1.0
    # length = -0.5 * tokens (target 0), so at every step its mean is -0.5 x the mean length
    lengths = {
        p.step: p.value
        for p in client.get_metric_history(run.info.run_id, "completions/mean_length")
    }
    for p in client.get_metric_history(run.info.run_id, "rewards/length/mean"):
        assert p.value == pytest.approx(-0.5 * lengths[p.step], abs=1e-4)
    assert -1.0 <= m["rewards/overlong/mean"] <= 0.0


USER_REWARDS = '''
def half_on_odd(completions, examples, **ctx):
    """0.5 on odd samples; None (not applicable) on even ones."""
    return [0.5 if i % 2 else None for i in range(len(completions))]


def minus_quarter(completions, examples, *, lengths, **ctx):
    return [-0.25 for _ in lengths]
'''


@pytest.mark.slow
def test_cli_logs_model_rewards_and_user_rewards_on_compare(
    run_cli, tracking_uri, tmp_path, tiny_models
):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(USER_REWARDS))
    run_cli(
        "train",
        *FAST_ANY_TASK,
        "task=compare",
        "task.train_size=40",
        "task.eval_size=8",
        "sampler.max_new_tokens=8",
        "sft.steps=3",
        "reward=[accuracy,embedding,model,custom]",
        f"reward.functions.embedding.model={tiny_models['embed']}",
        f"reward.functions.model.model={tiny_models['rm']}",
        "reward.functions.custom._target_=my_rewards.minus_quarter",
        "+reward.functions.mine._target_=my_rewards.half_on_odd",
        "+reward.functions.mine._partial_=true",
        env={"PYTHONPATH": str(tmp_path)},
    )
    _, run = _run_metrics(tracking_uri)
    m = run.data.metrics
    for name in ("accuracy", "embedding", "model"):
        assert f"rewards/{name}/mean" in m, sorted(m)
    assert m["rewards/mine/mean"] == 0.5 and m["rewards/mine/std"] == 0.0  # Nones left out
    assert m["rewards/custom/mean"] == -0.25
    assert -1.0 <= m["rewards/embedding/mean"] <= 1.0
    assert 0.0 <= m["eval/accuracy"] <= 1.0


# ---------------------------------------------------------------- reward.on_error in a rollout


def nan_on_odd_length(completions, examples, **_):
    """A per-sample failure: NaN for completions of odd length, 1.0 otherwise."""
    return [math.nan if len(c) % 2 else 1.0 for c in completions]


def always_raises(completions, examples, **_):
    raise RuntimeError("the scoring service is down")


def rollout_module(rewards: RewardSet, *overrides: str) -> GRPOModule:
    return module_of(
        "G=4",
        "beta=0",
        "train.dynamic_sampling=false",
        "train.prompts_per_step=2",
        "sampler.max_new_tokens=5",
        *overrides,
        policy=tiny_llama(hidden_size=32, intermediate_size=64, num_layers=1, seed=0),
        task=ArithmeticTask(max_operand=9, eval_size=20, seed=0),
        rewards=rewards,
        sampler=GenerateSampler(max_new_tokens=5),
    )


def test_on_error_zero_rollout_has_failed_samples_at_0_advantages_from_them_and_counts():
    rewards = RewardSet(
        {"acc": accuracy_reward, "odd": nan_on_odd_length, "down": always_raises},
        weights={"odd": 0.5},
        on_error="zero",
    )
    module = rollout_module(rewards)
    examples = module.task.train()[:3]
    torch.manual_seed(0)
    rollout = module.make_rollout(examples)
    task, texts = module.task, rollout.texts
    odd = [len(t) % 2 == 1 for t in texts]
    assert 0 < sum(odd) < len(texts), texts  # both kinds of sample are in this rollout
    # by hand: acc (task's rule) + 0.5 * (0 where the text has odd length, else 1) + 0 (down)
    expected = [
        (1.0 if task.is_correct(t, ex) else 0.0) + (0.0 if o else 0.5)
        for t, ex, o in zip(texts, rollout.examples, odd)
    ]
    assert rollout.rewards.tolist() == expected
    assert rollout.per_fn["down"].tolist() == [0.0] * len(texts)
    # group advantages from those rewards, in float64: (r - mean_g) / (population std_g + eps)
    r = torch.tensor(expected, dtype=torch.float64).view(-1, 4)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(rollout.advantages.double(), adv.flatten(), atol=1e-5, rtol=1e-5)
    assert rollout.stats["rewards/odd/errors"] == sum(odd)
    assert rollout.stats["rewards/down/errors"] == len(texts)
    assert rollout.stats["rewards/acc/errors"] == 0


def test_on_error_counts_follow_the_groups_that_dynamic_sampling_keeps():
    calls = iter([[1.0, math.nan, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], [math.nan, 1.0, 0.0, 0.0]])

    def scripted(completions, examples, **_):
        return next(calls)

    module = rollout_module(
        RewardSet({"scripted": scripted}, on_error="zero"), "train.dynamic_sampling=true"
    )
    rollout = module.make_rollout(module.task.train()[:2])
    # group 2 (all 0) is dead and replaced by the fresh group; the NaNs become 0
    assert rollout.rewards.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert (
        rollout.stats["rewards/scripted/errors"] == 2
    )  # one kept in group 1, one in the fresh group


FLAKY_REWARD = """
import json, math, os


class Flaky:
    \"\"\"Raises on every second call; on the other calls, NaN for the first sample.\"\"\"

    def __init__(self):
        self.calls = 0

    def __call__(self, completions, examples, **ctx):
        self.calls += 1
        raised = self.calls % 2 == 0
        with open(os.environ["FLAKY_LOG"], "a") as f:
            f.write(json.dumps({"n": len(completions), "raised": raised}) + "\\n")
        if raised:
            raise ConnectionError("scorer unreachable")
        return [math.nan] + [1.0] * (len(completions) - 1)
"""


@pytest.mark.slow
def test_cli_on_error_zero_finishes_and_logs_the_error_counter_raise_names_the_function(
    run_cli, tracking_uri, tmp_path
):
    (tmp_path / "flaky.py").write_text(textwrap.dedent(FLAKY_REWARD))
    log = tmp_path / "flaky.jsonl"
    args = [
        "train",
        *FAST,
        "train.eval_every=100",  # evals only at the start and the end: calls 1, 2-3 (train), 4
        "+reward.functions.flaky._target_=flaky.Flaky",
    ]
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": pythonpath, "FLAKY_LOG": str(log)}
    proc = run_cli(*args, "reward.on_error=zero", env=env)
    client, run = _run_metrics(tracking_uri)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # a rollout scores prompts_per_step * G = 4 * 4 = 16 completions; an eval batch 8 prompts
    rollouts = [c for c in calls if c["n"] == 16]
    assert len(rollouts) == 2
    expected = [16.0 if c["raised"] else 1.0 for c in rollouts]  # whole batch, or sample 0
    assert set(expected) == {16.0, 1.0}, calls  # both kinds of failure happened in training
    history = client.get_metric_history(run.info.run_id, "rewards/flaky/errors")
    assert [p.value for p in sorted(history, key=lambda p: p.step)] == expected
    # one warning for the function, naming its first failure (whichever call that was)
    out = proc.stdout + proc.stderr
    assert out.count("Later failures of 'flaky' are only counted") == 1, out[-3000:]
    first = "raised ConnectionError" if calls[0]["raised"] else "returned nan for sample 0"
    assert f"reward function 'flaky' {first}" in out

    log.unlink()
    failed = run_cli(*args, env=env, check=False)
    assert failed.returncode != 0
    out = failed.stdout + failed.stderr
    (only,) = [json.loads(line) for line in log.read_text().splitlines()]  # stops at the first
    first = "raised ConnectionError: scorer unreachable" if only["raised"] else "returned nan"
    assert f"RewardError: reward function 'flaky' {first}" in out


def nan_on_odd_answers(completions, examples, **_):
    """A per-sample failure that depends on the prompt only: NaN where the answer is odd."""
    return [math.nan if int(ex.answer) % 2 else 1.0 for ex in examples]


def test_on_error_zero_leaves_failed_samples_out_of_the_eval_reward_and_counts_them():
    # Greedy eval of 8 prompts; the scorer fails (NaN) where the true answer is odd. Under
    # on_error=zero those score 0 in training, but eval/reward must not pass an outage off as a
    # worse policy: it is the mean over the samples that scored (1.0 each), the rest counted.
    from grpo_lab.data import TaskDataModule

    module = rollout_module(RewardSet({"flaky": nan_on_odd_answers}, on_error="zero"))
    data = TaskDataModule(module.task, 2, eval_size=8, eval_batch_size=3)
    trainer = cpu_trainer(limit_val_batches=1.0)  # validate: every eval batch
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    odd = sum(int(ex.answer) % 2 for ex in module.task.eval()[:8])
    assert 0 < odd < 8  # the test needs both kinds of sample
    assert metrics["eval/reward_errors"] == odd
    assert metrics["eval/reward"] == pytest.approx(1.0)  # before: (8 - odd) / 8
