"""Math answers checked with Hugging Face's math-verify (``pip install 'grpo-lab[math]'``): 1.0
when ``verify(parse(gold), parse(completion))``, else 0.0. Every call is bounded in time.

math-verify parses LaTeX (``\\frac``, ``\\sqrt``, sets, intervals, percentages), ``\\boxed{}``
and plain numbers and expressions into sympy, and compares numerically and symbolically. Its
own timeouts use ``signal.alarm``, which only the main thread of the main interpreter may set:
in a worker thread (a joblib sweep, a server) ``parse`` raises, and with the timeouts off
nothing stops ``\\boxed{9^{9^{9^{9}}}}`` from running for hours. So the parsing runs in a
small worker process of its own (started with ``subprocess``, so it works in daemonic DDP and
sweep workers too), one per reward instance, with math-verify's signal timeouts off. Each
completion has ``timeout_s`` seconds from the previous answer; past that the worker is killed
and restarted, that completion scores 0, and the rest of the batch goes to the new worker.
``pop_counts`` hands the number of timeouts to ``RewardSet`` (logged as
``rewards/<fn>/timeouts``). A worker that crashes (a recursion or memory limit in the
parser) is restarted the same way, and the completion counts as a timeout too.

A batch is one round trip: every completion of a rollout goes in one message, answers stream
back one per line. Gold answers are parsed once per worker, cached by their text. A gold
answer without ``$`` or ``\\boxed`` is wrapped in ``$...$``, so that ``\\frac{1}{2}``,
``\\{1,2\\}`` and ``2\\sqrt{2}`` parse as LaTeX.

Model text is never run by grpo_lab. math-verify itself turns LaTeX into sympy with an ANTLR
parser; for plain expressions such as ``1/2`` it calls sympy's ``parse_expr`` (which uses
``eval``) only on strings its regex limits to digits, ``.``, spaces and ``+-*/^()×÷``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from grpo_lab.tasks.base import Example

INSTALL = "pip install 'grpo-lab[math]'"
_STARTUP_TIMEOUT_S = 120.0  # importing sympy and math-verify in a fresh process
WORKER_SCRIPT = Path(__file__).with_name("_math_verify_worker.py")
_RUN_WORKER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


NOT_STARTED = (
    f"reward=math_verify: its worker process did not start ({WORKER_SCRIPT}); "
    f"check that math-verify imports: {INSTALL}"
)


class _Worker:
    """One worker process and its pipes. It is started at once and waited for at its first
    ``send``, so a restart after a timeout overlaps with whatever the caller does next."""

    def __init__(self) -> None:
        # The worker runs its file as a script: it imports math-verify, not grpo_lab (whose
        # package import pulls in torch and Lightning, seconds per restart).
        self.proc = subprocess.Popen(
            # run_path, not the script itself: a script's folder goes first on sys.path, and
            # this folder's math_verify.py would shadow the math-verify package
            [sys.executable, "-c", _RUN_WORKER, str(WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "GRPO_LAB_MATH_VERIFY_PARENT": str(os.getpid())},
        )
        self._buffer = b""
        self._ready = False

    def _read_line(self, timeout_s: float) -> str:
        """The next line from the worker; TimeoutError past ``timeout_s``, EOFError if it died."""
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def send(self, items: list[tuple[str, str]], options: dict[str, Any]) -> None:
        """Hand the worker a batch. OSError: it has exited (between calls, or before it said
        ready: on Linux it dies with the thread that started it); RuntimeError: it answered
        something else than ready, or nothing in time."""
        if not self._ready:
            try:
                self._ready = self._read_line(_STARTUP_TIMEOUT_S) == "ready"
            except EOFError:
                self.stop()
                raise BrokenPipeError("the math_verify worker exited before it was ready") from None
            except TimeoutError:
                pass
            if not self._ready:
                self.stop()
                raise RuntimeError(NOT_STARTED)
        message = json.dumps({"items": items, "options": options}) + "\n"
        self.proc.stdin.write(message.encode())  # the worker reads a whole line before working
        self.proc.stdin.flush()

    def stop(self) -> None:
        _kill(self.proc)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):  # a pipe the dead worker left unread
            f.close()


class MathVerifyReward:
    """1.0 when math-verify finds the completion's answer equal to ``example.answer``.

    timeout_s: seconds each completion may take (parse and verify; a fresh gold answer's
      parse too); past it the completion scores 0 and counts in ``rewards/<fn>/timeouts``.
    max_chars: only the last ``max_chars`` characters of a completion are parsed (the answer
      comes at the end; a megabyte of text costs no more than a long solution).
    float_rounding, numeric_precision, strict: math-verify's ``verify`` options.

    One instance owns one worker process (started at the first call, restarted after a
    timeout, stopped with the instance). Pickling (DDP spawn, sweeps) leaves the worker out:
    each copy starts its own.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        max_chars: int = 20_000,
        float_rounding: int = 6,
        numeric_precision: int = 15,
        strict: bool = True,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(
                f"reward.functions.math_verify.timeout_s={timeout_s} is invalid: expected a number > 0"
            )
        if importlib.util.find_spec("math_verify") is None:  # before compute, not in the worker
            raise ImportError(f"reward=math_verify needs math-verify: {INSTALL}")
        self.timeout_s = float(timeout_s)
        self.max_chars = int(max_chars)
        self.options = {
            "float_rounding": int(float_rounding),
            "numeric_precision": int(numeric_precision),
            "strict": bool(strict),
        }
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._worker: _Worker | None = None
        self._lock = threading.Lock()  # one round trip at a time (threads of a sweep)
        self._timeouts = 0
        self._finalizer: weakref.finalize | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_worker", "_lock", "_timeouts", "_finalizer"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _start(self) -> _Worker:
        if self._finalizer is not None:
            self._finalizer.detach()  # the old worker is stopped already
        worker = _Worker()
        self._finalizer = weakref.finalize(self, _kill, worker.proc)  # no orphan at exit
        return worker

    def close(self) -> None:
        """Stop the worker now (it is also stopped when the instance is collected)."""
        with self._lock:
            if self._worker is not None:
                self._worker.stop()
                self._worker = None

    def pop_counts(self) -> dict[str, float]:
        """Completions that timed out since the last call: ``{"timeouts": n}``."""
        n, self._timeouts = self._timeouts, 0
        return {"timeouts": float(n)}

    def __call__(self, completions: list[str], examples: list[Example], **_: Any) -> list[float]:
        items = [
            (str(ex.answer), c[-self.max_chars :])
            for c, ex in zip(completions, examples, strict=True)
        ]
        scores: list[float] = []
        with self._lock:
            while len(scores) < len(items):
                if self._worker is None:
                    self._worker = self._start()
                try:
                    self._worker.send(items[len(scores) :], self.options)
                except RuntimeError:  # stopped: the next call starts a fresh one
                    self._worker = None
                    raise
                except OSError:  # it died between calls (killed, out of memory): start afresh
                    self._worker.stop()
                    self._worker = self._start()
                    try:
                        self._worker.send(items[len(scores) :], self.options)
                    except (OSError, RuntimeError) as err:  # a fresh one fails too
                        self._worker.stop()
                        self._worker = None
                        raise RuntimeError(NOT_STARTED) from err
                try:
                    while len(scores) < len(items):
                        scores.append(float(self._worker._read_line(self.timeout_s) == "1"))
                except (TimeoutError, EOFError):
                    self._worker.stop()
                    self._worker = self._start()  # starts now, waited for at its first send
                    scores.append(0.0)  # this completion; the rest go to the fresh worker
                    self._timeouts += 1
        return scores
