"""Run names and tags from the command line: ``G=8 eps=0.2 beta=0.04``.

A plain run is named after its overrides (``run_name_from_overrides``), a sweep job after its
swept values only (``job_tags``), with the tags that nest it under the sweep's parent run. The
report names configurations with the same ``short_key``/``short_value``.
"""

from __future__ import annotations

import json
import os
import socket

from omegaconf import DictConfig, OmegaConf

from grpo_lab.sweep.run_files import HOST_TAG, PID_TAG, START_TAG, read_sweep_file

# Short names for keys researchers sweep, so a run reads "G=8 eps=0.2 beta=0.04".
_SHORT = {"epsilon": "eps", "learning_rate": "lr", "train.lr": "lr", "prompts_per_step": "B"}


def split_override(override: str) -> tuple[str, str]:
    """``+train.lr=0.1`` -> ``("train.lr", "0.1")``."""
    key, _, value = override.lstrip("+~").partition("=")
    return key, value


def short_key(key: str) -> str:
    """``train.epsilon`` -> ``eps``: a known short name, else the last part of the key."""
    return _SHORT.get(key) or _SHORT.get(key.split(".")[-1]) or key.split(".")[-1]


def short_value(value: str) -> str:
    """Floats an Optuna sampler picks (0.25707171674275386) as 4 significant digits (0.2571)."""
    try:
        return (
            value if float(value) == int(float(value)) or len(value) <= 6 else f"{float(value):.4g}"
        )
    except (ValueError, OverflowError):
        return value


def run_name_from_overrides(cfg: DictConfig | None = None) -> str:
    """A readable run name from the command-line overrides, or "default" when there are none."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "default"
    overrides = [
        o
        for o in HydraConfig.get().overrides.task
        if not o.startswith(("hydra.", "logger.", "ckpt_path", "resume"))
    ]
    parts = []
    for o in overrides:
        key, value = split_override(o)
        parts.append(f"{short_key(key)}={value}")
    return " ".join(parts) or "default"


def job_tags() -> tuple[str | None, dict[str, str]]:
    """(run name, tags) for the run of the current sweep job; (None, {}) outside a sweep.

    The name lists only the swept keys (``G=8 eps=0.2 beta=0.04``), in command-line order.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, {}
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, {}
    sweep = read_sweep_file(hc.sweep.dir)
    if sweep is None:  # the callback is not registered: a plain run in a sweep folder
        return None, {}
    overrides = list(hc.overrides.task)
    values = dict(split_override(o) for o in overrides)
    swept = {k: values[k] for k in sweep["swept_keys"] if k in values}
    name = (
        " ".join(f"{short_key(k)}={short_value(v)}" for k, v in swept.items())
        or f"job {hc.job.num}"
    )
    tags = {
        "mlflow.parentRunId": sweep["parent_run_id"],
        "grpo_lab.sweep_id": sweep["sweep_id"],
        "grpo_lab.sweep_dir": sweep["sweep_dir"],
        "grpo_lab.job_num": str(hc.job.num),  # in this start of the sweep
        "grpo_lab.job_dir": str(hc.runtime.output_dir),  # the same in every start (job_dirs)
        "grpo_lab.overrides": json.dumps(overrides),
        "grpo_lab.swept": json.dumps(swept),
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        START_TAG: str(sweep.get("start", 1)),
    }
    if "CUDA_VISIBLE_DEVICES" in os.environ:  # the job's GPU under hydra/launcher=parallel_gpu
        tags["grpo_lab.cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return name, tags


def swept_keys(config: DictConfig) -> list[str]:
    """Keys that take several values in this sweep: comma lists, ranges, choices, sweeper params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys: list[str] = []
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    for o in parsed:
        if o.is_sweep_override() and o.key_or_group not in keys:
            keys.append(o.key_or_group)
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    for k in params:
        if k not in keys:
            keys.append(str(k))
    return keys
