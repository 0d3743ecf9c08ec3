"""``MLflowSweepCallback``: one MLflow parent run per ``-m`` sweep, one nested run per job.

Registered in ``conf/hydra/default.yaml``. Before any job starts it locks the sweep dir (a second
sweep command on it is refused while the first runs), creates the experiment once (parallel jobs
creating it race in SQLite) and the parent run, and writes ``<sweep dir>/mlflow_sweep.json`` so
that jobs in other processes (joblib, SLURM) find it. With ``resume=auto`` a sweep dir that
already has a parent run keeps it: the same command run again after a kill continues the sweep
under one parent (each job finds its own dir, see ``job_dirs``).
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
    START_TAG,
    STOPPING_FILE,
    SWEEP_FILE,
    note_started_run,
    read_run_file,
    read_sweep_file,
    record_failure,
    started_run,
    write_atomically,
)

log = logging.getLogger(__name__)

# on the FAILED run that records a job which failed before it had a run of its own
FAILED_BEFORE_RUN_TAG = "grpo_lab.failed_before_run"

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
        _hold_sweep_lock(sweep_dir)
        _refuse_new_sweep_over_earlier(config, sweep_dir)
        uri, name = config.logger.tracking_uri, config.logger.experiment_name
        exp_id = store.ensure_experiment(uri, name)
        keys = swept_keys(config)
        values = dict(split_override(o) for o in config.hydra.overrides.task)
        label = " ".join(f"{short_key(k)}={values.get(k, '(sweeper)')}" for k in keys)
        sweep_id = "/".join(sweep_dir.parts[-2:])
        client = store.client(uri)
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_"))
        parent_id, start = _parent_to_continue(config, client, exp_id, sweep_dir, keys)
        if parent_id is None:
            parent_id = client.create_run(
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
                    "grpo_lab.sweeper": sweeper,
                },
            ).info.run_id
        data = {
            "parent_run_id": parent_id,
            "experiment_id": exp_id,
            "tracking_uri": uri,
            "experiment_name": name,
            "sweep_id": sweep_id,
            "sweep_dir": str(sweep_dir.resolve()),
            "swept_keys": keys,
            "sweeper": sweeper,
            "start": start,  # which start of the sweep this is (grpo_lab.sweep_starts)
        }
        write_atomically(sweep_dir / SWEEP_FILE, json.dumps(data, indent=2) + "\n")
        log.info("MLflow sweep run %s (experiment %s): %s", parent_id, name, label)
        timeout = float(OmegaConf.select(config, "sweep.stop_timeout_s", default=600.0))
        (sweep_dir / STOPPING_FILE).unlink(missing_ok=True)  # an earlier start's
        self._watch_signals(client, exp_id, parent_id, timeout, sweep_dir, start)

    def _watch_signals(
        self,
        client: Any,
        experiment_id: str,
        parent_run_id: str,
        timeout_s: float,
        sweep_dir: Path,
        start: int,
    ) -> None:
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
            if _WATCH.get("stopping"):
                return  # a repeat: the stop under way already passed it on
            _WATCH["stopping"] = True
            # a job that gets the signal stops the sweep with it, and none starts from now on
            write_atomically(sweep_dir / STOPPING_FILE, f"{os.getpid()}\n")
            here = socket.gethostname()

            def job_pids() -> list[int]:
                """The processes on this host that run a job of this start; asked again while
                the sweep waits, so a job whose run starts after the signal gets it too. A run
                an earlier start left RUNNING (its process SIGKILLed) names a pid that another
                process may have now: it gets no signal."""
                pids = [
                    int(r.data.tags[PID_TAG])
                    for r in running_jobs()
                    if r.data.tags.get(HOST_TAG) == here
                    and r.data.tags.get(PID_TAG, "").isdigit()
                    and r.data.tags.get(START_TAG) == str(start)
                ]
                return [pid for pid in pids if pid != os.getpid()]  # this one handles its own

            def still_running() -> bool:
                return any(_alive(pid) for pid in job_pids())

            stopped = faults.stop_processes(signum, job_pids, still_running, timeout_s)
            if not stopped:  # their processes die with the sweep: their runs end KILLED
                for r in running_jobs():
                    why = (
                        f"not stopped {timeout_s:g} s after signal {signum} (sweep.stop_timeout_s)"
                    )
                    client.set_tag(r.info.run_id, ERROR_TAG, why)
                    client.set_terminated(r.info.run_id, "KILLED")
            faults.exit_interrupted(signum, f"sweep parent MLflow run {parent_run_id} KILLED")

        faults.add_cleanup(kill_parent)
        handlers = faults.signal_handlers(on_signal)
        handlers.__enter__()
        # Module state, not attributes: the joblib launcher pickles this callback for its workers.
        _WATCH.update(handlers=handlers, cleanup=kill_parent, client=client, parent=parent_run_id)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        allow_spawn_in_worker()
        note_started_run(None)
        if _in_worker(config):  # a launcher's worker process (joblib)
            from grpo_lab import faults

            # A stop signal to this worker stops its job, from here on (train installs its own
            # handlers once it starts). Left at the default, it would kill the worker, and the
            # broken pool would end every other job of the sweep.
            faults.set_signal_handlers(faults.raise_interrupted)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if _in_worker(config):
            from grpo_lab import faults

            # Between jobs there is nothing to stop: a signal that comes late is ignored.
            faults.set_signal_handlers(faults.ignore_signal)
        self._record_job_end(config, job_return)

    def _record_job_end(self, config: DictConfig, job_return: Any) -> None:

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
        if job_return.status == JobStatus.COMPLETED:  # train logged the objective on the run
            if run_id is not None:  # the job's run: started, resumed or read back FINISHED
                _retire_failure_records(client, sweep, str(config.hydra.runtime.output_dir))
            return
        if job_return.status != JobStatus.FAILED:
            return
        err: BaseException = job_return._return_value
        from grpo_lab.locks import Locked

        if isinstance(err, Locked):
            # another live process (a worker of an earlier start of this sweep) has this job:
            # its run is that process's to end; this start leaves it alone
            log.error("job %s not run: %s", config.hydra.job.num, err)
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = math.nan
            return
        if run_id is not None and run_id != started_run():
            # the folder's run is an earlier start's (FINISHED, KILLED): this job failed before
            # it took that run on (a resume refused, a config error); that record stays as it is
            run_id = None
        if run_id is None:  # failed before its run existed (config check, building the policy)
            # one record per job: this start's failure replaces an earlier start's
            _retire_failure_records(client, sweep, str(config.hydra.runtime.output_dir))
            name, tags = job_tags()
            tags[FAILED_BEFORE_RUN_TAG] = "true"
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
        runs = sorted(runs, key=_job_label)
        failed = [r for r in runs if r.info.status == "FAILED"]
        killed = [r for r in runs if r.info.status == "KILLED"]
        done = [
            r
            for r in runs
            if "objective" in r.data.metrics and not math.isnan(r.data.metrics["objective"])
        ]
        lines = ["| job | run | status | objective |", "|---|---|---|---|"]
        for r in runs:
            obj = r.data.metrics.get("objective")
            lines.append(
                f"| {_job_label(r)} | {r.info.run_name} | {r.info.status} | "
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
        status = "FAILED" if failed else "KILLED" if killed else "FINISHED"
        client.set_terminated(parent, status)
        _release_sweep_lock()
        sweep_dir = os.path.relpath(sweep["sweep_dir"])
        print(
            f"[grpo-lab] sweep: {len(runs)} jobs, {len(failed)} failed, {len(killed)} killed; "
            f"parent MLflow run {parent} {status}"
        )
        if killed:
            print("[grpo-lab] the same command with resume=auto resumes the killed jobs")
        print("\n".join(lines))
        print(f"[grpo-lab] compare them: grpo-lab report {sweep_dir}")
        print(f"[grpo-lab] MLflow UI: {ui_command(sweep['tracking_uri'])}")
        print(f"[grpo-lab]   then open {runs_url(sweep['tracking_uri'], sweep['experiment_id'])}")


def _job_label(run: Any) -> str:
    """A job's folder under the sweep dir (its swept values), else its job number: the same
    label in every start of the sweep."""
    folder = run.data.tags.get("grpo_lab.job_dir")
    return Path(folder).name if folder else run.data.tags.get("grpo_lab.job_num", "?")


def _in_worker(config: DictConfig) -> bool:
    """Whether this process runs a sweep's jobs for a launcher (a joblib worker, a submitit job)
    rather than the sweep itself: not a plain run, which keeps its own signal handling."""
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN and not runs_the_sweep()


def runs_the_sweep() -> bool:
    """Whether this process is the sweep's own (it holds the sweep lock), not a launcher's worker."""
    return "lock" in _WATCH


def end_abandoned_sweep(exit_code: Any) -> None:
    """The sweep's process is exiting without ``on_multirun_end`` (a launcher error: joblib's
    TerminatedWorkerError when a worker is killed): end the parent FAILED, naming the way on.
    Called by the CLI; nothing to do outside a sweep or once the sweep ended."""
    client, parent = _WATCH.get("client"), _WATCH.get("parent")
    if client is None or _WATCH.get("stopping") or "lock" not in _WATCH:
        return
    try:
        if client.get_run(parent).info.status == "RUNNING":
            client.set_tag(
                parent,
                ERROR_TAG,
                f"the sweep's process exited ({exit_code}) before its jobs ended; run the same "
                "command with resume=auto to continue it",
            )
            client.set_terminated(parent, "FAILED")
    finally:
        _release_sweep_lock()


def _hold_sweep_lock(sweep_dir: Path) -> None:
    """Lock the sweep dir for this sweep's process, or refuse: two sweep commands on one dir
    would run each job twice. A SystemExit: Hydra turns a callback's Exception into a warning."""
    from grpo_lab.locks import SWEEP_LOCK, Locked, OwnerLock

    lock = OwnerLock(sweep_dir / SWEEP_LOCK, "sweep dir", "hydra.sweep.dir", sweep_dir)
    try:
        _WATCH["lock"] = lock.acquire()
    except Locked as err:
        raise SystemExit(f"grpo-lab: {err}".replace("invalid config:\n  ", "")) from None


def _refuse_new_sweep_over_earlier(config: DictConfig, sweep_dir: Path) -> None:
    """A sweep without ``resume=auto`` in a sweep dir where an earlier sweep ran is refused: its
    jobs would start anew in folders that hold the earlier jobs' checkpoints (each refused:
    ``resume.refuse_other_run_in``), and ``mlflow_sweep.json`` would name a new parent run, so
    that ``resume=auto`` and the report no longer found the earlier jobs."""
    earlier = read_sweep_file(sweep_dir)
    if earlier is None or OmegaConf.select(config, "resume") == "auto":
        return
    _release_sweep_lock()
    raise SystemExit(
        f"grpo-lab: hydra.sweep.dir={sweep_dir}: an earlier sweep ran there (parent MLflow run "
        f"{earlier.get('parent_run_id')}). The same command with resume=auto continues it "
        "(finished jobs are kept, killed ones resumed, new values added); to start anew, give "
        f"another hydra.sweep.dir (or remove {sweep_dir})"
    )


def _release_sweep_lock() -> None:
    lock = _WATCH.pop("lock", None)
    if lock is not None:
        lock.release()


def _parent_to_continue(
    config: DictConfig, client: Any, experiment_id: str, sweep_dir: Path, keys: list[str]
) -> tuple[str | None, int]:
    """With ``resume=auto``: the parent run an earlier start of this sweep made, back to RUNNING,
    and the number of this start; (None, 1) for a new parent (no earlier start, or no
    ``resume=auto``).

    keys: this start's swept keys. The parent's ``grpo_lab.swept_keys`` becomes the keys any
    start swept: the report compares its jobs along them, and a key this start sweeps that an
    earlier one did not must not merge the jobs that differ in it."""
    from mlflow.exceptions import MlflowException

    earlier = read_sweep_file(sweep_dir)
    if OmegaConf.select(config, "resume") != "auto" or earlier is None:
        return None, 1
    if earlier.get("experiment_id") != experiment_id:
        log.warning(
            "resume=auto: the sweep in %s logged to experiment %s, this one to %s: new parent run",
            sweep_dir,
            earlier.get("experiment_id"),
            experiment_id,
        )
        return None, 1
    try:
        parent = client.get_run(earlier["parent_run_id"])
    except MlflowException:
        return None, 1
    if parent.info.lifecycle_stage != "active":
        return None, 1
    run_id = parent.info.run_id
    starts = int(parent.data.tags.get("grpo_lab.sweep_starts", "1")) + 1
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "grpo_lab.sweep_starts", str(starts))
    swept = json.loads(parent.data.tags.get("grpo_lab.swept_keys", "[]"))
    if any(k not in swept for k in keys):
        client.set_tag(
            run_id, "grpo_lab.swept_keys", json.dumps(swept + [k for k in keys if k not in swept])
        )
    if ERROR_TAG in parent.data.tags:  # "stopped by signal 15" is no longer what it is
        client.delete_tag(run_id, ERROR_TAG)
    log.info("resume=auto: sweep continues under parent run %s (start %d)", run_id, starts)
    return run_id, starts


def _retire_failure_records(client: Any, sweep: dict, job_dir: str) -> None:
    """Delete (restorable) the runs that recorded an earlier start of the job in ``job_dir``
    failing before it had a run: the job has its run now, or a new record replaces them. A job
    keeps one record, and a sweep that completed is not FAILED for a start that was fixed."""
    records = client.search_runs(
        [sweep["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{sweep['parent_run_id']}' "
        f"and tags.`{FAILED_BEFORE_RUN_TAG}` = 'true'",
        max_results=5000,
    )
    for r in records:
        if r.data.tags.get("grpo_lab.job_dir") == job_dir:
            client.set_tag(r.info.run_id, "grpo_lab.replaced", f"a later start of {job_dir}")
            client.delete_run(r.info.run_id)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a job's run can be RUNNING after its death)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return pid > 0
