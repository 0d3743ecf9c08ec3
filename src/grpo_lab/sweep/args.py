"""The sweep options on ``grpo-lab train``'s command line, checked and rewritten before Hydra.

``prepare_argv`` names the missing plugin package (``pip install 'grpo-lab[sweep]'``), refuses
a GPU worker count that cannot work (more parallel_gpu workers than GPUs among them), and expands ``seeds=3`` into ``seed=0,1,2``.
"""

from __future__ import annotations

import importlib.util

from grpo_lab.sweep.gpu_slots import gpu_workers_error, visible_gpu_count
from grpo_lab.sweep.naming import split_override

# Config choices that need a plugin package, and the package's module.
_PLUGINS = {
    ("hydra/launcher", "parallel"): ("hydra_joblib_launcher", "hydra-joblib-launcher"),
    ("hydra/launcher", "parallel_gpu"): ("hydra_joblib_launcher", "hydra-joblib-launcher"),
    ("hydra/launcher", "joblib"): ("hydra_joblib_launcher", "hydra-joblib-launcher"),
    ("hydra/launcher", "slurm"): ("hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("hydra/launcher", "submitit_slurm"): ("hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("hydra/launcher", "submitit_local"): ("hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("hydra/sweeper", "optuna"): ("hydra_optuna_sweeper", "hydra-optuna-sweeper"),
    ("hparams_search", "optuna"): ("hydra_optuna_sweeper", "hydra-optuna-sweeper"),
}


class SweepArgumentError(SystemExit):
    """A sweep option on the command line cannot work; the message says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(f"grpo-lab: {message}")


def check_plugins(argv: list[str]) -> None:
    """Fail with the package to install when an override picks a plugin that is not installed."""
    for arg in argv:
        found = _PLUGINS.get(split_override(arg))
        if found and importlib.util.find_spec(f"hydra_plugins.{found[0]}") is None:
            raise SweepArgumentError(
                f"{arg} needs the Hydra plugin {found[1]}, which is not installed; "
                "install the sweep extra: pip install 'grpo-lab[sweep]'"
            )


def expand_seeds(argv: list[str]) -> list[str]:
    """``seeds=N`` -> ``seed=S,S+1,...,S+N-1`` (S = the ``seed=`` given, else 0): N runs per configuration."""
    seeds_args = [a for a in argv if a.split("=", 1)[0] == "seeds"]
    if not seeds_args:
        return argv
    arg = seeds_args[-1]
    value = arg.split("=", 1)[1]
    if not value.isdigit() or int(value) < 1:
        raise SweepArgumentError(
            f"seeds={value!r} is invalid: expected an integer >= 1 (runs per configuration)"
        )
    if not {"-m", "--multirun"} & set(argv):
        raise SweepArgumentError(
            f"{arg} repeats the configurations of a sweep: add -m (grpo-lab train -m ... {arg})"
        )
    if any(a.lstrip("+~").split("=", 1)[0] == "hparams_search" for a in argv):
        raise SweepArgumentError(
            f"{arg} works with grid sweeps only: hparams_search picks the configurations itself"
        )
    seed_args = [a for a in argv if a.split("=", 1)[0] == "seed"]
    base = seed_args[-1].split("=", 1)[1] if seed_args else "0"
    if not base.lstrip("-").isdigit():
        raise SweepArgumentError(
            f"seed={base!r} with {arg}: give one integer seed (the first of the {value}) or no seed"
        )
    seeds = ",".join(str(int(base) + i) for i in range(int(value)))
    return [a for a in argv if a not in seeds_args and a not in seed_args] + [f"seed={seeds}"]


def check_gpu_workers(argv: list[str]) -> None:
    """``parallel_gpu`` runs one worker per GPU: ``hydra.launcher.n_jobs`` must be a count >= 1,
    and, for jobs that want a GPU (any ``trainer.accelerator`` but cpu), at most the GPUs there
    are (``gpu_slots.gpu_workers_error``)."""
    values = dict(split_override(a) for a in argv)
    if values.get("hydra/launcher") != "parallel_gpu":
        return
    n_jobs = values.get("hydra.launcher.n_jobs", str(default_workers()))
    if not n_jobs.isdigit() or int(n_jobs) < 1:
        raise SweepArgumentError(
            f"hydra.launcher.n_jobs={n_jobs} is invalid with hydra/launcher=parallel_gpu: expected "
            "the number of GPUs, an integer >= 1 (each worker holds one GPU)"
        )
    if values.get("trainer.accelerator") == "cpu" or values.get("trainer") == "cpu":
        return  # jobs that ask for no GPU: the slots only spread them
    if {"--cfg", "-c", "--info", "-i"} & set(argv):
        return  # the config is printed, no worker starts: composes on a machine without GPUs
    error = gpu_workers_error(int(n_jobs), visible_gpu_count())
    if error is not None:
        raise SweepArgumentError(error)


def default_workers() -> int:
    """``hydra.launcher.n_jobs`` of the joblib launchers when the command line gives none."""
    from omegaconf import OmegaConf

    from grpo_lab.paths import config_dir

    return int(OmegaConf.load(config_dir() / "hydra" / "launcher" / "parallel.yaml").n_jobs)


def prepare_argv(argv: list[str]) -> list[str]:
    """What the CLI runs on Hydra's arguments first: plugin and GPU-worker checks, then ``seeds=N``."""
    check_plugins(argv)
    check_gpu_workers(argv)
    return expand_seeds(argv)
