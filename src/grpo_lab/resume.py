"""Resume: the checkpoint a run continues from, and the MLflow run it continues.

- ``ckpt_path=PATH`` resumes from PATH. ``resume=auto`` resumes from
  ``<output dir>/checkpoints/last.ckpt`` when that file exists and starts fresh otherwise, so one
  command line serves for the first start and every restart. The default run dir is new for
  every process (``outputs/<date>/<time>-<id>``), so ``auto`` needs the output dir fixed on the
  command line: ``paths.output_dir=DIR`` or ``hydra.run.dir=DIR`` (``hydra.sweep.dir`` in a sweep).
- The MLflow run continued is the one ``mlflow_run.json`` names beside the checkpoint's
  ``checkpoints/`` folder (``sweep.write_run_file``). Metrics are stepped by rollout, so what the
  resumed run logs lands after what the run logged before.
- ``resume=auto`` over a run that is done: a run FINISHED with this config is not run again
  (``finished_run``); a run that stopped before its first checkpoint has nothing to continue, so
  its MLflow run is deleted (restorable: ``mlflow runs restore``) and a new one takes its place
  (``retire_unresumable_run``). A job has one run, whatever happened to it.
- MLflow refuses to change a param once logged. A resume may change only the keys of
  ``RESUMABLE`` (how long the run goes, where it writes and logs, threads, progress bar); any
  other key whose value differs from the run's param is refused before any compute.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from grpo_lab import renames
from grpo_lab.config import ConfigError

log = logging.getLogger(__name__)

LAST = Path("checkpoints") / "last.ckpt"

# Keys a resume may change: none of them changes what the continued rollouts compute (the
# optimizer, scheduler and loop state come from the checkpoint). A key ending in "." covers
# every key under it. With train.scheduler=cosine or linear, train.rollouts also sets the
# schedule's length.
RESUMABLE = (
    "train.rollouts",
    "trainer.max_steps",
    "train.checkpoint_every",
    "ckpt_path",
    "resume",
    "paths.",
    "sft.cache_dir",
    "logger.",
    "num_threads",
    "trainer.enable_progress_bar",
    "sweep.",
)


def resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def checkpoint_to_resume(cfg: DictConfig, out: Path, fixed_output_dir: bool) -> Path | None:
    """The checkpoint this run starts from: ``ckpt_path``, or with ``resume=auto`` ``out``'s
    last.ckpt if there is one; None for a fresh start.

    fixed_output_dir: the output dir was given on the command line (``resume=auto`` needs it).
    """
    ckpt_path, mode = cfg.get("ckpt_path"), cfg.get("resume")
    if mode is None:
        return Path(ckpt_path) if ckpt_path else None
    if ckpt_path:
        raise ConfigError(
            f"invalid config:\n  resume={mode} with ckpt_path={ckpt_path}: give one of them "
            "(resume=auto finds the checkpoint itself; ckpt_path names one)"
        )
    if not fixed_output_dir:
        raise ConfigError(
            f"invalid config:\n  resume={mode} needs a fixed output directory: set "
            "paths.output_dir=DIR (or hydra.run.dir=DIR); the default run dir is new for every "
            "process, so it never holds a checkpoint to resume"
        )
    last = out / LAST
    if last.is_file():
        log.info("resume=auto: resuming from %s", last)
        return last
    log.info("resume=auto: no %s yet, starting fresh", last)
    return None


def refuse_other_run_in(out: Path, ckpt: Path | None, key: str, value: Any) -> None:
    """A run that is not the one whose ``last.ckpt`` is in ``out`` (a fresh start, a resume from
    a checkpoint elsewhere) is refused there: Lightning would save its checkpoints beside the
    earlier run's as ``-v1`` copies, ``last.ckpt`` would stay the earlier run's while
    ``mlflow_run.json`` named the new run, and eval and ``resume=auto`` would then read the
    earlier run's policy as the new run's. key, value: the config key that chose ``out`` and
    its value (a sweep's dir, for a job folder in it)."""
    last = out / LAST
    if not last.is_file():
        return
    if ckpt is not None and ckpt.resolve().parent == last.parent.resolve():
        return  # a checkpoint of the run in out: that run goes on
    from grpo_lab import sweep

    noted = sweep.read_run_file(out) if (out / sweep.RUN_FILE).is_file() else None
    whose = f" (MLflow run {noted['run_id']})" if noted else ""
    raise ConfigError(
        f"invalid config:\n  {key}={value}: {out} holds the checkpoints of an earlier "
        f"run{whose}; a new run there would leave {last} the earlier run's. resume=auto "
        f"continues that run; to start anew, give another {key} (or remove "
        f"{out / 'checkpoints'})"
    )


def changed_params(run_params: Mapping[str, str], params: Mapping[str, str]) -> dict[str, Any]:
    """key -> (value in the run, value now) for each param of the run that differs now.

    A key the run lacks (added to the config since the run started) is no change: it is logged
    on resume. A key the run has and the config lacks now has None as its value now.
    """
    return {
        key: (logged, params.get(key))
        for key, logged in run_params.items()
        if params.get(key) != logged
    }


def refused_changes(run_id: str, changed: Mapping[str, Any]) -> str | None:
    """The ConfigError message for the changed keys a resume may not change, or None."""
    refused = {k: v for k, v in changed.items() if not resumable(k)}
    if not refused:
        return None
    lines = [
        f"{key}={'(no such key)' if now is None else now} is invalid on resume: the MLflow run "
        f"this checkpoint continues ({run_id}) has {key}={logged}"
        for key, (logged, now) in sorted(refused.items())
    ]
    may = ", ".join(k + "*" if k.endswith(".") else k for k in RESUMABLE)
    lines.append(
        "a resumed run logs into the same MLflow run, whose params cannot change; a resume may "
        f"change only {may}. To change the others, start a new run (no ckpt_path, no resume)"
    )
    return "invalid config:\n  " + "\n  ".join(lines)


def run_to_continue(
    ckpt: Path | None, tracking_uri: str, params: Mapping[str, str]
) -> tuple[Any | None, dict[str, Any]]:
    """The MLflow run (``mlflow.entities.Run``) a resume from ``ckpt`` logs into, and the params
    it changes (key -> (value in the run, value now)).

    The run is the one ``mlflow_run.json`` names in the checkpoint's output dir; (None, {}) for
    a fresh start, or a checkpoint with no such file (a new run is made). params: this run's, as
    ``tracking.config_params`` gives them. Raises a ConfigError naming the key when the store
    does not hold the run, or when a param changes that a resume may not change.
    """
    from mlflow.exceptions import MlflowException

    from grpo_lab import store, sweep

    noted = sweep.read_run_file(ckpt) if ckpt is not None else None
    if noted is None:
        if ckpt is not None:
            log.warning(
                "no %s above %s: the resumed run logs to a new MLflow run", sweep.RUN_FILE, ckpt
            )
        return None, {}
    store.check_reachable(tracking_uri)  # an unreachable store is named as such
    try:
        run = store.client(tracking_uri).get_run(noted["run_id"])
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ConfigError(
            f"invalid config:\n  logger.tracking_uri={tracking_uri} does not hold MLflow run "
            f"{noted['run_id']}, which {ckpt} continues ({sweep.RUN_FILE} says it is in "
            f"{noted.get('tracking_uri')}); expected the store that run logged to"
        ) from err
    # a run logged before the GRPO step's parts holds some keys under their old names
    changed = changed_params(renames.new_params(run.data.params), params)
    refused = refused_changes(run.info.run_id, changed)
    if refused:
        raise ConfigError(refused)
    return run, changed


RESUME_CHANGES_TAG = "grpo_lab.resume_changes"  # tracking.note_resume: key -> value this start

# Keys that extend a finished run: with another value, resume=auto continues it.
LENGTH_KEYS = ("train.rollouts", "trainer.max_steps")


def _noted_run(out: Path, tracking_uri: str) -> Any | None:
    """The MLflow run ``out/mlflow_run.json`` names, or None (no file, or the store lacks it)."""
    from mlflow.exceptions import MlflowException

    from grpo_lab import store, sweep

    noted = sweep.read_run_file(out) if (out / sweep.RUN_FILE).is_file() else None
    if noted is None:
        return None
    store.check_reachable(tracking_uri)
    try:
        return store.client(tracking_uri).get_run(noted["run_id"])
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None


def finished_run(out: Path, tracking_uri: str, params: Mapping[str, str]) -> Any | None:
    """The run in ``out`` if it is FINISHED and this config would only repeat it, else None.

    Repeat: every param as the run last ran with it (its params, and what a resume changed:
    ``grpo_lab.resume_changes``), except keys that change nothing computed (``RESUMABLE``);
    ``train.rollouts`` or ``trainer.max_steps`` changed extends the run instead.
    """
    run = _noted_run(out, tracking_uri)
    if run is None or run.info.status != "FINISHED" or run.info.lifecycle_stage != "active":
        return None
    # what the run last ran with: its params keep the first start's values, and a resume notes
    # what it changed (an extended run FINISHED at its new train.rollouts)
    ran = renames.new_params(run.data.params)
    ran.update(json.loads(run.data.tags.get(RESUME_CHANGES_TAG) or "{}"))
    changed = changed_params(ran, params)
    if any(not resumable(k) or k in LENGTH_KEYS for k in changed):
        return None  # extended, or refused with its reason by run_to_continue
    return run


def retire_unresumable_run(out: Path, tracking_uri: str) -> None:
    """``out`` has an MLflow run but no checkpoint: delete that run (restorable) so the fresh
    start is the job's one run. A FINISHED run is kept (its checkpoints were removed by hand)."""
    from grpo_lab import store

    run = _noted_run(out, tracking_uri)
    if run is None or run.info.status == "FINISHED" or run.info.lifecycle_stage != "active":
        return
    client = store.client(tracking_uri)
    run_id = run.info.run_id
    client.set_tag(
        run_id,
        "grpo_lab.replaced",
        f"{out} had no checkpoint to resume from; resume=auto started the run again",
    )
    client.delete_run(run_id)
    log.warning(
        "resume=auto: MLflow run %s (%s) stopped before its first checkpoint; it is deleted "
        "(mlflow runs restore --run-id %s brings it back) and the run starts again",
        run_id,
        run.info.status,
        run_id,
    )
