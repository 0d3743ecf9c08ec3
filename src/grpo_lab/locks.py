"""One writer per output directory and per sweep directory: a lock file naming its owner.

A run holds ``<output dir>/grpo_lab.lock`` while it trains; a ``-m`` sweep holds
``<sweep dir>/grpo_lab_sweep.lock`` while it runs. The lock is ``fcntl.flock`` on the file, so
the OS drops it when its process ends however it ends (SIGKILL, a lost node): a lock that is
held is a live owner. The file says who: pid, host, start time and command line, which the
refusal prints. The MLflow store cannot tell that: a job killed between its last metric and its
status update stays RUNNING there.

Where ``flock`` is not supported (some network filesystems), the owner's pid and host decide: a
lock left by a pid that no longer runs on this host is taken over; one from another host is
refused, naming the file to delete once that owner is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from grpo_lab.config import ConfigError

RUN_LOCK = "grpo_lab.lock"  # in a run's output dir
SWEEP_LOCK = "grpo_lab_sweep.lock"  # in a sweep dir


class Locked(ConfigError):
    """Another live process holds the lock: what it writes would be written twice."""


class OwnerLock:
    """An exclusive lock on ``path`` held until ``release()`` or the end of the process.

    what: the thing locked, for the refusal ("output dir"); key, value: the config key and value
    that chose the path (``paths.output_dir``, the dir), named in the refusal.
    """

    def __init__(self, path: Path, what: str, key: str, value: Any) -> None:
        self.path, self.what, self.key, self.value = Path(path), what, key, value
        self._file: TextIO | None = None

    def acquire(self) -> OwnerLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 -- held open while the lock is held
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise Locked(self._refusal(read_owner(self.path))) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                f.close()
                raise
            owner = read_owner(self.path)  # no flock here: the pid and host decide
            if owner and not _owner_gone(owner):
                f.close()
                raise Locked(self._refusal(owner)) from None
        f.seek(0)
        f.truncate()
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        f.write(json.dumps(owner) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is None:
            return
        f, self._file = self._file, None
        with contextlib.suppress(OSError):
            f.seek(0)
            f.truncate()  # an empty file: nobody holds it
        f.close()  # drops the flock

    def __enter__(self) -> OwnerLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _refusal(self, owner: dict | None) -> str:
        who = (
            f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: "
            f"{owner.get('command')}"
            if owner
            else "a process that has not written its name yet"
        )
        return (
            f"invalid config:\n  {self.key}={self.value}: another process is writing this "
            f"{self.what} ({who}). Two writers would interleave checkpoints and MLflow runs: "
            f"wait for it to end, stop it, or choose another {self.key}. (The lock is "
            f"{self.path}; the OS drops it when its owner exits, however it exits.)"
        )


def read_owner(path: Path) -> dict | None:
    """The owner a lock file names, or None (empty: released; unreadable: being written)."""
    try:
        text = Path(path).read_text().strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _owner_gone(owner: dict) -> bool:
    """Whether the process a lock file names has ended (known only on its own host)."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False
