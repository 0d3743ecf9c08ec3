"""Prompts and answers from your own file: JSON Lines (``.jsonl``) or Parquet (``.parquet``).

Field names are configurable. The eval split is a second file (``eval_path``) or a seeded
held-out fraction of the first. Parquet needs pyarrow (``pip install grpo-lab[parquet]``).
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

from grpo_lab.tasks.base import Example

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"task.path={str(path)!r} is a Parquet file, which needs pyarrow: "
            "pip install grpo-lab[parquet]"
        ) from None
    return [(f"row {i + 1}", rec) for i, rec in enumerate(pq.read_table(path).to_pylist())]


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return records


def last_match(pattern: re.Pattern, text: str) -> str | None:
    """The stripped last match of ``pattern`` in ``text`` (its group 1 if it has groups), or None."""
    last = None
    for last in pattern.finditer(text):  # noqa: B007 -- only the last one is kept
        pass
    if last is None:
        return None
    value = last.group(1) if pattern.groups else last.group(0)
    return None if value is None else value.strip()  # None: an optional group that took no part


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """(where, record) pairs of a JSONL or Parquet file; ``where`` is "line N" or "row N"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path)
    raise ValueError(
        f"task data file {str(path)!r} has suffix {suffix!r}; allowed: "
        f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
    )


class JsonlTask:
    """A task read from a local file.

    path: the training file (.jsonl or .parquet). eval_path: a separate eval file; when
    null, ``eval_fraction`` of ``path`` (seeded shuffle) is held out instead.
    prompt_field / answer_field / demonstration_field: record keys (demonstration optional).
    system_prompt: kept as ``task.system_prompt`` for prompt rendering (chat templates).
    answer_pattern: a regex whose last match (group 1 if it has groups) is a completion's
    answer; null = the whole stripped completion.
    """

    name = "jsonl"

    def __init__(
        self,
        path: str,
        eval_path: str | None = None,
        eval_fraction: float = 0.1,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        demonstration_field: str | None = None,
        system_prompt: str | None = None,
        answer_pattern: str | None = None,
        seed: int = 0,
    ) -> None:
        self.fields = {"prompt_field": prompt_field, "answer_field": answer_field}
        if demonstration_field:
            self.fields["demonstration_field"] = demonstration_field
        self.system_prompt = system_prompt
        try:
            self._pattern = re.compile(answer_pattern) if answer_pattern else None
        except re.error as err:
            raise ValueError(
                f"task.answer_pattern={answer_pattern!r} is not a valid regex: {err}"
            ) from None
        # where the data came from (the MLflow run's dataset source)
        self.data_source = str(Path(path).resolve())
        self.eval_source = str(Path(eval_path).resolve()) if eval_path else self.data_source
        train = self._load(Path(path))
        if eval_path:
            self._train, self._eval = train, self._load(Path(eval_path))
            return
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(
                f"task.eval_fraction={eval_fraction} is invalid; allowed: a number in (0, 1) "
                "(or give task.eval_path)"
            )
        n_eval = math.ceil(eval_fraction * len(train))
        if len(train) - n_eval < 1:
            raise ValueError(
                f"{path} has {len(train)} records; with task.eval_fraction={eval_fraction} none is "
                "left for training (add records, lower eval_fraction or give task.eval_path)"
            )
        random.Random(seed).shuffle(train)
        self._eval, self._train = train[:n_eval], train[n_eval:]

    def _load(self, path: Path) -> list[Example]:
        examples = []
        for where, rec in read_records(path):
            if not isinstance(rec, dict):
                raise ValueError(
                    f"{path}, {where}: expected an object with fields, got {type(rec).__name__}"
                )
            values = {}
            for key, field in self.fields.items():
                if field not in rec or rec[field] is None:
                    raise ValueError(
                        f"{path}, {where}: record has no field {field!r} (task.{key}={field!r}); "
                        f"fields present: {sorted(rec)}"
                    )
                values[key] = str(rec[field])
            examples.append(
                Example(
                    prompt=values["prompt_field"],
                    answer=values["answer_field"],
                    demonstration=values.get("demonstration_field"),
                )
            )
        if not examples:
            raise ValueError(f"{path} has no records")
        return examples

    def train(self) -> list[Example]:
        return self._train

    def eval(self) -> list[Example]:
        return self._eval

    def parse_answer(self, completion: str) -> str | None:
        if self._pattern is None:
            text = completion.strip()
            return text or None
        return last_match(self._pattern, completion)

    def is_correct(self, completion: str, example: Example) -> bool:
        return self.parse_answer(completion) == example.answer.strip()
