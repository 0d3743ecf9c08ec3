"""The math_verify reward's worker process (run as a script: it imports math-verify only).

Reads one batch per line on stdin (JSON: items = [[gold, completion], ...], options = verify's
keywords), writes one line per item on stdout: ``1`` (equal) or ``0``. math-verify's signal
timeouts are off here; the parent (``grpo_lab.rewards.math_verify``) kills this process when an
item runs past its deadline.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any


def gold_text(answer: str) -> str:
    """The text math-verify parses for a gold answer: LaTeX unless it is already delimited."""
    return answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the thread that started it ends (its parent
    dying included). The watchdog thread in ``serve`` covers other systems, but it cannot run
    while sympy holds the GIL in one long big-integer operation, which is what a slow
    completion usually is. A worker started by a thread that has ended is gone at the next
    call, which then starts a fresh one."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(os.environ.get("GRPO_LAB_MATH_VERIFY_PARENT", os.getppid())):
        os._exit(1)  # the parent died before prctl took effect


def serve() -> None:
    """The worker: read one batch per line, answer one score per line, forever."""
    import logging

    ppid = os.getppid()
    _die_with_parent()

    def watch_parent() -> None:  # a killed parent leaves no orphan parsing for hours
        while os.getppid() == ppid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    logging.disable(logging.WARNING)  # math-verify warns once that its timeouts are off
    from math_verify import parse, verify

    golds: dict[str, Any] = {}
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        opts = request["options"]
        for gold, completion in request["items"]:
            if gold not in golds:
                if len(golds) > 100_000:
                    golds.clear()
                try:
                    golds[gold] = parse(gold_text(gold), parsing_timeout=None)
                except Exception:
                    golds[gold] = []
            try:
                pred = parse(completion, parsing_timeout=None)
                ok = bool(golds[gold]) and verify(
                    golds[gold],
                    pred,
                    float_rounding=opts["float_rounding"],
                    numeric_precision=opts["numeric_precision"],
                    strict=opts["strict"],
                    timeout_seconds=None,
                )
            except Exception:  # RecursionError, MemoryError, a parser bug: not equal
                ok = False
            out.write("1\n" if ok else "0\n")
            out.flush()


if __name__ == "__main__":
    serve()
