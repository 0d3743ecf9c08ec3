"""``MLflowSweepCallback``: one MLflow parent run per ``-m`` sweep, one nested run per job.

Registered in ``conf/hydra/default.yaml``. Before any job starts it creates the experiment once
(parallel jobs creating it race in SQLite) and the parent run, and writes
``<sweep dir>/mlflow_sweep.json`` so that jobs in other processes (joblib, SLURM) find it.
Before each job it lets a joblib worker spawn processes (``ddp_spawn``). After each job it
records a failure (tag ``grpo_lab.error``, artifact ``error/traceback.txt``, status FAILED)
and, unless ``sweep.fail_fast``, turns it into a NaN objective so the other jobs run. At the end
it finishes the parent run (FAILED if any job failed) with a summary.
"""

from __future__ import annotations

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

from grpo_lab.sweep.gpu_slots import allow_spawn_in_worker
from grpo_lab.sweep.naming import job_tags, short_key, split_override, swept_keys
from grpo_lab.sweep.run_files import (
    ERROR_TAG,
    HOST_TAG,
    PID_TAG,
    SWEEP_FILE,
    read_run_file,
    read_sweep_file,
    record_failure,
)

log = logging.getLogger(__name__)

_WATCH: dict[str, Any] = {}  # the sweep's signal handlers and parent-run cleanup while it runs


class MLflowSweepCallback(Callback):
    """Groups a Hydra multirun under one MLflow parent run and keeps going past failed jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from grpo_lab import store

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
        exp_id = store.ensure_experiment(uri, name)
        keys = swept_keys(config)
        values = dict(split_override(o) for o in config.hydra.overrides.task)
        label = " ".join(f"{short_key(k)}={values.get(k, '(sweeper)')}" for k in keys)
        sweep_id = "/".join(sweep_dir.parts[-2:])
        client = store.client(uri)
        run = client.create_run(
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
            client.set_tag(parent_run_id, ERROR_TAG, f"stopped by signal {signum}")
            client.set_terminated(parent_run_id, "KILLED")

        def running_jobs() -> list:
            return client.search_runs(
                [experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                "and attributes.status = 'RUNNING'",
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

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        allow_spawn_in_worker()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        from grpo_lab import store

        sweep = read_sweep_file(config.hydra.sweep.dir)
        if sweep is None:
            return
        client = store.client(sweep["tracking_uri"])
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
                client.log_metric(run_id, "objective", value)
            return
        if job_return.status != JobStatus.FAILED:
            return
        err: BaseException = job_return._return_value
        if run_id is None:  # failed before its run existed (config check, building the policy)
            name, tags = job_tags()
            run_id = client.create_run(sweep["experiment_id"], run_name=name, tags=tags).info.run_id
        run_info = client.get_run(run_id)
        if ERROR_TAG not in run_info.data.tags:
            record_failure(client, run_id, err)
        if run_info.info.status != "FAILED":
            client.set_terminated(run_id, "FAILED")
        overrides = " ".join(job_return.overrides or [])
        if bool(OmegaConf.select(config, "sweep.fail_fast", default=False)):
            # The job stays FAILED: the sweeper raises after this batch (one job, or n_jobs).
            client.set_tag(sweep["parent_run_id"], ERROR_TAG, f"job {config.hydra.job.num} failed")
            client.set_terminated(sweep["parent_run_id"], "FAILED")
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
        from grpo_lab import store
        from grpo_lab.tracking import runs_url, ui_command

        if _WATCH:
            from grpo_lab import faults

            _WATCH.pop("handlers").__exit__(None, None, None)
            faults.remove_cleanup(_WATCH.pop("cleanup"))
        sweep = read_sweep_file(config.hydra.sweep.dir)
        if sweep is None:
            return
        client = store.client(sweep["tracking_uri"])
        parent = sweep["parent_run_id"]
        runs = client.search_runs(
            [sweep["experiment_id"]],
            filter_string=f"tags.mlflow.parentRunId = '{parent}'",
            max_results=5000,
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
            client.set_tag(
                parent, "grpo_lab.best_run", f"{best.info.run_name} ({best.info.run_id})"
            )
        for k, v in metrics.items():
            client.log_metric(parent, k, v)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "sweep_summary.md"
            path.write_text("\n".join(lines) + "\n")
            client.log_artifact(parent, str(path))
        client.set_terminated(parent, "FAILED" if failed else "FINISHED")
        sweep_dir = os.path.relpath(sweep["sweep_dir"])
        print(
            f"[grpo-lab] sweep: {len(runs)} jobs, {len(failed)} failed; parent MLflow run {parent}"
        )
        print("\n".join(lines))
        print(f"[grpo-lab] compare them: grpo-lab report {sweep_dir}")
        print(f"[grpo-lab] MLflow UI: {ui_command(sweep['tracking_uri'])}")
        print(f"[grpo-lab]   then open {runs_url(sweep['tracking_uri'], sweep['experiment_id'])}")
