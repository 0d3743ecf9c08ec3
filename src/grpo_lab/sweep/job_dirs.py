"""Each job of a grid sweep gets the folder of its swept values: ``<sweep dir>/G-4+beta-0+seed-0``.

``hydra.sweep.subdir`` is ``${grpo_lab_job_dir:...}`` (``conf/hydra/default.yaml``): a job's
folder is a function of what it computes, not of its position in Hydra's job list, so the same
sweep command run again (``resume=auto``) finds each job's checkpoint and MLflow run even when
the values are listed in another order or more values were added. The keys are the swept ones
(``mlflow_sweep.json``), sorted. A start that sweeps a key an earlier start held at one value
names its jobs by more keys: a job that ran before keeps its folder (``earlier_job_dir``). Other
sweepers (Optuna) pick values themselves and may repeat
them: their jobs keep Hydra's job number, as does a sweep without the MLflow callback.

``-`` between key and value, ``+`` between pairs: characters Hydra's override grammar takes
unquoted, so a checkpoint path pastes into ``ckpt=...`` as it is (``=`` and ``,`` would need
quotes).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from grpo_lab.sweep.naming import split_override
from grpo_lab.sweep.run_files import read_sweep_file

MAX_NAME = 100  # characters of a job folder's name; longer names end in a digest
_UNSAFE = re.compile(r"[^A-Za-z0-9._+\-]")


def job_dir_name(overrides: Iterable[str], swept: Iterable[str]) -> str | None:
    """``key-value`` of each swept key, sorted by key and joined with ``+``; None when no
    swept key is among ``overrides``.

    A character a folder name or an unquoted override should not hold (``/``, ``=``, ``,``,
    spaces, quotes) becomes ``_``, and then,
    as for a name over ``MAX_NAME``, a digest of the exact values is appended, so two jobs never
    share a folder.
    """
    values = dict(split_override(o) for o in overrides)
    pairs = sorted((k, values[k]) for k in set(swept) if k in values)
    if not pairs:
        return None
    exact = "+".join(f"{k}-{v}" for k, v in pairs)
    safe = _UNSAFE.sub("_", exact)
    if safe == exact and len(exact) <= MAX_NAME:
        return exact
    digest = hashlib.sha1(exact.encode()).hexdigest()[:10]
    return f"{safe[: MAX_NAME - 11]}-{digest}"


def _job_dir(sweep_dir: Any, job_num: Any, overrides: Any) -> str:
    """The ``grpo_lab_job_dir`` resolver: the job's folder name under the sweep dir."""
    sweep = read_sweep_file(str(sweep_dir))
    if sweep is None or not str(sweep.get("sweeper", "")).endswith("BasicSweeper"):
        return str(job_num)
    listed = OmegaConf.to_container(overrides) if OmegaConf.is_config(overrides) else overrides
    listed = [str(o) for o in listed or []]
    name = job_dir_name(listed, sweep["swept_keys"]) or str(job_num)
    if (Path(str(sweep_dir)) / name).is_dir() or int(sweep.get("start", 2)) < 2:
        return name  # its folder, or the sweep's first start: no earlier folder to look for
    return earlier_job_dir(Path(str(sweep_dir)), listed, sweep["swept_keys"]) or name


def earlier_job_dir(sweep_dir: Path, overrides: list[str], swept: Iterable[str]) -> str | None:
    """The folder an earlier start of this sweep gave the job of ``overrides`` under other
    swept keys, or None.

    The folder name holds the swept keys only, and those change when a start sweeps a key an
    earlier start gave one value (``G=4 beta=0,0.04`` after ``G=4,8 beta=0``, ``seeds=3`` after
    no ``seeds``): the same job would get a new folder, run again, and sit twice in the sweep.
    A folder is the job's when the overrides Hydra saved there (``.hydra/overrides.yaml``) and
    this job's give their keys the same values, ``resume`` aside; a key this job gives that the
    folder's overrides do not, the folder's config must hold at that value (``seed=0`` after a
    start without ``seed``). When no folder is the job's, keys a resume may change
    (``train.rollouts``) are left aside too, unless swept, if that leaves one folder.
    """
    from grpo_lab.resume import resumable

    swept = set(swept)
    mine = dict(split_override(o) for o in overrides)
    candidates = []
    for folder in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        theirs = _overrides_of(folder)
        if theirs is not None:
            candidates.append((folder, theirs))
    strict = [f.name for f, theirs in candidates if _same_job(mine, theirs, f, set())]
    if strict:
        return strict[0]
    aside = {k for k in mine if k not in swept and resumable(k)}
    for _, theirs in candidates:
        aside |= {k for k in theirs if k not in swept and resumable(k)}
    loose = [f.name for f, theirs in candidates if _same_job(mine, theirs, f, aside)]
    return loose[0] if len(loose) == 1 else None


def _overrides_of(folder: Path) -> dict[str, str] | None:
    """key -> value of the overrides Hydra saved in a job folder, or None (not a job folder)."""
    f = folder / ".hydra" / "overrides.yaml"
    try:
        listed = yaml.safe_load(f.read_text())
    except Exception:  # no file (not a job folder, or one Hydra is creating), or unreadable
        return None
    if not isinstance(listed, list):
        return None
    return dict(split_override(str(o)) for o in listed)


def _same_job(mine: dict[str, str], theirs: dict[str, str], folder: Path, aside: set) -> bool:
    for key in (set(mine) | set(theirs)) - {"resume"} - aside:
        if key not in mine:
            return False  # this job leaves it at its default: not known here, so not the same
        if key in theirs:
            if not _same_value(mine[key], theirs[key]):
                return False
        elif not _same_value(mine[key], _config_value(folder, key)):
            return False
    return True


def _config_value(folder: Path, key: str) -> Any:
    """The value of ``key`` in the config Hydra saved in a job folder (None: not a plain value)."""
    try:
        value = OmegaConf.select(OmegaConf.load(folder / ".hydra" / "config.yaml"), key)
    except Exception:  # an unresolvable interpolation, an unreadable file: not the same
        return None
    return None if OmegaConf.is_config(value) else value


def _same_value(given: str, other: Any) -> bool:
    """An override's text against another's, or against a config value (``0`` and ``0.0``)."""
    if other is None:
        return False
    if str(other) == given:
        return True
    try:
        return float(given) == float(other)
    except (TypeError, ValueError):
        pass
    try:
        return yaml.safe_load(given) == other  # true / True
    except yaml.YAMLError:
        return False


if not OmegaConf.has_resolver("grpo_lab_job_dir"):
    OmegaConf.register_new_resolver("grpo_lab_job_dir", _job_dir)
