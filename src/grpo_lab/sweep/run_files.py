"""Where a sweep and its runs note their MLflow ids on disk, and how a failed run is recorded.

- ``<sweep dir>/mlflow_sweep.json`` (``SWEEP_FILE``): the parent run, experiment and swept keys,
  written by the sweep callback before any job starts, read by jobs in other processes.
- ``<run output dir>/mlflow_run.json`` (``RUN_FILE``): a run's MLflow id, next to
  ``checkpoints/``; eval, resume and the sweep callback find the run through it.
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any

SWEEP_FILE = "mlflow_sweep.json"  # in the sweep dir: parent run, experiment, swept keys
# in the sweep dir while a signal stops the sweep: its jobs stop with it, none starts
STOPPING_FILE = "grpo_lab_sweep.stopping"
RUN_FILE = "mlflow_run.json"  # in each run's output dir: its MLflow run (eval links to it)
ERROR_TAG = "grpo_lab.error"
# Where a job runs: a sweep stopped by a signal passes it on to its jobs on this machine.
HOST_TAG, PID_TAG = "grpo_lab.host", "grpo_lab.pid"
START_TAG = (
    "grpo_lab.sweep_start"  # the start of the sweep that runs the job (its pid is that start's)
)


def record_failure(client: Any, run_id: str, err: BaseException) -> None:
    """Tag a run with the error (``grpo_lab.error``) and attach its traceback as ``error/traceback.txt``.

    client: a ``store.RetryingClient`` (``store.client(uri)`` or a ``RunLogger``'s experiment).
    """
    message = f"{type(err).__name__}: {err}"
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    client.set_tag(run_id, ERROR_TAG, message[:4000])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "traceback.txt"
        path.write_text(text)
        client.log_artifact(run_id, str(path), artifact_path="error")


def write_run_file(out_dir: str | Path, run_id: str, experiment_id: str, tracking_uri: str) -> None:
    """Note a run's MLflow id in its output dir (next to ``checkpoints/``) for eval and the sweep."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri}
    write_atomically(out / RUN_FILE, json.dumps(data, indent=2) + "\n")


_STARTED: dict[str, str | None] = {"run_id": None}


def note_started_run(run_id: str | None) -> None:
    """Note the MLflow run this process's current job started or resumed (``train``), or None
    when a job starts: a failure of the job is that run's, not an earlier start's."""
    _STARTED["run_id"] = run_id


def started_run() -> str | None:
    """The run ``note_started_run`` noted: the current job's, once it has one."""
    return _STARTED["run_id"]


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place: a process
    killed meanwhile leaves the old file or the new, and a reader never sees half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_run_file(path: str | Path) -> dict | None:
    """The run noted by ``write_run_file`` in ``path`` or the nearest parent dir that has one."""
    p = Path(path).resolve()
    for d in [p, *p.parents] if p.is_dir() else list(p.parents):
        f = d / RUN_FILE
        if f.is_file():
            return json.loads(f.read_text())
    return None


def sweep_stopping(sweep_dir: str | Path) -> bool:
    """Whether a signal is stopping the sweep in ``sweep_dir`` (``STOPPING_FILE`` is there)."""
    return (Path(sweep_dir) / STOPPING_FILE).is_file()


def read_sweep_file(sweep_dir: str | Path) -> dict | None:
    """What the sweep callback noted in ``<sweep_dir>/mlflow_sweep.json``, or None."""
    f = Path(sweep_dir) / SWEEP_FILE
    return json.loads(f.read_text()) if f.is_file() else None
