"""A reasoning-gym dataset as a user brings it to grpo_lab: JSONL files and a task that scores
with the dataset's own ``score_answer`` (issue 14, "a learning result on a task nobody here wrote").

    python benchmarks/rg_workload.py DIR --dataset chain_sum --config min_terms=2 max_terms=2 \
        min_digits=2 max_digits=2 --flawed-fraction 0.5 --offsets -10 10
    PYTHONPATH=benchmarks grpo-lab train task=jsonl task._target_=rg_workload.ReasoningGymJsonl \
        +task.dataset=chain_sum task.path=DIR/train.jsonl task.eval_path=DIR/eval.jsonl \
        task.demonstration_field=demonstration

Each record holds the short prompt the tiny policy sees (the entry's expression without spaces,
then ``=``: ``37-45=``; reasoning-gym's instruction, ``State the final answer to the following
arithmetic problem:``, is dropped to keep SFT and sampling cheap), reasoning-gym's answer, the
SFT demonstration (the answer, or for a seeded ``flawed_fraction`` of the training records the
answer plus one of the signed ``offsets``, picked at random) and the whole entry, which
``ReasoningGymJsonl.is_correct`` hands to ``score_answer``. Train and eval are drawn with
different seeds and are disjoint by expression (``a+b`` and ``b+a`` count as one).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grpo_lab.tasks.base import Example
from grpo_lab.tasks.jsonl import JsonlTask, read_records

TRAIN_SEED, EVAL_SEED = 1, 2  # reasoning-gym seeds of the two draws


def short_prompt(entry: dict[str, Any]) -> str:
    """``37 - 45`` -> ``37-45=``: the expression alone, spaces dropped (arithmetic datasets)."""
    expr = entry["metadata"].get("expression")
    if expr is None:
        raise ValueError(
            f"entry of {entry['metadata'].get('source_dataset')!r} has no metadata['expression']: "
            "only arithmetic datasets (chain_sum, basic_arithmetic) have a short rendering"
        )
    return re.sub(r"\s+", "", expr) + "="


def expression_key(prompt: str) -> str:
    """The held-out unit: ``a+b`` and ``b+a`` are one question (the sum is symmetric)."""
    parts = prompt.rstrip("=").split("+")
    return "+".join(sorted(parts)) if len(parts) == 2 and "-" not in prompt else prompt


def flawed(answer: str, offsets: Sequence[int], rng: random.Random) -> str:
    """The integer answer plus one of ``offsets`` (signed: ``-10 10`` is off by 10 either way)."""
    return str(int(answer) + rng.choice(offsets))


def draw(dataset: str, config: dict[str, Any], size: int, seed: int) -> list[dict[str, Any]]:
    import reasoning_gym

    return list(reasoning_gym.create_dataset(dataset, size=size, seed=seed, **config))


def make_files(
    out: Path,
    dataset: str,
    config: dict[str, Any],
    num_train: int,
    num_eval: int,
    flawed_fraction: float,
    offsets: Sequence[int],
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``out/train.jsonl`` and ``out/eval.jsonl``; returns their paths.

    Eval: ``num_eval`` distinct expressions of reasoning-gym seed EVAL_SEED. Train: entries of
    seed TRAIN_SEED whose expression is not in eval (duplicates kept, as the dataset draws them),
    ``num_train`` of them. ``seed`` picks which demonstrations are flawed and how.
    """
    if not 0.0 <= flawed_fraction <= 1.0:
        raise ValueError(f"flawed_fraction={flawed_fraction} is invalid: expected 0 <= f <= 1")
    if flawed_fraction and not offsets:
        raise ValueError(f"flawed_fraction={flawed_fraction} needs offsets (e.g. -10 10)")
    eval_entries, seen = [], set()
    for entry in draw(dataset, config, 4 * num_eval, EVAL_SEED):
        key = expression_key(short_prompt(entry))
        if key not in seen and len(eval_entries) < num_eval:
            seen.add(key)
            eval_entries.append(entry)
    train_entries = [
        e
        for e in draw(dataset, config, 2 * num_train, TRAIN_SEED)
        if expression_key(short_prompt(e)) not in seen
    ][:num_train]
    if len(train_entries) < num_train or len(eval_entries) < num_eval:
        raise ValueError(
            f"{dataset} with {config} has too few distinct questions for {num_train} train and "
            f"{num_eval} eval records: got {len(train_entries)} and {len(eval_entries)}"
        )
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, entries, f in (("train", train_entries, flawed_fraction), ("eval", eval_entries, 0)):
        path = out / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for entry in entries:
                answer = entry["answer"]
                demo = flawed(answer, offsets, rng) if rng.random() < f else answer
                rec = {"prompt": short_prompt(entry), "answer": answer, "demonstration": demo}
                fh.write(json.dumps({**rec, "entry": entry}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


class ReasoningGymJsonl(JsonlTask):
    """``JsonlTask`` over files from ``make_files``, scored by reasoning-gym's ``score_answer``.

    A completion is correct when ``score_answer(parsed completion, entry) == 1.0`` (its
    partial credit, e.g. 0.5 for ``-4`` against ``4``, counts as wrong). Completions are only
    parsed (stripped) and handed to reasoning-gym, never run.
    """

    name = "reasoning_gym_jsonl"

    def __init__(self, dataset: str, **kwargs: Any) -> None:
        import reasoning_gym

        super().__init__(**kwargs)
        self.dataset = reasoning_gym.create_dataset(dataset, size=1, seed=0)

    def _load(self, path: Path) -> list[Example]:
        examples = super()._load(path)
        entries = [rec["entry"] for _, rec in read_records(path)]
        return [
            Example(ex.prompt, ex.answer, ex.demonstration, meta={"entry": entry})
            for ex, entry in zip(examples, entries, strict=True)
        ]

    def is_correct(self, completion: str, example: Example) -> bool:
        answer = self.parse_answer(completion)
        return self.dataset.score_answer(answer, example.meta["entry"]) == 1.0


def parse_config(items: list[str]) -> dict[str, Any]:
    """``["min_terms=2", "allow_negation=false"]`` -> ``{"min_terms": 2, "allow_negation": False}``."""
    config = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--config item {item!r} is invalid: expected KEY=VALUE")
        config[key] = json.loads(value.lower() if value.lower() in ("true", "false") else value)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dataset", default="chain_sum")
    parser.add_argument("--config", nargs="*", default=[], help="dataset config, KEY=VALUE")
    parser.add_argument("--num-train", type=int, default=9000)
    parser.add_argument("--num-eval", type=int, default=500)
    parser.add_argument("--flawed-fraction", type=float, default=0.5)
    parser.add_argument("--offsets", type=int, nargs="*", default=[-10, 10])
    args = parser.parse_args()
    train, evals = make_files(
        args.out,
        args.dataset,
        parse_config(args.config),
        args.num_train,
        args.num_eval,
        args.flawed_fraction,
        args.offsets,
    )
    print(train, evals)


if __name__ == "__main__":
    main()
