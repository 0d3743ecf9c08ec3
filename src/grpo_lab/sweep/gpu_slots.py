"""One GPU per joblib worker (``hydra/launcher=parallel_gpu``): slot locks in the sweep dir.

The launcher's config sets each job's CUDA_VISIBLE_DEVICES with the ``grpo_lab_device``
resolver, registered when ``grpo_lab.sweep`` is imported: each worker claims one GPU slot, a
lock file in the sweep dir, and holds it for its life.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

GPU_SLOTS_DIR = ".gpu-slots"  # in the sweep dir: <slot>.lock, held by the worker using that GPU
GPU_SLOT_WAIT_S = 120.0  # how long a new worker waits for a slot an exiting worker still holds

# This process's GPU: its pid, the CUDA_VISIBLE_DEVICES value, the open file whose lock holds the slot.
# The pid tells a forked child that the slot it sees is its parent's.
_GPU_SLOT: dict[str, Any] = {}


def claim_gpu_slot(lock_dir: str | Path, n_slots: int, wait_s: float = GPU_SLOT_WAIT_S):
    """The lowest free slot in ``[0, n_slots)`` and the open file whose exclusive lock holds it.

    The lock (``fcntl.flock`` on ``<lock_dir>/<slot>.lock``) lasts while the file stays open, and
    the OS drops it when the process ends, however it ends: a slot is free exactly when no live
    worker holds it. A worker that finds every slot held waits up to ``wait_s`` (a worker loky
    replaced may still be exiting), then fails.
    """
    import fcntl
    import time

    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        for slot in range(n_slots):
            f = open(lock_dir / f"{slot}.lock", "a")  # noqa: SIM115 -- held open for the process's life
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            return slot, f
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"all {n_slots} GPU slots in {lock_dir} are held by other workers of this sweep; "
                f"hydra.launcher.n_jobs={n_slots} is the number of GPUs, one worker per GPU"
            )
        time.sleep(0.2)


def sweep_dir_of_job(job_output_dir: str | Path, job_subdir: str | Path) -> Path:
    """The sweep dir: the job's output dir less its subdir (``hydra.sweep.subdir``).

    Not ``${hydra.sweep.dir}``: Hydra resolves a job's env_set on a copy of its config that lost
    the resolver cache, so ``${now:...}`` in the sweep dir gives the time of the job's start,
    another folder for each worker that starts in another second.
    """
    out, sub = Path(str(job_output_dir)), Path(str(job_subdir))
    k = len(sub.parts)
    return Path(*out.parts[:-k]) if k and out.parts[-k:] == sub.parts else out.parent


def _device_for_worker(job_output_dir: Any, job_subdir: Any, n_gpus: Any) -> str:
    """CUDA_VISIBLE_DEVICES for this joblib worker: the GPU of the slot it holds (``parallel_gpu``).

    Each worker process claims, on its first job, the lowest slot no other live worker of the
    sweep holds, and keeps it for its life: loky reuses workers and CUDA reads the variable once
    per process. Job numbers cannot serve: a worker's first job can be any job (joblib batches,
    a replaced worker), so two running workers could get the same GPU. Slot i is GPU i, or the
    i-th entry of the CUDA_VISIBLE_DEVICES the sweep was started with.

    It does not count the GPUs (that could initialise CUDA before the variable is set): the CLI
    refuses more workers than GPUs before the sweep starts (``gpu_workers_error``), and a job
    that finds no GPU behind its slot refuses to train (``check_job_gpu``).
    """
    if _GPU_SLOT.get("pid") == os.getpid():
        return _GPU_SLOT["device"]
    try:
        n = int(n_gpus)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(
            f"hydra.launcher.n_jobs={n_gpus} is invalid with hydra/launcher=parallel_gpu: "
            "expected the number of GPUs, an integer >= 1 (one worker per GPU)"
        )
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and len(visible) < n:
        raise ValueError(
            f"hydra.launcher.n_jobs={n} is invalid with CUDA_VISIBLE_DEVICES={','.join(visible)}: "
            f"expected at most {len(visible)} workers, one per visible GPU"
        )
    slot, lock = claim_gpu_slot(sweep_dir_of_job(job_output_dir, job_subdir) / GPU_SLOTS_DIR, n)
    device = visible[slot].strip() if visible else str(slot)
    _GPU_SLOT.update(pid=os.getpid(), device=device, lock=lock)
    log.info("GPU slot %d of %d: CUDA_VISIBLE_DEVICES=%s (pid %d)", slot, n, device, os.getpid())
    return device


def visible_gpu_count() -> int:
    """The GPUs this process sees, CUDA_VISIBLE_DEVICES applied (0 without CUDA).

    ``torch.cuda.device_count()`` counts through NVML where it can, without initialising CUDA.
    Even where it cannot, it runs in the sweep's own process (the CLI, before Hydra), which
    trains nothing: its joblib workers are fresh processes that set their own
    CUDA_VISIBLE_DEVICES before CUDA first reads it. A worker must not count before that
    (``_device_for_worker``): CUDA would then keep the devices it saw first.
    """
    import torch

    return torch.cuda.device_count()


def gpu_workers_error(n_jobs: int, n_gpus: int) -> str | None:
    """Why ``n_jobs`` parallel_gpu workers cannot run on ``n_gpus`` GPUs, or None if they can.

    A worker beyond the GPUs would get a CUDA_VISIBLE_DEVICES with no GPU behind it, and its
    jobs, on ``trainer.accelerator=auto``, would train on the CPU without a word.
    """
    if n_jobs <= n_gpus:
        return None
    fix = (
        f"set hydra.launcher.n_jobs={n_gpus} (the other jobs wait for a free GPU)"
        if n_gpus
        else "use hydra/launcher=parallel for jobs on the CPU"
    )
    gpus = f"{n_gpus} GPU" + ("" if n_gpus == 1 else "s")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    among = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    return (
        f"hydra.launcher.n_jobs={n_jobs} is invalid with hydra/launcher=parallel_gpu: "
        f"torch.cuda.device_count() sees {gpus} here{among}, and each worker holds one GPU; "
        f"{fix}"
    )


def job_gpu_error(accelerator: str, n_gpus: int, visible: str | None) -> str | None:
    """Why a parallel_gpu job that sees ``n_gpus`` GPUs must not train, or None.

    A job on ``trainer.accelerator`` auto, gpu or cuda was given a GPU; one that sees none (its
    CUDA_VISIBLE_DEVICES, ``visible``, names a device that is not there) would train on the CPU
    (Lightning's auto) or fail deep inside Lightning (gpu). ``trainer.accelerator=cpu`` asks
    for no GPU, and the slots only spread its jobs.
    """
    if accelerator == "cpu" or n_gpus > 0:
        return None
    return (
        f"trainer.accelerator={accelerator} is invalid here: this hydra/launcher=parallel_gpu "
        f"job was given CUDA_VISIBLE_DEVICES={visible} and torch sees no GPU there, so it would "
        "train on the CPU; give hydra.launcher.n_jobs at most the number of GPUs, or "
        "trainer.accelerator=cpu for jobs on the CPU"
    )


def check_job_gpu(cfg: Any) -> None:
    """Raise a ConfigError (``job_gpu_error``) in a parallel_gpu job that has no GPU to use."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    if HydraConfig.get().runtime.choices.get("hydra/launcher") != "parallel_gpu":
        return
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    n_gpus = visible_gpu_count() if accelerator != "cpu" else 0
    error = job_gpu_error(accelerator, n_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if error is not None:
        from grpo_lab.config import ConfigError

        raise ConfigError(f"invalid config:\n  {error}")


if not OmegaConf.has_resolver("grpo_lab_device"):
    OmegaConf.register_new_resolver("grpo_lab_device", _device_for_worker)


def allow_spawn_in_worker() -> None:
    """Let a job in a joblib worker start processes (``trainer.strategy=ddp_spawn``).

    Loky sets its workers' default start method to ``loky``, and a spawned child sets the start
    method of its parent before it runs anything: plain multiprocessing knows no ``loky``, so every
    rank died at start (ValueError: cannot find context for 'loky'). The worker's own pool does
    not use the default, so ``spawn`` is safe there.
    """
    import multiprocessing

    if multiprocessing.get_start_method(allow_none=True) == "loky":
        multiprocessing.set_start_method("spawn", force=True)
