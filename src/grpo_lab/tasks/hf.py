"""Prompts and answers from a Hugging Face ``datasets`` dataset (``pip install 'grpo-lab[hf]'``).

``task.path`` is what ``datasets.load_dataset`` takes: a hub id (``openai/gsm8k`` with
``task.name=main``), or a builder with local files (``task.path=json``/``parquet``/``csv`` and
``task.data_files=...``). A directory written by ``save_to_disk`` is read with ``load_from_disk``.

The eval split is the dataset's own test split (``task.eval_split``, default ``test``) when it
has one; otherwise a seeded hold-out of ``eval_fraction`` of the train split. Either way, a
training prompt whose text equals an eval prompt's (whitespace normalised) is dropped from train.

Two rules turn text into answers, each a name or a regex (last match, group 1 if it has groups):
- ``answer_extraction``, on the dataset's answer field: the gold answer (GSM8K: ``gsm8k``, the
  text after the last ``####``, commas stripped);
- ``answer_format``, on a completion: the answer it gives (``boxed``: the last ``\\boxed{...}``,
  ``answer_tag``: the last ``<answer>...</answer>``, ``last_number``). Model output is only
  matched, never run.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from grpo_lab.tasks.base import Example
from grpo_lab.tasks.jsonl import last_match

log = logging.getLogger(__name__)

EXTRA = "pip install 'grpo-lab[hf]'"

# A number as people write it: optional sign, thousands commas, decimals ("1,234.5", "-3", ".5").
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_BOXED = "\\boxed{"


def gsm8k_answer(text: str) -> str | None:
    """GSM8K's gold answer: the text after the last ``####``, stripped, commas removed
    (``"... #### 1,234"`` -> ``"1234"``); None when there is no ``####``."""
    _, sep, tail = text.rpartition("####")
    if not sep:
        return None
    return tail.strip().replace(",", "") or None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` whose braces balance (``\\boxed{\\frac{1}{2}}``
    -> ``\\frac{1}{2}``); None when there is none or the last one never closes.

    One pass from the last ``\\boxed{``: linear in the text, whatever its nesting.
    """
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def answer_tag(text: str) -> str | None:
    """The stripped text between the last ``</answer>`` and the ``<answer>`` before it, or None.

    Searched from the end, not with a lazy regex: on ``<answer>`` repeated with no closing tag
    a regex would scan to the end from every opening tag (quadratic)."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, max(end, 0))
    if end < 0 or start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


def last_number(text: str) -> str | None:
    """The last number in the text, thousands commas removed (``"so 1,234."`` -> ``"1234"``)."""
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


EXTRACTIONS: dict[str, Callable[[str], str | None]] = {
    "none": lambda text: text.strip() or None,
    "gsm8k": gsm8k_answer,
}
FORMATS: dict[str, Callable[[str], str | None]] = {
    "boxed": last_boxed,
    "answer_tag": answer_tag,
    "last_number": last_number,
}


def answer_rule(value: str, key: str, named: Mapping[str, Callable[[str], str | None]]):
    """The function a rule names, or a regex's last match (group 1 if it has groups).

    A bare word that names no rule is refused rather than read as a regex: ``boxd`` would match
    only the literal text "boxd", which is a typo, not a pattern.
    """
    if value in named:
        return named[value]
    allowed = f"{', '.join(named)} or a regex"
    if re.fullmatch(r"\w+", value):
        raise ValueError(f"task.{key}={value!r} is invalid; allowed: {allowed}")
    try:
        pattern = re.compile(value, re.DOTALL)
    except re.error as err:
        raise ValueError(
            f"task.{key}={value!r} is not a valid regex ({err}); allowed: {allowed}"
        ) from None
    return lambda text: last_match(pattern, text)


def normalize_answer(answer: str) -> str:
    """The form answers are compared in: stripped, ``$`` and thousands commas dropped from a
    number, a trailing period dropped, and a number in its canonical decimal form
    (``"$1,234.50"`` -> ``"1234.5"``, ``"72."`` -> ``"72"``); other text with runs of
    whitespace made one space."""
    text = " ".join(answer.split()).rstrip(".")
    bare = text.lstrip("$").replace(",", "") if _NUMBER.fullmatch(text.lstrip("$")) else None
    if bare is None:
        return text
    if len(bare) > 64:  # no arithmetic on a huge number: its text is its form
        return bare
    try:
        number = Decimal(bare)
        if number == 0:  # "-0", "0.00"
            return "0"
        if number == number.to_integral_value():
            return str(number.quantize(Decimal(1)))
        return format(number.normalize(), "f")
    except InvalidOperation:  # beyond the context's 28 digits
        return bare


def normalize_prompt(text: str) -> str:
    """A prompt with every run of whitespace made one space: what the eval dedup compares."""
    return " ".join(text.split())


def hold_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices: ceil(fraction * n) rows of a seeded shuffle go to eval."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = math.ceil(fraction * n)
    return order[n_eval:], order[:n_eval]


def without_eval_duplicates(train_prompts: Sequence[str], eval_prompts: Sequence[str]) -> list[int]:
    """Indices of the training prompts whose normalised text is no eval prompt's."""
    seen = {normalize_prompt(p) for p in eval_prompts}
    return [i for i, p in enumerate(train_prompts) if normalize_prompt(p) not in seen]


def import_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError(f"task=hf needs the datasets package: {EXTRA}") from None
    return datasets


def _plain(value: Any) -> Any:
    """Hydra's ListConfig/DictConfig as the list/dict ``datasets`` checks for."""
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value]


def _absolute(data_files: Any) -> Any:
    """``data_files`` with each existing local path made absolute (globs and URLs as given)."""
    if data_files is None:
        return None
    if isinstance(data_files, str):
        return str(Path(data_files).resolve()) if Path(data_files).exists() else data_files
    if isinstance(data_files, Mapping):
        return {k: _absolute(v) for k, v in data_files.items()}
    return [_absolute(f) for f in data_files]


def dataset_name(path: str, name: str | None, data_files: Any) -> str:
    """A short name for the dataset: the ``save_to_disk`` directory's name, the (first) data
    file's name for a builder (``json``, ``parquet``...), else the hub id with its config."""
    if Path(path).is_dir():
        return Path(path).resolve().name
    first = data_files
    while first is not None and not isinstance(first, str):
        first = next(iter(first.values() if isinstance(first, Mapping) else first), None)
    if first is not None:
        return Path(first).name
    return f"{path}:{name}" if name else path


def _saved_to_disk(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` or
    ``DatasetDict.save_to_disk`` (the files ``load_from_disk`` reads)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_splits(
    path: str,
    name: str | None = None,
    data_files: Any = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Every split of the dataset, as ``{split name: datasets.Dataset}``.

    A ``save_to_disk`` directory is read with ``load_from_disk`` (one saved ``Dataset`` is the
    ``train`` split); anything else goes to ``load_dataset(path, name=, data_files=, revision=)``.
    """
    datasets = import_datasets()
    local = Path(path)
    if local.is_file():
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(
            local.suffix.lower(), "json"
        )
        raise ValueError(
            f"task.path={path!r} is a file; give the builder and the file: "
            f"task.path={builder} task.data_files={path}"
        )
    if local.is_dir() and _saved_to_disk(local):
        ignored = {k: v for k, v in (("name", name), ("data_files", data_files)) if v}
        if ignored:
            log.warning(
                "task.path=%s is a save_to_disk directory; %s ignored", path, ", ".join(ignored)
            )
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.Dataset):
            return {"train": loaded}
        return dict(loaded)
    loaded = datasets.load_dataset(
        path, name=name, data_files=_plain(data_files), revision=revision
    )
    return dict(loaded)


class HfTask:
    """A task from a ``datasets`` dataset (see the module docstring for the loading rules).

    path / name / data_files / revision: what ``load_dataset`` takes (a ``save_to_disk``
    directory needs ``path`` alone). split: the training split.
    eval_split: the dataset's own eval split; ``test`` (default) falls back to a hold-out when
    the dataset has no such split, another name must exist, null always holds out.
    eval_fraction: the share of ``split`` held out when there is no eval split (seeded by ``seed``).
    prompt_field / answer_field / demonstration_field: columns (demonstration: the SFT target,
    default the extracted answer). system_prompt: kept as ``task.system_prompt`` for rendering.
    answer_extraction: the gold answer from ``answer_field`` (none | gsm8k | a regex).
    answer_format: the answer in a completion (boxed | answer_tag | last_number | a regex).
    max_examples: at most this many rows of each split are read (the first ones), for quick runs.

    ``train_dataset`` and ``eval_dataset`` hold the rows used, as ``datasets.Dataset``s (what
    the MLflow run logs); ``duplicates_removed`` counts training rows dropped as eval duplicates.
    """

    name = "hf"

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        data_files: Any = None,
        revision: str | None = None,
        eval_split: str | None = "test",
        eval_fraction: float = 0.1,
        prompt_field: str = "question",
        answer_field: str = "answer",
        answer_extraction: str = "none",
        demonstration_field: str | None = None,
        system_prompt: str | None = None,
        answer_format: str = "boxed",
        max_examples: int | None = None,
        seed: int = 0,
    ) -> None:
        # Rules and numbers first: a typo fails before a dataset is downloaded.
        self.answer_extraction = answer_extraction
        self._extract = answer_rule(answer_extraction, "answer_extraction", EXTRACTIONS)
        self._parse = answer_rule(answer_format, "answer_format", FORMATS)
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(
                f"task.eval_fraction={eval_fraction} is invalid; allowed: a number in (0, 1)"
            )
        if max_examples is not None and max_examples < 1:
            raise ValueError(
                f"task.max_examples={max_examples} is invalid; allowed: an integer >= 1 or null"
            )
        self.system_prompt = system_prompt
        self.fields = {"prompt_field": prompt_field, "answer_field": answer_field}
        if demonstration_field:
            self.fields["demonstration_field"] = demonstration_field
        data_files = _absolute(_plain(data_files))  # as the run's dataset source records them
        self.source = {"path": path, "name": name, "data_files": data_files, "revision": revision}
        self.dataset_name = dataset_name(path, name, data_files)

        splits = load_splits(path, name, data_files, revision)
        if split not in splits:
            raise ValueError(
                f"task.split={split!r} is not a split of {path}; splits: {sorted(splits)}"
            )
        own_eval = eval_split is not None and eval_split != split and eval_split in splits
        if eval_split not in (None, "test") and not own_eval:
            raise ValueError(
                f"task.eval_split={eval_split!r} is not a split of {path} other than "
                f"task.split={split!r}; splits: {sorted(splits)} "
                "(null holds out task.eval_fraction of the train split)"
            )
        train = self._capped(splits[split], split, max_examples)
        if own_eval:
            evals = self._capped(splits[eval_split], eval_split, max_examples)
            self.eval_split = eval_split
        else:
            others = sorted(set(splits) - {split})
            if eval_split is not None and others:  # test is absent, yet there is another split
                log.warning(
                    "task=hf: %s has no split %r; eval holds out task.eval_fraction=%s of %r. "
                    "To score on one of its own splits instead: %s",
                    path,
                    eval_split,
                    eval_fraction,
                    split,
                    " or ".join(f"task.eval_split={o}" for o in others),
                )
            train_rows, eval_rows = hold_out(len(train), eval_fraction, seed)
            if not train_rows:
                raise ValueError(
                    f"{path} split {split!r} has {len(train)} rows; with "
                    f"task.eval_fraction={eval_fraction} none is left for training"
                )
            train, evals = train.select(train_rows), train.select(eval_rows)
            self.eval_split = None
        self.split = split
        train_examples = self._examples(train, split)
        self._eval = self._examples(evals, self.eval_split or f"{split} (held out)")
        keep = without_eval_duplicates(
            [ex.prompt for ex in train_examples], [ex.prompt for ex in self._eval]
        )
        self.duplicates_removed = len(train) - len(keep)
        if not keep:
            raise ValueError(
                f"every training prompt of {path} split {split!r} is also an eval prompt"
            )
        if self.duplicates_removed:
            log.info(
                "task=hf: %d training rows dropped: their prompt is an eval prompt's",
                self.duplicates_removed,
            )
            train = train.select(keep)
        self._train = [train_examples[i] for i in keep]
        self.train_dataset, self.eval_dataset = train, evals

    def _capped(self, ds: Any, split: str, max_examples: int | None) -> Any:
        """The split's first ``max_examples`` rows, once its columns are checked."""
        missing = {k: v for k, v in self.fields.items() if v not in ds.column_names}
        if missing:
            key, field = next(iter(missing.items()))
            raise ValueError(
                f"task.{key}={field!r} is not a column of {self.source['path']} split "
                f"{split!r}; columns: {ds.column_names}"
            )
        for key, field in self.fields.items():
            # a Value is a string or a number; a list of messages (a conversation) is not text
            feature = ds.features[field]
            if not isinstance(feature, import_datasets().Value):
                raise ValueError(
                    f"task.{key}={field!r} of {self.source['path']} split {split!r} holds "
                    f"{type(feature).__name__} values, not text (a conversation? prompts are "
                    "text; put the system prompt in task.system_prompt)"
                )
        if not len(ds):
            raise ValueError(f"{self.source['path']} split {split!r} has no rows")
        return ds.select(range(min(len(ds), max_examples))) if max_examples else ds

    def _examples(self, ds: Any, split: str) -> list[Example]:
        columns = {key: list(ds[field]) for key, field in self.fields.items()}
        examples = []
        for row in range(len(ds)):
            values = {key: col[row] for key, col in columns.items()}
            missing = [key for key, value in values.items() if value is None]
            if missing:
                raise ValueError(
                    f"{self.source['path']} split {split!r} row {row}: "
                    f"task.{missing[0]}={self.fields[missing[0]]!r} is empty (null)"
                )
            answer = self._extract(str(values["answer_field"]))
            if answer is None:
                raise ValueError(
                    f"{self.source['path']} split {split!r} row {row}: "
                    f"task.answer_extraction={self.answer_extraction!r} finds no answer in "
                    f"task.answer_field={self.fields['answer_field']!r}: "
                    f"{str(values['answer_field'])[-80:]!r}"
                )
            demo = values.get("demonstration_field")
            examples.append(
                Example(
                    prompt=str(values["prompt_field"]),
                    answer=answer,
                    demonstration=None if demo is None else str(demo),
                )
            )
        return examples

    def train(self) -> list[Example]:
        return self._train

    def eval(self) -> list[Example]:
        return self._eval

    def parse_answer(self, completion: str) -> str | None:
        return self._parse(completion)

    def is_correct(self, completion: str, example: Example) -> bool:
        parsed = self.parse_answer(completion)
        return parsed is not None and normalize_answer(parsed) == normalize_answer(example.answer)
