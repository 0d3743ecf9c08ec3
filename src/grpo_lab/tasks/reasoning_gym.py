"""Any of reasoning-gym's procedural datasets (or a weighted mix) as a task, scored by the
dataset's own ``score_answer(answer, entry)``.

reasoning-gym (https://github.com/open-thought/reasoning-gym, ``pip install 'grpo-lab[reasoning]'``)
generates item ``i`` of a dataset from ``Random(seed + i)``: two datasets whose seeds differ by
k share items shifted by k indices. So train and eval come from *one* seeded dataset, eval
from its first indices and train from the ones after, and any train item whose question text
is an eval question is dropped (procedural generators repeat small problems).

Some of reasoning-gym's scorers run the answer through Python's ``eval`` or sympy's
``parse_expr`` (which calls ``eval``): ``EVALUATING_SCORERS``. Model output is untrusted, so an
answer for those datasets must first pass ``is_safe_for`` (a plain expression: numbers, names,
strings, ``+ - * / **``, lists, no calls, attributes or subscripts; or, for bare ``eval``, text
that is not Python at all); any other answer is scored as no answer
(``score_answer(None, entry)``), and so is any answer longer than ``max_answer_chars``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import logging
import random
import re
from collections.abc import Mapping
from typing import Any

from grpo_lab.tasks.base import Example

log = logging.getLogger(__name__)

INSTALL = "pip install 'grpo-lab[reasoning]'"
ANSWER_FORMATS = ("raw", "answer_tag", "boxed", "last_line")

# Datasets of reasoning-gym 0.1.25 whose score_answer runs the answer through Python's eval()
# or sympy's parse_expr (which rewrites tokens, then calls eval), found by reading each
# score_answer; tests/test_reasoning_gym.py re-reads them and fails when an installed version
# adds one that is not listed here.
EVAL_SCORERS = frozenset(
    {
        "binary_matrix",
        "n_queens",
        "number_sorting",  # evals the gold answer only, today; guarded all the same
        "spiral_matrix",
        "string_insertion",
    }
)
PARSE_EXPR_SCORERS = frozenset(
    {
        "countdown",
        "intermediate_integration",
        "polynomial_multiplication",
        "puzzle24",
        "simple_integration",
    }
)
EVALUATING_SCORERS = EVAL_SCORERS | PARSE_EXPR_SCORERS

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INT = re.compile(r"-?[0-9]+")  # ASCII digits only, as the other tasks parse integers
_PLAIN_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Constant,
    ast.Name,
    ast.List,
    ast.Tuple,
    ast.Load,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.Pow,
    ast.UAdd,
    ast.USub,
    ast.Call,  # of MATH_FUNCTIONS only, checked below
)
# Functions a plain expression may call (reasoning-gym's integration answers use them); sympy's
# parse_expr maps each name to sympy's function of that name.
MATH_FUNCTIONS = frozenset(
    {"sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "exp", "log", "sqrt"}
)


def _require_reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError(f"task=reasoning_gym needs reasoning-gym: {INSTALL}") from None
    return reasoning_gym


def _plain(value: Any) -> Any:
    """A config value as plain dicts and lists (Hydra hands DictConfig/ListConfig down)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


# ---------------------------------------------------------------- answers out of completions


def _last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (nested braces balanced), or None.

    One backward search and one forward scan: linear in the completion's length.
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None  # unclosed


def extract_answer(completion: str, answer_format: str) -> str | None:
    """The answer a completion states under ``answer_format``, or None when it states none.

    raw: the whole completion, stripped. answer_tag: the last ``<answer>...</answer>``.
    boxed: the last ``\\boxed{...}``. last_line: the last non-empty line. An empty answer is None.
    """
    if answer_format == "raw":
        answer = completion.strip()
    elif answer_format == "answer_tag":
        matches = _ANSWER_TAG.findall(completion)
        answer = matches[-1].strip() if matches else ""
    elif answer_format == "boxed":
        answer = _last_boxed(completion) or ""
    elif answer_format == "last_line":
        lines = [line.strip() for line in completion.splitlines() if line.strip()]
        answer = lines[-1] if lines else ""
    else:
        raise ValueError(
            f"task.answer_format={answer_format!r} is invalid; allowed: {', '.join(ANSWER_FORMATS)}"
        )
    return answer or None


def is_plain_expression(text: str, max_chars: int = 2000) -> bool:
    """True when ``text`` is a Python expression that evaluating cannot turn into an action
    or a huge computation: numbers (at most 100 digits), strings (at most 100 characters),
    names not starting with ``_``, ``+ - * / **``, unary signs, lists and tuples, and calls of
    ``MATH_FUNCTIONS`` by name with positional arguments. A power's exponent must be an
    integer literal of at most 100, or a fraction of two such (``(3/2)``), and its base must
    hold no power. No product or power of a list, tuple or string (``[0]*10**9`` is a dozen
    characters and gigabytes under eval). No other calls, no attributes, subscripts,
    comprehensions or lambdas.
    """
    if len(text) > max_chars:
        return False
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _PLAIN_NODES):
            return False
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            return False
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name)
            and node.func.id in MATH_FUNCTIONS
            and not node.keywords
            and not any(isinstance(a, ast.Starred) for a in node.args)
        ):
            return False
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, int | float | str):
                return False
            if isinstance(v, str) and len(v) > 100:
                return False
            if isinstance(v, int) and abs(v) >= 10**100:
                return False
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Mult | ast.Pow)
            and any(_holds_sequence(side) for side in (node.left, node.right))
        ):
            return False
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            if not _small_exponent(node.right):
                return False
            if any(
                isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) for n in ast.walk(node.left)
            ):
                return False
    return True


def is_safe_for(source: str | None, answer: str) -> bool:
    """True when the dataset's scorer may see ``answer``: always, unless it evaluates answers.

    For eval() scorers, an answer that is not Python at all is safe too (eval stops at the
    syntax error before running anything; eval strips leading spaces and tabs, so the check
    does). sympy's parse_expr rewrites tokens first (``3!`` becomes a call), so its scorers
    get plain expressions only.
    """
    if source in PARSE_EXPR_SCORERS:
        return is_plain_expression(answer)
    if source in EVAL_SCORERS:
        # what eval sees: the answer as given (eval strips spaces and tabs) or stripped (some
        # scorers strip it first: "\n code" is an indentation error, "code" is not)
        for text in {answer.lstrip(" \t"), answer.strip()}:
            try:
                compile(text, "<answer>", "eval", ast.PyCF_ONLY_AST)
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                continue
            if not is_plain_expression(text):
                return False
        return True
    return True


def _holds_sequence(node: ast.AST) -> bool:
    """Whether a list, tuple or string appears in ``node`` outside any call (a product of it
    repeats it; a math function's result is a number)."""
    if isinstance(node, ast.List | ast.Tuple) or (
        isinstance(node, ast.Constant) and isinstance(node.value, str)
    ):
        return True
    if isinstance(node, ast.BinOp):
        return _holds_sequence(node.left) or _holds_sequence(node.right)
    if isinstance(node, ast.UnaryOp):
        return _holds_sequence(node.operand)
    return False


def _small_exponent(node: ast.AST) -> bool:
    """An integer literal of at most 100 (signed), or a fraction of two such."""
    if isinstance(node, ast.UnaryOp):
        node = node.operand
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return _small_exponent(node.left) and _small_exponent(node.right)
    return isinstance(node, ast.Constant) and type(node.value) is int and node.value <= 100


def flawed_answer(answer: str, rng: random.Random) -> str:
    """An integer answer off by -10, -1, +1 or +10 (seeded); any other answer unchanged."""
    text = answer.strip()
    if not _INT.fullmatch(text):
        return answer
    return str(int(text) + rng.choice((-10, -1, 1, 10)))


# ---------------------------------------------------------------- building the datasets


def _dataset_names(rg: Any) -> list[str]:
    return sorted(n for n in rg.factory.DATASETS if n != "composite")


def _check_name(rg: Any, name: str, key: str) -> None:
    names = _dataset_names(rg)
    if name in names:
        return
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(
        f"{key}={name!r} is not a reasoning-gym dataset; {hint}{len(names)} are available, "
        f"e.g. {', '.join(names[:8])} (all: python -c 'import reasoning_gym.factory as f; "
        "print(sorted(f.DATASETS))')"
    )


def _check_config(rg: Any, name: str, config: Mapping[str, Any], key: str) -> None:
    """Unknown keys and values the dataset's own ``validate`` rejects, named before any compute."""
    _, config_cls = rg.factory.DATASETS[name]
    fields = [f.name for f in dataclasses.fields(config_cls)]
    reserved = sorted({"seed", "size"} & set(config))
    if reserved:
        raise ValueError(
            f"{key} sets {reserved}: grpo_lab sets them (task.seed, task.train_size + "
            "task.eval_size); leave them out"
        )
    unknown = sorted(set(config) - set(fields))
    if unknown:
        allowed = [f for f in fields if f not in ("seed", "size")]
        raise ValueError(
            f"{key} has {unknown}, which {name}'s config does not take; allowed keys: "
            f"{', '.join(allowed)}"
        )
    try:
        cfg = config_cls(**config)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except (AssertionError, ValueError, TypeError) as err:
        raise ValueError(f"{key}={dict(config)!r} is invalid for {name}: {err}") from None


def build_dataset(
    dataset: str | None,
    config: Mapping[str, Any] | None,
    datasets: Mapping[str, Any] | None,
    seed: int,
    size: int,
) -> Any:
    """One reasoning-gym dataset of ``size`` items, or its composite over ``datasets``.

    datasets: name -> {weight: w (default 1), config: {...}}; when set, it replaces ``dataset``
    and the composite draws each item's source dataset with these weights (reasoning-gym's
    ``CompositeDataset``).
    """
    rg = _require_reasoning_gym()
    config, datasets = _plain(config) or {}, _plain(datasets) or {}
    if not dataset and not datasets:
        raise ValueError(
            "task.dataset and task.datasets are both empty: give a reasoning-gym dataset name "
            "(task.dataset=chain_sum) or a mix (task.datasets={name: {weight: w, config: {...}}})"
        )
    if not datasets:
        _check_name(rg, dataset, "task.dataset")
        _check_config(rg, dataset, config, "task.config")
        return rg.create_dataset(dataset, seed=seed, size=size, **config)
    if config:
        raise ValueError(
            "task.config applies to task.dataset; with task.datasets give each its own "
            "config (task.datasets.<name>.config)"
        )
    from reasoning_gym.composite import DatasetSpec

    specs = []
    for name, spec in datasets.items():
        spec = spec or {}
        key = f"task.datasets.{name}"
        _check_name(rg, name, "task.datasets")
        unknown = sorted(set(spec) - {"weight", "config"})
        if unknown:
            raise ValueError(f"{key} has {unknown}; allowed keys: weight, config")
        weight = spec.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ValueError(f"{key}.weight={weight!r} is invalid: expected a number > 0")
        sub = spec.get("config") or {}
        _check_config(rg, name, sub, f"{key}.config")
        specs.append(DatasetSpec(name=name, weight=float(weight), config=dict(sub)))
    return rg.create_dataset("composite", seed=seed, size=size, datasets=specs)


def split_entries(
    ds: Any, train_size: int, eval_size: int, max_draws: int
) -> tuple[list[dict], list[dict]]:
    """(train, eval) entries of one dataset: eval = the first ``eval_size`` distinct
    questions, train = the next ``train_size`` items whose question is not an eval question.

    Raises when ``max_draws`` items do not give that many (the problem space is too small).
    """
    eval_entries: list[dict] = []
    train_entries: list[dict] = []
    eval_questions: set[str] = set()
    for i in range(max_draws):
        if len(train_entries) == train_size:
            break
        entry = ds[i]
        question = entry["question"]
        if len(eval_entries) < eval_size:
            if question not in eval_questions:
                eval_questions.add(question)
                eval_entries.append(entry)
        elif question not in eval_questions:
            train_entries.append(entry)
    else:
        raise ValueError(
            f"task.train_size={train_size} and task.eval_size={eval_size}: {max_draws} generated "
            f"items gave {len(eval_entries)} distinct eval questions and {len(train_entries)} "
            "train items outside them; the dataset's config allows too few distinct questions "
            "(lower the sizes or widen task.config)"
        )
    return train_entries, eval_entries


class ReasoningGymTask:
    """A reasoning-gym dataset (``dataset`` + ``config``) or a weighted mix (``datasets``).

    train_size / eval_size: items in each split; they share no question (exact text).
    prompt_template: the prompt, with ``{question}`` replaced by the entry's question.
    system_prompt: kept as ``task.system_prompt`` for prompt rendering (chat templates).
    answer_format: how a completion's answer is found (``extract_answer``).
    demonstration_template: the SFT target, with ``{answer}`` replaced by the entry's answer
      (e.g. ``<think></think><answer>{answer}</answer>``).
    flawed_demo_fraction: fraction of train demonstrations whose integer answer is off by
      +-1 or +-10 (seeded; non-integer answers are kept), as in the arithmetic task: an
      imperfect warm start that the reward, which checks the true answer, can correct.
    correct_threshold: a completion is correct when ``score_answer`` gives at least this.
    max_answer_chars: a longer parsed answer is scored as no answer.
    """

    name = "reasoning_gym"

    def __init__(
        self,
        dataset: str | None = None,
        config: Mapping[str, Any] | None = None,
        datasets: Mapping[str, Any] | None = None,
        train_size: int = 2000,
        eval_size: int = 200,
        seed: int = 0,
        prompt_template: str = "{question}",
        system_prompt: str | None = None,
        answer_format: str = "raw",
        demonstration_template: str = "{answer}",
        flawed_demo_fraction: float = 0.0,
        correct_threshold: float = 1.0,
        max_answer_chars: int = 2000,
    ) -> None:
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"task.answer_format={answer_format!r} is invalid; allowed: {', '.join(ANSWER_FORMATS)}"
            )
        if "{question}" not in prompt_template:
            raise ValueError(
                f"task.prompt_template={prompt_template!r} has no {{question}} placeholder"
            )
        if "{answer}" not in demonstration_template:
            raise ValueError(
                f"task.demonstration_template={demonstration_template!r} has no {{answer}} placeholder"
            )
        if not 0.0 <= flawed_demo_fraction <= 1.0:
            raise ValueError(
                f"task.flawed_demo_fraction={flawed_demo_fraction} is invalid; allowed: [0, 1]"
            )
        if train_size < 1 or eval_size < 1:
            raise ValueError(
                f"task.train_size={train_size}, task.eval_size={eval_size}: both must be >= 1"
            )
        self.answer_format = answer_format
        self.system_prompt = system_prompt
        self.correct_threshold = float(correct_threshold)
        self.max_answer_chars = max_answer_chars
        total = train_size + eval_size
        max_draws = 20 * total + 1000
        self.dataset = build_dataset(dataset, config, datasets, seed, max_draws)
        train, held_out = split_entries(self.dataset, train_size, eval_size, max_draws)
        rng = random.Random(seed)

        def example(entry: dict, flawed: bool) -> Example:
            answer = str(entry["answer"])
            shown = flawed_answer(answer, rng) if flawed else answer
            return Example(
                prompt=prompt_template.replace("{question}", entry["question"]),
                answer=answer,
                demonstration=demonstration_template.replace("{answer}", shown),
                meta={"entry": entry},
            )

        self._eval = [example(e, False) for e in held_out]
        self._train = [example(e, rng.random() < flawed_demo_fraction) for e in train]

    def train(self) -> list[Example]:
        return self._train

    def eval(self) -> list[Example]:
        return self._eval

    def parse_answer(self, completion: str) -> str | None:
        return extract_answer(completion, self.answer_format)

    def score(self, completion: str, example: Example) -> float:
        """The dataset's own ``score_answer`` on the parsed answer (an answer it must not
        evaluate, or one over ``max_answer_chars``, is scored as no answer)."""
        entry = example.meta["entry"]
        answer = self.parse_answer(completion)
        source = entry["metadata"].get("source_dataset")
        if answer is not None and (
            len(answer) > self.max_answer_chars or not is_safe_for(source, answer)
        ):
            answer = None
        try:
            return float(self.dataset.score_answer(answer, entry))
        except Exception as err:  # a scorer that fails on a model answer: that answer scores 0
            log.debug("reasoning-gym %s score_answer raised %r", source, err)
            return 0.0

    def is_correct(self, completion: str, example: Example) -> bool:
        return self.score(completion, example) >= self.correct_threshold


def reasoning_gym_reward(
    completions: list[str], examples: list[Example], task: Any = None, **_: Any
) -> list[float]:
    """The reasoning-gym dataset's own ``score_answer`` of each completion (partial credit
    kept: countdown gives 0.05 for a wrong expression), via ``task.score``."""
    if not isinstance(task, ReasoningGymTask):
        raise ValueError(
            "reward=reasoning_gym scores with the task's reasoning-gym dataset; it needs "
            f"task=reasoning_gym (got {getattr(task, 'name', type(task).__name__)!r})"
        )
    return [task.score(c, ex) for c, ex in zip(completions, examples, strict=True)]
