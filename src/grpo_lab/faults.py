"""Faults, with nothing lost: a signal stops a run cleanly, checkpoints are replaced atomically,
and an output directory that cannot be written is an error before any compute.

- SIGINT or SIGTERM during training (``StopOnSignal``): the current optimizer step finishes, then
  ``train`` saves ``last.ckpt``, ends the MLflow run as KILLED and exits with 128 + the signal
  number (130, 143). Outside training (warm start, eval) the signal stops the run at once
  (``signal_handlers(raise_interrupted)``): there is no GRPO state yet to save.
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
REPEAT_WINDOW_S = 3.0  # a signal this soon after the first is the same request, not a second


class Interrupted(SystemExit):
    """SIGINT or SIGTERM ended the run or the sweep; the exit status is 128 + the signal number.

    A SystemExit, not an Exception: Hydra's launchers record an Exception as a failed job and go
    on to the next one, while a signal has to end the whole sweep.
    """

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.detail = detail


def raise_interrupted(signum: int, frame: Any = None) -> NoReturn:
    """A signal handler that stops at once: the code running now unwinds through ``finally``."""
    raise Interrupted(signum)


@contextmanager
def signal_handlers(handler: Callable[[int, Any], Any]) -> Iterator[None]:
    """Handle SIGINT and SIGTERM with ``handler`` inside the block, then restore the previous ones.

    Python delivers signals to the main thread only, so elsewhere (a thread-based launcher) this
    installs nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


_CLEANUPS: list[Callable[[int], None]] = []


def add_cleanup(fn: Callable[[int], None]) -> None:
    """Run ``fn(signum)`` when a signal ends this process (a sweep marks its parent run KILLED)."""
    _CLEANUPS.append(fn)


def remove_cleanup(fn: Callable[[int], None]) -> None:
    if fn in _CLEANUPS:
        _CLEANUPS.remove(fn)


def exit_interrupted(signum: int, message: str) -> NoReturn:
    """Run the registered cleanups, newest first, print ``message`` and exit with 128 + signum."""
    for fn in reversed(list(_CLEANUPS)):
        try:
            fn(signum)
        except Exception:  # one cleanup failing must not keep the others from running
            log.exception("cleanup after %s failed", signal.Signals(signum).name)
    name = signal.Signals(signum).name
    print(f"[grpo-lab] stopped by {name}: {message}", file=sys.stderr, flush=True)
    raise Interrupted(signum, message)


class StopOnSignal(L.Callback):
    """SIGINT or SIGTERM during ``fit``: finish the current optimizer step, then stop.

    The handler only asks for ``trainer.should_stop``; the loop ends after the current batch and
    ``train`` saves the checkpoint. It replaces, for the length of the training loop, the SIGTERM
    handler Lightning installs, which would raise ``SIGTERMException`` and mark the run FAILED. A
    second signal while stopping, more than ``REPEAT_WINDOW_S`` after the first, stops at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._handlers: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def stop(signum: int, frame: Any) -> None:
            if self.signum is not None:
                # Ctrl-C reaches a joblib worker twice: from the terminal (the whole process
                # group) and passed on by the sweep. A repeat within seconds is the same request.
                if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
                    return
                raise Interrupted(signum, "second signal while stopping")
            self.signum, self._first_at = signum, time.monotonic()
            # Under DDP only on_train_batch_end may stop the loop, with every rank's say: set
            # here, between that decision and the loop's check (during a checkpoint save, say),
            # this rank alone would leave the loop and the others wait for it forever.
            if trainer.world_size == 1:
                trainer.should_stop = True
            log.warning(
                "%s received: stopping after the current step, then saving a checkpoint",
                signal.Signals(signum).name,
            )

        self._handlers = signal_handlers(stop)
        self._handlers.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Under DDP a signal may reach one rank only (e.g. the launching process): every rank
        # must stop after the same step, or one waits forever at the checkpoint's barrier.
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
            if stop and self.signum is None:
                self.signum = signal.SIGTERM
            trainer.should_stop = trainer.should_stop or stop

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()  # on_train_end does not run when the loop raises

    def _restore(self) -> None:
        if self._handlers is not None:
            handlers, self._handlers = self._handlers, None
            handlers.__exit__(None, None, None)


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
    signum: int, pids: list[int], still_running: Callable[[], bool], timeout_s: float = 60.0
) -> None:
    """Send ``signum`` to ``pids``, then wait while ``still_running()``, at most ``timeout_s``.

    A joblib (loky) sweep: a signal reaches the launcher's process only, and loky kills its
    workers outright (SIGKILL) when the launcher stops. Sent first, the signal lets each job stop
    on its own handler (checkpoint saved, MLflow run KILLED). Only processes that run a job get
    it: an idle loky worker has no handler and would die, and loky then kills the others.
    """
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline and still_running():
        time.sleep(0.5)
