"""Faults, with nothing lost: a signal stops a run cleanly, checkpoints are replaced atomically,
and an output directory that cannot be written is an error before any compute.

- SIGINT or SIGTERM during training (``StopOnSignal``): the current optimizer step finishes, then
  ``train`` saves ``last.ckpt``, ends the MLflow run as KILLED and exits with 128 + the signal
  number (130, 143). Outside training (warm start, eval) the signal stops the run at once
  (``signal_handlers(raise_interrupted)``): there is no GRPO state yet to save.
- SIGUSR1 and SIGUSR2, a cluster's notice of preemption (Lightning's SLURM auto-requeue sends
  SIGUSR1, submitit's ``signal_delay_s`` SIGUSR2), stop the same way; then the job is requeued
  (``after_preemption``), and the requeued job resumes through ``resume=auto``.
- Once a stop is under way, repeated signals do not cut the final save short: SIGTERM repeats are
  ignored (a scheduler may send several), and the final save and the MLflow status update run
  under ``deferred_signals``. Only a second Ctrl-C, seconds after the first and before the step
  (and the eval it has) ends, stops at once (with the last periodic checkpoint kept).
- A sweep (``sweep.MLflowSweepCallback``) registers a cleanup with ``add_cleanup`` that marks its
  parent run KILLED; ``exit_interrupted`` runs the cleanups before the process exits.
- ``AtomicCheckpointIO`` writes each checkpoint to a temporary file beside it, then renames it
  into place, so a full disk during a save keeps the earlier ``last.ckpt`` intact.
- ``check_writable_dir``: the output directory is created and written once before any compute.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from grpo_lab.config import ConfigError

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # a scheduler's "you will be stopped soon"
REPEAT_WINDOW_S = 3.0  # a signal this soon after the first is the same request, not a second


class Interrupted(SystemExit):
    """SIGINT or SIGTERM ended the run or the sweep; the exit status is 128 + the signal number.

    A SystemExit, not an Exception: Hydra's launchers record an Exception as a failed job and go
    on to the next one, while a signal has to end the whole sweep.
    """

    def __init__(self, signum: int, detail: str = "", chained: Any = None) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.detail = detail
        self.chained = chained  # a preemption signal's earlier handler (``after_preemption``)


def raise_interrupted(signum: int, frame: Any = None) -> NoReturn:
    """A signal handler that stops at once: the code running now unwinds through ``finally``."""
    raise Interrupted(signum)


@contextmanager
def signal_handlers(
    handler: Callable[[int, Any], Any], signals: tuple[int, ...] = STOP_SIGNALS
) -> Iterator[None]:
    """Handle ``signals`` (SIGINT and SIGTERM) with ``handler`` inside the block, then restore
    the previous handlers.

    Python delivers signals to the main thread only, so elsewhere (a thread-based launcher) this
    installs nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def set_signal_handlers(handler: Callable[[int, Any], Any]) -> None:
    """Handle SIGINT and SIGTERM with ``handler`` from now on (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, handler)


def ignore_signal(signum: int, frame: Any = None) -> None:
    """A handler for when there is nothing to stop: say so and go on."""
    log.warning("%s ignored: no job is running in this process", signal.Signals(signum).name)


@contextmanager
def deferred_signals(
    signals: tuple[int, ...] = STOP_SIGNALS + PREEMPT_SIGNALS, final: bool = True
) -> Iterator[list[int]]:
    """Inside the block, ``signals`` (stop and preemption signals) are recorded, not handled:
    the block (the final checkpoint save, the MLflow status update) runs to its end. Yields the
    list of signals that arrived; the caller decides what they mean (a repeat of the stop under
    way: nothing, said in a warning unless ``final`` is false).

    Python-level, not ``pthread_sigmask``: the Python handler runs in the main thread whichever
    thread the OS delivers the signal to, so masking the main thread alone would not defer it.
    """
    caught: list[int] = []
    with signal_handlers(lambda signum, frame: caught.append(signum), signals):
        yield caught
    for signum in caught if final else ():
        log.warning(
            "%s during the final save: ignored, the run is stopping", signal.Signals(signum).name
        )


_CLEANUPS: list[Callable[[int], None]] = []


def add_cleanup(fn: Callable[[int], None]) -> None:
    """Run ``fn(signum)`` when a signal ends this process (a sweep marks its parent run KILLED)."""
    _CLEANUPS.append(fn)


def remove_cleanup(fn: Callable[[int], None]) -> None:
    if fn in _CLEANUPS:
        _CLEANUPS.remove(fn)


def exit_interrupted(signum: int, message: str, then: Callable[[], None] | None = None) -> NoReturn:
    """Run the registered cleanups, newest first, print ``message``, run ``then`` (a requeue)
    and exit with 128 + signum."""
    for fn in reversed(list(_CLEANUPS)):
        try:
            fn(signum)
        except Exception:  # one cleanup failing must not keep the others from running
            log.exception("cleanup after %s failed", signal.Signals(signum).name)
    name = signal.Signals(signum).name
    print(f"[grpo-lab] stopped by {name}: {message}", file=sys.stderr, flush=True)
    if then is not None:
        then()
    raise Interrupted(signum, message)


class StopOnSignal(L.Callback):
    """A stop or preemption signal during ``fit``: finish the current optimizer step, then stop.

    The handler only asks for ``trainer.should_stop``; the loop ends after the current batch and
    ``train`` saves the checkpoint. It replaces, for the length of the training loop, the handlers
    Lightning installs (its SIGTERM handler would raise ``SIGTERMException`` and mark the run
    FAILED; its SLURM SIGUSR1 handler would save an ``hpc_ckpt`` that bypasses ``resume=auto``).
    The handler that was there before for a preemption signal (submitit's requeue) is kept in
    ``chained`` for ``after_preemption``. Repeats: see the module docstring.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.chained: Any = None  # the previous handler of the preemption signal received
        self._first_at = 0.0
        self._step_done = False  # the step under way when the signal came has ended
        self._previous: dict[int, Any] = {}
        self._handlers: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signals = STOP_SIGNALS + PREEMPT_SIGNALS
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: _handler_before_lightning(trainer, s) for s in PREEMPT_SIGNALS}

        def stop(signum: int, frame: Any) -> None:
            if self.signum is not None:
                # Ctrl-C reaches a joblib worker twice: from the terminal (the whole process
                # group) and passed on by the sweep. A repeat within seconds is the same request,
                # and so is any repeat of SIGTERM or a preemption notice. A second Ctrl-C while
                # the step, or the eval it has, still runs is a person who will not wait for it.
                impatient = (
                    signum == signal.SIGINT
                    and (not self._step_done or trainer.validating)
                    and time.monotonic() - self._first_at >= REPEAT_WINDOW_S
                )
                if impatient:
                    raise Interrupted(signum, "second signal while stopping")
                return
            self.signum, self._first_at = signum, time.monotonic()
            self.chained = self._previous.get(signum)
            # Under DDP only on_train_batch_end may stop the loop, with every rank's say: set
            # here, between that decision and the loop's check (during a checkpoint save, say),
            # this rank alone would leave the loop and the others wait for it forever.
            if trainer.world_size == 1:
                trainer.should_stop = True
                self._skip_unscheduled_eval(trainer)
            log.warning(
                "%s received: stopping after the current step, then saving a checkpoint",
                signal.Signals(signum).name,
            )

        self._handlers = signal_handlers(stop, signals)
        self._handlers.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Under DDP a signal may reach one rank only (e.g. the launching process): every rank
        # must stop after the same step, or one waits forever at the checkpoint's barrier.
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
            if stop and self.signum is None:
                self.signum = signal.SIGTERM
            trainer.should_stop = trainer.should_stop or stop
        if self.signum is not None:
            self._step_done = True  # from here on only checkpoint saves run: let them finish
            self._skip_unscheduled_eval(trainer)

    @staticmethod
    def _skip_unscheduled_eval(trainer: L.Trainer) -> None:
        """Lightning validates after a step when ``should_stop`` is set (for early stopping): an
        eval nobody scheduled, in the time a preemption notice leaves, logged at a step an
        undisturbed run does not evaluate at. Skip it, from the signal on (it may come after
        this step's ``on_train_batch_end``, while the step's metrics are logged), but keep the
        eval that this step has anyway (``train.eval_every``): the resumed run starts after it
        and would not make up for it. An eval under way ends as it is."""
        if trainer.validating:
            return
        every = trainer.val_check_batch
        step = trainer.fit_loop.epoch_loop.total_batch_idx + 1  # this step's, as Lightning counts
        scheduled = isinstance(every, int) and every > 0 and step % every == 0
        if not scheduled:
            trainer.limit_val_batches = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()  # on_train_end does not run when the loop raises

    def release(self) -> None:
        """Give the signals back once ``train`` has saved the stopped run's checkpoint. Until
        then a stopped run keeps this handler, which ignores repeats, so that no signal lands
        between the end of the loop and the save."""
        self._restore(stopped_and_saved=True)

    def _restore(self, stopped_and_saved: bool = False) -> None:
        if self.signum is not None and not stopped_and_saved:
            return
        if self._handlers is not None:
            handlers, self._handlers = self._handlers, None
            handlers.__exit__(None, None, None)


def _handler_before_lightning(trainer: L.Trainer, signum: int) -> Any:
    """The handler of ``signum`` that was there before ``fit`` (submitit's requeue), not the one
    Lightning's signal connector set for the fit: run after the stop, Lightning's SLURM handler
    would save an ``hpc_ckpt`` beside the output (minutes of a preemption's grace period, and a
    checkpoint ``resume=auto`` does not read) and call a trainer that has ended."""
    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

    handler = signal.getsignal(signum)
    if isinstance(handler, _HandlersCompose):
        connector = getattr(trainer, "_signal_connector", None)
        handler = getattr(connector, "_original_handlers", {}).get(signum)
    return handler


def after_preemption(signum: int, chained: Any, rank0: bool) -> None:
    """After a preempted run saved ``last.ckpt`` and ended KILLED: have it requeued.

    SIGUSR1 in a SLURM batch job (Lightning's auto-requeue signal): ``scontrol requeue`` the job
    from rank 0, as Lightning does. A handler that was installed before training (submitit's
    SIGUSR2 handler, which resubmits the Hydra job and exits) is then called. Either way the
    requeued job runs the same command, and ``resume=auto`` continues the run.
    """
    if signum not in PREEMPT_SIGNALS:
        return
    job = os.environ.get("SLURM_JOB_ID")
    if signum == signal.SIGUSR1 and rank0 and job and not callable(chained):
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        if array_job is not None:
            job = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        import subprocess

        try:
            result: Any = subprocess.call(["scontrol", "requeue", job])
        except FileNotFoundError:
            result = "not found on PATH"
        if result == 0:
            log.warning("requeued SLURM job %s", job)
        else:
            log.warning("could not requeue SLURM job %s (scontrol: %s)", job, result)
    if callable(chained):
        chained(signum, None)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in its own directory, then renames it into place.

    ``os.replace`` within one directory is atomic: a save that fails midway (a full disk) leaves
    the earlier file of that name, ``last.ckpt`` among them, whole. Lightning's own save stages
    the file in the system temp dir and moves it, which becomes an in-place copy (truncate, then
    write) when that dir is on another filesystem, as a tmpfs ``/tmp`` is.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__}")
        import torch

        # Serialized in memory first, as Lightning does: a value that cannot be pickled fails
        # before any file is touched, and a write error is an OSError that names its cause.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            # mkstemp makes the file 0600; a checkpoint gets the mode any new file gets here
            # (0666 less the umask), as Lightning's own save gives it.
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable_dir(path: Path, key: str, value: Any) -> None:
    """Create ``path`` and write a file in it, or raise a ConfigError naming ``key=value``.

    Runs before any compute, so a run never trains for an hour to fail at its first checkpoint.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(
            f"invalid config:\n  {key}={value} is not usable: cannot write {path} "
            f"({err.strerror or err}); expected a directory this process can create and write"
        ) from err


def stop_processes(
    signum: int,
    pids: list[int] | Callable[[], list[int]],
    still_running: Callable[[], bool],
    timeout_s: float,
) -> bool:
    """Send ``signum`` to ``pids``, then wait while ``still_running()``, at most ``timeout_s``
    (``sweep.stop_timeout_s``: as long as a step and a save take). Returns whether they stopped.

    pids: the processes, or a function that lists them, asked again while waiting: a job that
    starts its run after the signal (it was past the sweep's stop file, before its MLflow run)
    gets the signal too, rather than running on unsignalled until the timeout.

    A joblib (loky) sweep: a signal reaches the launcher's process only, and loky kills its
    workers outright (SIGKILL) when the launcher stops. Sent first, the signal lets each job stop
    on its own handler (checkpoint saved, MLflow run KILLED). Only processes that run a job get
    it: an idle loky worker has no handler and would die, and loky then kills the others.
    """
    find = pids if callable(pids) else (lambda: pids)
    signalled: set[int] = set()

    def signal_new() -> None:
        for pid in find():
            if pid not in signalled:
                signalled.add(pid)
                with suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)

    signal_new()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and still_running():
        time.sleep(0.5)
        signal_new()
    return not still_running()
