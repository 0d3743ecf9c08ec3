"""task=reasoning_gym and reward=reasoning_gym: reasoning-gym's own datasets and scorers."""

from __future__ import annotations

import collections
import inspect
import pickle
import re
import sys

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from grpo_lab.instantiate import instantiate
from grpo_lab.paths import config_dir
from grpo_lab.rewards import reasoning_gym_reward
from grpo_lab.tasks import ArithmeticTask, Example, ReasoningGymTask
from grpo_lab.tasks.reasoning_gym import (
    EVALUATING_SCORERS,
    extract_answer,
    is_plain_expression,
    is_safe_for,
)
from helpers import FAST

rg = pytest.importorskip("reasoning_gym")

# chain_sum with 2 one-digit terms: 200 distinct questions, so a draw of a few hundred repeats.
SMALL = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def small_task(**kw) -> ReasoningGymTask:
    args = {"dataset": "chain_sum", "config": SMALL, "train_size": 300, "eval_size": 40}
    return ReasoningGymTask(**{**args, **kw})


# ---------------------------------------------------------------- splits


def test_train_and_eval_share_no_question_even_where_the_generator_repeats_them():
    task = small_task()
    eval_q = {ex.prompt for ex in task.eval()}
    assert len(task.eval()) == 40 and len(eval_q) == 40  # distinct eval questions
    assert len(task.train()) == 300
    assert not eval_q & {ex.prompt for ex in task.train()}
    # the raw stream after the eval items does repeat eval questions: the dedup removed them
    ds = rg.create_dataset("chain_sum", seed=0, size=1000, **SMALL)
    later = {ds[i]["question"] for i in range(100, 1000)}
    assert eval_q & later


def test_the_split_is_seeded():
    a, b, c = small_task(seed=3), small_task(seed=3), small_task(seed=4)
    assert [e.prompt for e in a.train()] == [e.prompt for e in b.train()]
    assert [e.prompt for e in a.eval()] == [e.prompt for e in b.eval()]
    assert [e.prompt for e in a.eval()] != [e.prompt for e in c.eval()]


def test_too_small_a_question_space_is_an_error_naming_the_sizes():
    tiny = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    with pytest.raises(ValueError, match=r"task.train_size=10 and task.eval_size=250"):
        ReasoningGymTask(dataset="chain_sum", config=tiny, train_size=10, eval_size=250)


def test_examples_and_the_task_survive_pickling_for_ddp_spawn_and_sweeps():
    task = ReasoningGymTask(
        datasets={"chain_sum": {"config": SMALL}, "countdown": {"weight": 1}},
        train_size=20,
        eval_size=10,
    )
    copy = pickle.loads(pickle.dumps(task))
    assert copy.eval() == task.eval() and copy.train() == task.train()
    ex = copy.eval()[0]
    assert copy.score(ex.answer, ex) == 1.0


# ---------------------------------------------------------------- scoring


def test_score_answer_decides_accuracy():
    task = small_task()
    ex = task.eval()[0]
    entry = ex.meta["entry"]
    right, wrong = f" {entry['answer']}\n", str(int(entry["answer"]) + 1)
    assert task.score(right, ex) == 1.0 and task.is_correct(right, ex)
    assert task.score(wrong, ex) == 0.0 and not task.is_correct(wrong, ex)
    assert reasoning_gym_reward([right, wrong, ""], [ex] * 3, task=task) == [1.0, 0.0, 0.0]


def test_partial_credit_is_the_reward_and_the_threshold_decides_correct():
    """countdown's scorer gives 0.05 to an expression that uses the numbers but misses."""
    task = ReasoningGymTask(dataset="countdown", train_size=5, eval_size=5)
    ex = next(
        e
        for e in task.eval()
        if sum(e.meta["entry"]["metadata"]["numbers"]) != e.meta["entry"]["metadata"]["target"]
    )
    miss = "+".join(map(str, ex.meta["entry"]["metadata"]["numbers"]))  # all numbers, wrong value
    assert task.score(miss, ex) == 0.05 and not task.is_correct(miss, ex)
    assert task.score(ex.answer, ex) == 1.0 and task.is_correct(ex.answer, ex)
    lenient = ReasoningGymTask(
        dataset="countdown", train_size=5, eval_size=5, correct_threshold=0.05
    )
    assert lenient.is_correct(miss, ex)


@pytest.mark.parametrize(
    ("fmt", "completion", "answer"),
    [
        ("raw", "  42 \n", "42"),
        ("raw", "   ", None),
        ("answer_tag", "<think>7?</think><answer> 8 </answer>", "8"),
        ("answer_tag", "<answer>1</answer> no, <answer>2</answer>", "2"),
        ("answer_tag", "<answer>1", None),
        ("boxed", r"so \boxed{\frac{1}{2}} hence \boxed{x^{2}}", "x^{2}"),
        ("boxed", r"\boxed{3", None),
        ("boxed", "no box", None),
        ("last_line", "work\n\n 17 \n\n", "17"),
        ("last_line", "", None),
    ],
)
def test_answer_formats(fmt, completion, answer):
    assert extract_answer(completion, fmt) == answer


def test_the_answer_format_is_what_the_task_scores():
    task = small_task(answer_format="answer_tag")
    ex = task.eval()[0]
    a = ex.answer
    assert task.is_correct(f"<think>easy</think><answer>{a}</answer>", ex)
    assert not task.is_correct(a, ex)  # right number, no tag


def test_demonstrations_follow_the_template_and_flaws_are_off_by_1_or_10():
    clean = small_task(demonstration_template="<think></think><answer>{answer}</answer>")
    assert all(
        ex.demonstration == f"<think></think><answer>{ex.answer}</answer>" for ex in clean.train()
    )
    flawed = small_task(flawed_demo_fraction=0.5)
    offs = collections.Counter(int(ex.demonstration) - int(ex.answer) for ex in flawed.train())
    assert set(offs) <= {0, -1, 1, -10, 10}
    n_flawed = sum(v for k, v in offs.items() if k)
    assert 100 <= n_flawed <= 200  # 300 demonstrations, p = 0.5: 150 +- 4.3 sd
    # the answers (what rewards and eval check) stay true; eval has no flawed demonstration
    assert [e.answer for e in flawed.train()] == [e.answer for e in small_task().train()]
    assert all(ex.demonstration == ex.answer for ex in flawed.eval())
    # seeded
    again = small_task(flawed_demo_fraction=0.5)
    assert [e.demonstration for e in again.train()] == [e.demonstration for e in flawed.train()]


def test_flawed_demonstrations_keep_non_integer_answers():
    task = ReasoningGymTask(
        dataset="spell_backward", train_size=30, eval_size=5, flawed_demo_fraction=1.0
    )
    assert all(e.demonstration == e.answer for e in task.train())  # words: nothing to shift


def test_the_mix_follows_its_weights():
    task = ReasoningGymTask(
        datasets={"chain_sum": {"weight": 1}, "basic_arithmetic": {"weight": 3}},
        train_size=800,
        eval_size=50,
    )
    counts = collections.Counter(
        e.meta["entry"]["metadata"]["source_dataset"] for e in task.train()
    )
    # binomial(800, 3/4): mean 600, sd 12.2; equal weights would give 400
    assert set(counts) == {"chain_sum", "basic_arithmetic"}
    assert abs(counts["basic_arithmetic"] - 600) < 50
    # each item is scored by its own dataset's scorer
    for ex in task.eval()[:10]:
        assert task.score(ex.answer, ex) == 1.0


# ---------------------------------------------------------------- model output is never run


def test_an_evaluating_scorer_never_sees_code(tmp_path, monkeypatch):
    """countdown's score_answer hands the answer to sympy's parse_expr, which runs eval: a
    payload given to it directly creates the marker; through the task it is no answer."""
    monkeypatch.chdir(tmp_path)
    task = ReasoningGymTask(dataset="countdown", train_size=5, eval_size=5)
    ex = task.eval()[0]
    payload = "__import__('os').system('touch PWNED')"
    floor = task.dataset.score_answer(None, ex.meta["entry"])
    assert task.score(payload, ex) == floor
    assert not (tmp_path / "PWNED").exists()
    task.dataset.score_answer(payload, ex.meta["entry"])  # what the guard prevents
    assert (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("6*(98 - 54) - 34 - 66", True),
        ("623128*y**6 - 1083174*y**5", True),
        ("-5*X**9 - 2*X**6/3 + C", True),
        ("['a', 'b']", True),
        ("[[1, 0], [0, 1]]", True),
        ("-4*(-2*x - 8)**(3/2)/3 + C", True),
        ("-exp(x)*sin(x) + exp(x)*cos(x) + C", True),
        ("exit()", False),
        ("sin(x, **k)", False),
        ("sin(*x)", False),
        ("sin(x=1)", False),
        ("(sin)(x).__class__", False),
        ("__import__('os')", False),
        ("open('f', 'w')", False),
        ("x.__class__", False),
        ("(1).real", False),
        ("[c for c in 'ab']", False),
        ("lambda: 1", False),
        ("9**9**9", False),
        ("(9**99)**99", False),
        ("2**1000", False),
        ("1" * 101, False),
        ("_x", False),
        ("1 +", False),
        ("(" * 5000 + ")" * 5000, False),
        # a short text that repeats a sequence: gigabytes under eval (parse_expr's Integer has
        # __index__, so 'a' * Integer(10**9) repeats too)
        ("[0]*10**9", False),
        ("10**9*[0]", False),
        ("(1,)*10**9", False),
        ("'ab'*10**9", False),
        ("([0]+[1])*10**9", False),
        ("[[0]*10**4]*10**4", False),
        ("[1*2, 3]", True),  # a product inside a list is a number
    ],
)
def test_is_plain_expression(text, plain):
    assert is_plain_expression(text) is plain


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("spiral_matrix", "[0]*10**9"),
        ("countdown", "'a'*10**9"),
        ("string_insertion", "'ab'*10**9"),
    ],
)
def test_an_evaluating_scorer_never_sees_a_repeated_sequence(name, answer, monkeypatch):
    """A dozen characters that make eval build a list or string of a billion items (gigabytes,
    then minutes of joining them) are scored as no answer: the scorer sees None."""
    task = ReasoningGymTask(dataset=name, train_size=3, eval_size=3)
    seen = []
    monkeypatch.setattr(task.dataset, "score_answer", lambda a, entry: seen.append(a) or 0.0)
    task.score(answer, task.eval()[0])
    assert seen == [None]


@pytest.mark.parametrize(
    ("source", "answer", "safe"),
    [
        ("binary_matrix", "1 0\n0 1", True),  # not Python: eval stops at the syntax error
        ("binary_matrix", "[[1, 0], [0, 1]]", True),
        ("binary_matrix", " __import__('os')", False),  # eval strips the leading space
        ("spiral_matrix", "\n __import__('os')", False),  # its scorer strips, then evals
        ("countdown", "3 ! 4", False),  # parse_expr would rewrite it into a call
        ("chain_sum", "__import__('os')", True),  # its scorer compares text
    ],
)
def test_is_safe_for(source, answer, safe):
    assert is_safe_for(source, answer) is safe


def test_the_gold_answers_of_every_guarded_dataset_still_score_1():
    for name in sorted(EVALUATING_SCORERS):
        task = ReasoningGymTask(dataset=name, train_size=3, eval_size=3)
        assert [task.score(e.answer, e) for e in task.eval()] == [1.0] * 3, name


def test_every_scorer_that_evaluates_in_the_installed_version_is_guarded():
    pattern = re.compile(r"\beval\(|parse_expr|sympify|\bexec\(")
    found = {
        name
        for name, (cls, _) in rg.factory.DATASETS.items()
        if "score_answer" in cls.__dict__ and pattern.search(inspect.getsource(cls.score_answer))
    }
    assert found <= EVALUATING_SCORERS, sorted(found - EVALUATING_SCORERS)


# ---------------------------------------------------------------- errors before compute


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"dataset": "chain_summ"},
            r"task.dataset='chain_summ' is not a reasoning-gym dataset; did you mean chain_sum",
        ),
        ({"dataset": "nope"}, r"is not a reasoning-gym dataset; \d+ are available, e.g. "),
        (
            {"config": {"min_termz": 2}},
            r"task.config has \['min_termz'\], which chain_sum's config does not take; allowed keys: .*min_terms",
        ),
        ({"config": {"min_terms": 0}}, r"task.config=\{'min_terms': 0\} is invalid for chain_sum"),
        ({"config": {"seed": 1}}, r"grpo_lab sets them"),
        ({"dataset": None}, r"task.dataset and task.datasets are both empty"),
        (
            {"datasets": {"chain_sum": {"weight": 0}}},
            r"task.datasets.chain_sum.weight=0 is invalid",
        ),
        ({"datasets": {"chain_sum": {"wieght": 1}}}, r"task.datasets.chain_sum has \['wieght'\]"),
        ({"datasets": {"bogus": {}}}, r"task.datasets='bogus' is not a reasoning-gym dataset"),
        (
            {"answer_format": "xml"},
            r"task.answer_format='xml' is invalid; allowed: raw, answer_tag, boxed, last_line",
        ),
        ({"demonstration_template": "<answer></answer>"}, r"has no \{answer\} placeholder"),
        ({"flawed_demo_fraction": 2}, r"task.flawed_demo_fraction=2 is invalid"),
    ],
)
def test_bad_config_is_a_clear_error(kw, message):
    args = {"dataset": "chain_sum", "train_size": 5, "eval_size": 5, **kw}
    with pytest.raises(ValueError, match=message):
        ReasoningGymTask(**args)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(ImportError, match=r"pip install 'grpo-lab\[reasoning\]'"):
        ReasoningGymTask(dataset="chain_sum")


def test_the_reward_needs_the_reasoning_gym_task():
    task = ArithmeticTask(max_operand=9, eval_size=10)
    with pytest.raises(ValueError, match="needs task=reasoning_gym"):
        reasoning_gym_reward(["1"], [Example(prompt="1+0=", answer="1")], task=task)


def test_the_shipped_config_composes_and_builds():
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "task=reasoning_gym",
                "reward=reasoning_gym",
                "task.config={min_terms: 2, max_terms: 2}",
                "task.train_size=20",
                "task.eval_size=5",
            ],
        )
    task = instantiate(cfg.task)
    assert isinstance(task, ReasoningGymTask) and len(task.train()) == 20


# ---------------------------------------------------------------- through the real CLI

FAST_RG = [o for o in FAST if not o.startswith("task.")] + [
    "task=reasoning_gym",
    "task.train_size=60",
    "task.eval_size=8",
    "sft.steps=3",
    "reward=[reasoning_gym,format]",
]


def _metrics(tracking_uri: str) -> dict[str, float]:
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("grpo_lab").experiment_id])
    assert run.info.status == "FINISHED"
    return run.data.metrics


@pytest.mark.slow
@pytest.mark.parametrize(
    "task",
    [
        ["task.dataset=chain_sum", "task.config={min_terms: 2, max_terms: 2, max_digits: 1}"],
        [
            "task.dataset=basic_arithmetic",
            "task.config={min_terms: 2, max_terms: 2, max_digits: 1}",
        ],
        [
            "task.datasets={chain_sum: {weight: 1, config: {max_terms: 2}}, "
            "basic_arithmetic: {weight: 2, config: {max_terms: 2}}}"
        ],
    ],
    ids=["chain_sum", "basic_arithmetic", "mix"],
)
def test_cli_trains_two_rollouts_on_reasoning_gym(run_cli, tracking_uri, task):
    run_cli("train", *FAST_RG, *task)
    m = _metrics(tracking_uri)
    assert 0.0 <= m["eval/accuracy"] <= 1.0
    assert 0.0 <= m["rewards/reasoning_gym/mean"] <= 1.0
    assert m["rollout"] == 2


@pytest.mark.slow
def test_cli_bad_dataset_name_exits_2_with_the_message_alone(run_cli):
    proc = run_cli("train", *FAST_RG, "task.dataset=chain_summ", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "did you mean chain_sum" in proc.stderr and "Traceback" not in proc.stderr
