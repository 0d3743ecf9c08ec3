"""Each job of a grid sweep gets the folder of its swept values: ``<sweep dir>/G-4+beta-0+seed-0``.

``hydra.sweep.subdir`` is ``${grpo_lab_job_dir:...}`` (``conf/hydra/default.yaml``): a job's
folder is a function of what it computes, not of its position in Hydra's job list, so the same
sweep command run again (``resume=auto``) finds each job's checkpoint and MLflow run even when
the values are listed in another order or more values were added. The keys are the swept ones
(``mlflow_sweep.json``), sorted. Other sweepers (Optuna) pick values themselves and may repeat
them: their jobs keep Hydra's job number, as does a sweep without the MLflow callback.

``-`` between key and value, ``+`` between pairs: characters Hydra's override grammar takes
unquoted, so a checkpoint path pastes into ``ckpt=...`` as it is (``=`` and ``,`` would need
quotes).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

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
    return job_dir_name([str(o) for o in listed or []], sweep["swept_keys"]) or str(job_num)


if not OmegaConf.has_resolver("grpo_lab_job_dir"):
    OmegaConf.register_new_resolver("grpo_lab_job_dir", _job_dir)
