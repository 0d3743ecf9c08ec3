"""Sweeps: one MLflow parent run per ``-m`` sweep, one nested run per job, failures recorded.

``grpo-lab train -m G=4,8 epsilon=0.1,0.2`` goes through Hydra's launcher and sweeper; this
package adds what they lack, one concern a module:

- ``args``: run by the CLI before Hydra (``prepare_argv``); names the missing plugin package
  (``pip install 'grpo-lab[sweep]'``) and expands ``seeds=3`` into ``seed=0,1,2``.
- ``gpu_slots``: ``grpo_lab_device``, the resolver ``hydra/launcher=parallel_gpu`` sets
  CUDA_VISIBLE_DEVICES with: each joblib worker holds one GPU slot, a lock file in the sweep
  dir, for its life. Importing this package registers it. More workers than GPUs are refused
  before the sweep, and a job given a GPU that is not there refuses to train (``check_job_gpu``).
- ``job_dirs``: ``grpo_lab_job_dir``, the resolver that names a grid sweep's job folders by
  their swept values (``G-4+beta-0+seed-0``), so a sweep run again finds each job by its
  values. Importing this package registers it.
- ``run_files``: ``mlflow_sweep.json`` and ``mlflow_run.json``, how jobs, eval and resume find
  their MLflow runs, and ``record_failure``.
- ``naming``: run names and tags: what ``train.make_logger`` puts on a job's run (parent id,
  sweep id, job number, overrides) and its readable name from the swept values only
  (``G=8 eps=0.2 beta=0.04``); the report names configurations the same way.
- ``callback``: ``MLflowSweepCallback`` (registered in ``conf/hydra/default.yaml``) creates the
  parent run, records failed jobs and keeps the sweep going, and finishes the parent run.

Imports stay light (no torch, no mlflow): the CLI imports this package on every command.
"""

from grpo_lab.sweep.args import (
    SweepArgumentError,
    check_gpu_workers,
    check_plugins,
    expand_seeds,
    prepare_argv,
)
from grpo_lab.sweep.callback import MLflowSweepCallback
from grpo_lab.sweep.gpu_slots import (
    _GPU_SLOT,
    GPU_SLOT_WAIT_S,
    GPU_SLOTS_DIR,
    _device_for_worker,
    allow_spawn_in_worker,
    check_job_gpu,
    claim_gpu_slot,
    gpu_workers_error,
    job_gpu_error,
    sweep_dir_of_job,
    visible_gpu_count,
)
from grpo_lab.sweep.job_dirs import job_dir_name
from grpo_lab.sweep.naming import (
    job_tags,
    run_name_from_overrides,
    short_key,
    short_value,
    split_override,
    swept_keys,
)
from grpo_lab.sweep.run_files import (
    ERROR_TAG,
    HOST_TAG,
    PID_TAG,
    RUN_FILE,
    STOPPING_FILE,
    SWEEP_FILE,
    note_started_run,
    read_run_file,
    read_sweep_file,
    record_failure,
    started_run,
    sweep_stopping,
    write_run_file,
)

__all__ = [
    "ERROR_TAG",
    "GPU_SLOTS_DIR",
    "GPU_SLOT_WAIT_S",
    "HOST_TAG",
    "PID_TAG",
    "RUN_FILE",
    "STOPPING_FILE",
    "SWEEP_FILE",
    "MLflowSweepCallback",
    "SweepArgumentError",
    "_GPU_SLOT",
    "_device_for_worker",
    "allow_spawn_in_worker",
    "check_gpu_workers",
    "check_job_gpu",
    "check_plugins",
    "claim_gpu_slot",
    "expand_seeds",
    "gpu_workers_error",
    "job_dir_name",
    "job_gpu_error",
    "job_tags",
    "note_started_run",
    "prepare_argv",
    "read_run_file",
    "read_sweep_file",
    "record_failure",
    "run_name_from_overrides",
    "short_key",
    "short_value",
    "split_override",
    "started_run",
    "sweep_stopping",
    "swept_keys",
    "sweep_dir_of_job",
    "visible_gpu_count",
    "write_run_file",
]
