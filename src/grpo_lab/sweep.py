"""Sweeps: one MLflow parent run per ``-m`` sweep, one nested run per job, failures recorded.

``grpo-lab train -m G=4,8 epsilon=0.1,0.2`` goes through Hydra's launcher and sweeper; this module
adds what they lack:

- ``MLflowSweepCallback`` (registered in ``conf/hydra/default.yaml``): before any job starts it
  creates the experiment once (parallel jobs creating it race in SQLite) and the parent run, and
  writes ``<sweep dir>/mlflow_sweep.json`` so that jobs in other processes (joblib, SLURM) find it.
  After each job it records a failure (tag ``grpo_lab.error``, artifact ``error/traceback.txt``,
  status FAILED) and, unless ``sweep.fail_fast``, turns it into a NaN objective so the other jobs
  run. At the end it finishes the parent run (FAILED if any job failed) with a summary.
- ``job_tags``: what ``train.make_logger`` puts on a job's run (parent id, sweep id, job number,
  overrides) and its readable name from the swept values only (``G=8 eps=0.2 beta=0.04``).
- ``prepare_argv``: run by the CLI before Hydra; names the missing plugin package
  (``pip install 'grpo-lab[sweep]'``) and expands ``seeds=3`` into ``seed=0,1,2``.

Imports stay light at module level: the CLI imports this module on every command.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

SWEEP_FILE = "mlflow_sweep.json"  # in the sweep dir: parent run, experiment, swept keys
RUN_FILE = "mlflow_run.json"  # in each run's output dir: its MLflow run (eval links to it)
ERROR_TAG = "grpo_lab.error"
# Where a job runs: a sweep stopped by a signal passes it on to its jobs on this machine.
HOST_TAG, PID_TAG = "grpo_lab.host", "grpo_lab.pid"

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


# --------------------------------------------------------------------------- before Hydra


def check_plugins(argv: list[str]) -> None:
    """Fail with the package to install when an override picks a plugin that is not installed."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        found = _PLUGINS.get((key, value))
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


def prepare_argv(argv: list[str]) -> list[str]:
    """What the CLI runs on Hydra's arguments first: plugin check, then ``seeds=N``."""
    check_plugins(argv)
    return expand_seeds(argv)


# --------------------------------------------------------------------------- GPU per job


_DEVICE: dict[str, str] = {}


def _device_for_job(job_num: Any, devices: Any) -> str:
    """CUDA_VISIBLE_DEVICES for a joblib worker: its first job's number modulo ``devices``.

    Loky reuses worker processes and CUDA reads the variable once per process, so a worker keeps
    the device of its first job.
    """
    if "device" not in _DEVICE:
        n = int(devices)
        if n < 1:
            raise ValueError(f"gpus_per_node={devices!r} is invalid: expected an integer >= 1")
        _DEVICE["device"] = str(int(job_num) % n)
    return _DEVICE["device"]


if not OmegaConf.has_resolver("grpo_lab_device"):
    OmegaConf.register_new_resolver("grpo_lab_device", _device_for_job)


# --------------------------------------------------------------------------- MLflow helpers


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _retry(fn):
    from grpo_lab.tracking import retry_locked

    return retry_locked(fn)


def record_failure(client: Any, run_id: str, err: BaseException) -> None:
    """Tag a run with the error (``grpo_lab.error``) and attach its traceback as ``error/traceback.txt``."""
    message = f"{type(err).__name__}: {err}"
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    _retry(lambda: client.set_tag(run_id, ERROR_TAG, message[:4000]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "traceback.txt"
        path.write_text(text)
        _retry(lambda: client.log_artifact(run_id, str(path), artifact_path="error"))


def write_run_file(out_dir: str | Path, run_id: str, experiment_id: str, tracking_uri: str) -> None:
    """Note a run's MLflow id in its output dir (next to ``checkpoints/``) for eval and the sweep."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri}
    (out / RUN_FILE).write_text(json.dumps(data, indent=2) + "\n")


def read_run_file(path: str | Path) -> dict | None:
    """The run noted by ``write_run_file`` in ``path`` or the nearest parent dir that has one."""
    p = Path(path).resolve()
    for d in [p, *p.parents] if p.is_dir() else list(p.parents):
        f = d / RUN_FILE
        if f.is_file():
            return json.loads(f.read_text())
    return None


def read_sweep_file(sweep_dir: str | Path) -> dict | None:
    f = Path(sweep_dir) / SWEEP_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def short_key(key: str) -> str:
    from grpo_lab.tracking import _SHORT

    return _SHORT.get(key) or _SHORT.get(key.split(".")[-1]) or key.split(".")[-1]


def short_value(value: str) -> str:
    """Floats an Optuna sampler picks (0.25707171674275386) as 4 significant digits (0.2571)."""
    try:
        return (
            value if float(value) == int(float(value)) or len(value) <= 6 else f"{float(value):.4g}"
        )
    except (ValueError, OverflowError):
        return value


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.lstrip("+~").partition("=")
    return key, value


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
    values = dict(_split(o) for o in overrides)
    swept = {k: values[k] for k in sweep["swept_keys"] if k in values}
    name = (
        " ".join(f"{short_key(k)}={short_value(v)}" for k, v in swept.items())
        or f"job {hc.job.num}"
    )
    tags = {
        "mlflow.parentRunId": sweep["parent_run_id"],
        "grpo_lab.sweep_id": sweep["sweep_id"],
        "grpo_lab.sweep_dir": sweep["sweep_dir"],
        "grpo_lab.job_num": str(hc.job.num),
        "grpo_lab.overrides": json.dumps(overrides),
        "grpo_lab.swept": json.dumps(swept),
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
    }
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


# --------------------------------------------------------------------------- the callback


_WATCH: dict[str, Any] = {}  # the sweep's signal handlers and parent-run cleanup while it runs


class MLflowSweepCallback(Callback):
    """Groups a Hydra multirun under one MLflow parent run and keeps going past failed jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from grpo_lab.tracking import ensure_experiment

        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if OmegaConf.select(config, "sweep.fail_fast", default=False) and str(
            OmegaConf.select(config, "hydra.sweeper._target_")
        ).endswith("BasicSweeper"):
            # Hydra's callbacks cannot stop a sweep (it turns their exceptions into warnings), but its
            # basic sweeper raises after a batch with a failed job: make batches small. This runs before
            # the sweeper is built from this config.
            with read_write(config), open_dict(config):
                config.hydra.sweeper.max_batch_size = max(
                    1, int(OmegaConf.select(config, "hydra.launcher.n_jobs") or 1)
                )
        uri, name = config.logger.tracking_uri, config.logger.experiment_name
        exp_id = ensure_experiment(uri, name)
        keys = swept_keys(config)
        values = dict(_split(o) for o in config.hydra.overrides.task)
        label = " ".join(f"{short_key(k)}={values.get(k, '(sweeper)')}" for k in keys)
        sweep_id = "/".join(sweep_dir.parts[-2:])
        client = _client(uri)
        run = _retry(
            lambda: client.create_run(
                exp_id,
                run_name=f"sweep {label}".strip(),
                tags={
                    "grpo_lab.role": "sweep",
                    "grpo_lab.sweep_id": sweep_id,
                    "grpo_lab.sweep_dir": str(sweep_dir.resolve()),
                    "grpo_lab.overrides": json.dumps(list(config.hydra.overrides.task)),
                    "grpo_lab.swept_keys": json.dumps(keys),
                    "grpo_lab.objective": str(OmegaConf.select(config, "train.objective") or ""),
                    "grpo_lab.launcher": str(OmegaConf.select(config, "hydra.launcher._target_")),
                    "grpo_lab.sweeper": str(OmegaConf.select(config, "hydra.sweeper._target_")),
                },
            )
        )
        data = {
            "parent_run_id": run.info.run_id,
            "experiment_id": exp_id,
            "tracking_uri": uri,
            "experiment_name": name,
            "sweep_id": sweep_id,
            "sweep_dir": str(sweep_dir.resolve()),
            "swept_keys": keys,
        }
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(data, indent=2) + "\n")
        log.info("MLflow sweep run %s (experiment %s): %s", run.info.run_id, name, label)
        self._watch_signals(client, exp_id, run.info.run_id)

    def _watch_signals(self, client: Any, experiment_id: str, parent_run_id: str) -> None:
        """SIGINT or SIGTERM ends the sweep with its parent run KILLED, not RUNNING forever.

        The jobs' runs stop first: in this process (basic launcher) through train's own handler,
        in worker processes (joblib) through the signal passed on to them.
        """
        from grpo_lab import faults

        def kill_parent(signum: int) -> None:
            _retry(lambda: client.set_tag(parent_run_id, ERROR_TAG, f"stopped by signal {signum}"))
            _retry(lambda: client.set_terminated(parent_run_id, "KILLED"))

        def running_jobs() -> list:
            return _retry(
                lambda: client.search_runs(
                    [experiment_id],
                    filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                    "and attributes.status = 'RUNNING'",
                )
            )

        def on_signal(signum: int, frame: Any) -> None:
            here = socket.gethostname()
            pids = [
                int(r.data.tags[PID_TAG])
                for r in running_jobs()
                if r.data.tags.get(HOST_TAG) == here and r.data.tags.get(PID_TAG, "").isdigit()
            ]
            pids = [pid for pid in pids if pid != os.getpid()]  # a job in this process handles it
            faults.stop_processes(signum, pids, still_running=lambda: bool(running_jobs()))
            faults.exit_interrupted(signum, f"sweep parent MLflow run {parent_run_id} KILLED")

        faults.add_cleanup(kill_parent)
        handlers = faults.signal_handlers(on_signal)
        handlers.__enter__()
        # Module state, not attributes: the joblib launcher pickles this callback for its workers.
        _WATCH.update(handlers=handlers, cleanup=kill_parent)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        sweep = read_sweep_file(config.hydra.sweep.dir)
        if sweep is None:
            return
        client = _client(sweep["tracking_uri"])
        run = read_run_file(config.hydra.runtime.output_dir)
        run_id = (
            run["run_id"] if run and run.get("experiment_id") == sweep["experiment_id"] else None
        )
        if job_return.status == JobStatus.COMPLETED:
            if run_id is not None:
                try:
                    value = float(job_return.return_value)
                except (TypeError, ValueError):
                    return
                _retry(lambda: client.log_metric(run_id, "objective", value))
            return
        if job_return.status != JobStatus.FAILED:
            return
        err: BaseException = job_return._return_value
        if run_id is None:  # failed before its run existed (config check, building the policy)
            name, tags = job_tags()
            run_id = _retry(
                lambda: client.create_run(sweep["experiment_id"], run_name=name, tags=tags)
            ).info.run_id
        run_info = _retry(lambda: client.get_run(run_id))
        if ERROR_TAG not in run_info.data.tags:
            record_failure(client, run_id, err)
        if run_info.info.status != "FAILED":
            _retry(lambda: client.set_terminated(run_id, "FAILED"))
        overrides = " ".join(job_return.overrides or [])
        if bool(OmegaConf.select(config, "sweep.fail_fast", default=False)):
            # The job stays FAILED: the sweeper raises after this batch (one job, or n_jobs).
            _retry(
                lambda: client.set_tag(
                    sweep["parent_run_id"], ERROR_TAG, f"job {config.hydra.job.num} failed"
                )
            )
            _retry(lambda: client.set_terminated(sweep["parent_run_id"], "FAILED"))
            log.error(
                "job %s (%s) failed and sweep.fail_fast=true: stopping the sweep",
                config.hydra.job.num,
                overrides,
            )
            return
        log.error(
            "job %s (%s) FAILED, recorded in MLflow run %s; the sweep goes on (sweep.fail_fast=false):\n%s",
            config.hydra.job.num,
            overrides,
            run_id,
            "".join(traceback.format_exception(type(err), err, err.__traceback__)),
        )
        job_return.status = JobStatus.COMPLETED
        job_return.return_value = math.nan  # what the sweeper sees; Optuna marks the trial failed

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from grpo_lab.tracking import runs_url, ui_command

        if _WATCH:
            from grpo_lab import faults

            _WATCH.pop("handlers").__exit__(None, None, None)
            faults.remove_cleanup(_WATCH.pop("cleanup"))
        sweep = read_sweep_file(config.hydra.sweep.dir)
        if sweep is None:
            return
        client = _client(sweep["tracking_uri"])
        parent = sweep["parent_run_id"]
        runs = _retry(
            lambda: client.search_runs(
                [sweep["experiment_id"]],
                filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                max_results=5000,
            )
        )
        runs = sorted(runs, key=lambda r: int(r.data.tags.get("grpo_lab.job_num", "0")))
        failed = [r for r in runs if r.info.status == "FAILED"]
        done = [
            r
            for r in runs
            if "objective" in r.data.metrics and not math.isnan(r.data.metrics["objective"])
        ]
        lines = ["| job | run | status | objective |", "|---|---|---|---|"]
        for r in runs:
            obj = r.data.metrics.get("objective")
            lines.append(
                f"| {r.data.tags.get('grpo_lab.job_num', '?')} | {r.info.run_name} | {r.info.status} | "
                f"{'' if obj is None else f'{obj:.4f}'} |"
            )
        metrics = {"sweep/jobs": len(runs), "sweep/failed": len(failed)}
        if done:
            best = max(done, key=lambda r: r.data.metrics["objective"])
            metrics["sweep/best_objective"] = best.data.metrics["objective"]
            _retry(
                lambda: client.set_tag(
                    parent, "grpo_lab.best_run", f"{best.info.run_name} ({best.info.run_id})"
                )
            )
        for k, v in metrics.items():
            _retry(lambda k=k, v=v: client.log_metric(parent, k, v))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "sweep_summary.md"
            path.write_text("\n".join(lines) + "\n")
            _retry(lambda: client.log_artifact(parent, str(path)))
        _retry(lambda: client.set_terminated(parent, "FAILED" if failed else "FINISHED"))
        sweep_dir = os.path.relpath(sweep["sweep_dir"])
        print(
            f"[grpo-lab] sweep: {len(runs)} jobs, {len(failed)} failed; parent MLflow run {parent}"
        )
        print("\n".join(lines))
        print(f"[grpo-lab] compare them: grpo-lab report {sweep_dir}")
        print(f"[grpo-lab] MLflow UI: {ui_command(sweep['tracking_uri'])}")
        print(f"[grpo-lab]   then open {runs_url(sweep['tracking_uri'], sweep['experiment_id'])}")
