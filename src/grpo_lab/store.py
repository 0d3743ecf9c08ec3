"""The MLflow client layer: every call retries on a locked SQLite database, and a store that
cannot be reached is an error before any compute.

Parallel sweep jobs write to one SQLite file. SQLite lets one writer in at a time and makes the
others wait up to its busy timeout; past that the write fails with "database is locked", and a
job that logs a metric per step would die mid-run. ``retry_locked`` retries such a call with a
growing wait. Every module talks to MLflow through it: ``client(uri)`` (a ``RetryingClient``)
for a store, ``RunLogger`` for a training run's logger.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

from lightning.pytorch.loggers import MLFlowLogger

from grpo_lab.config import ConfigError

T = TypeVar("T")

# The MLflow 3.x UI opens experiments in its GenAI view unless tagged as model development.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")


def retry_locked(fn: Callable[[], T], attempts: int = 20, wait_s: float = 0.5) -> T:
    """Run fn, retrying while SQLite says the database is locked (parallel sweep jobs)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # MLflow wraps sqlite errors in several exception types
            if "locked" not in str(err).lower() or i == attempts - 1:
                raise
            time.sleep(wait_s * (1 + i))
    raise AssertionError("unreachable")


class RetryingClient:
    """An ``MlflowClient`` whose every method call retries while the SQLite store is locked.

    A failed SQLite write is rolled back whole, so repeating it logs each value once.
    """

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_client":
            # Unpickling (ddp_spawn ships the logger to its ranks) looks up attributes before
            # __init__ ran: without this, reading self._client here would recurse forever.
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return retry_locked(lambda: attr(*args, **kwargs))

        return call


def client(tracking_uri: str) -> RetryingClient:
    """An ``MlflowClient`` for the store at ``tracking_uri`` whose every call retries while locked."""
    from mlflow import MlflowClient

    return RetryingClient(MlflowClient(tracking_uri=tracking_uri))


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created (and tagged for the runs view) if missing."""
    mlflow = client(tracking_uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        try:
            exp_id = mlflow.create_experiment(name, tags=dict([EXPERIMENT_KIND_TAG]))
        except Exception:
            exp = mlflow.get_experiment_by_name(name)  # another job created it meanwhile
            if exp is None:
                raise
            exp_id = exp.experiment_id
    mlflow.set_experiment_tag(exp_id, *EXPERIMENT_KIND_TAG)
    return exp_id


class RunLogger(MLFlowLogger):
    """Lightning's MLFlowLogger for a run that ``train`` ends, in a store other jobs share.

    - Every MLflow call retries on a locked store. MLFlowLogger makes all of them (creating the
      run, ``log_batch`` for params and per-step metrics, ``set_terminated``) through its one
      client, so wrapping that client covers them all.
    - Lightning calls ``finalize("success")`` at the end of every ``fit`` and ``validate``, and
      ``finalize("failed")`` on any exception. Taken at its word, the run would read FINISHED from
      the first eval on while it trains, and FINISHED before a stopped run is marked KILLED. Those
      calls are ignored: ``train`` ends the run with FINISHED, FAILED or KILLED.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._mlflow_client = RetryingClient(self._mlflow_client)

    def finalize(self, status: str = "success") -> None:
        if status in ("success", "failed", "finished"):  # Lightning's own calls
            return
        super().finalize(status)


def _unreachable(tracking_uri: str, why: str) -> ConfigError:
    return ConfigError(
        f"invalid config:\n  logger.tracking_uri={tracking_uri} cannot be reached: {why}; "
        "expected an MLflow tracking server that answers (http://HOST:PORT), or "
        "sqlite:///PATH with PATH in a directory this process can create and write"
    )


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Raise a ConfigError naming ``logger.tracking_uri`` when the store cannot be reached.

    A server is tried with one TCP connection: MLflow's own client retries an unreachable server
    with backoff for minutes before it gives up. An SQLite file needs a directory it can write.
    """
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "", port), timeout=timeout_s).close()
        except OSError as err:
            why = f"no connection to {parsed.hostname}:{port} ({err})"
            raise _unreachable(tracking_uri, why) from err
    elif parsed.scheme == "sqlite":
        path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
        if path and path != ":memory:":
            directory = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(directory, exist_ok=True)  # as MLflow would
            except OSError as err:
                why = f"cannot create the directory {directory} ({err.strerror or err})"
                raise _unreachable(tracking_uri, why) from err
            if not os.access(directory, os.W_OK):
                raise _unreachable(tracking_uri, f"the directory {directory} is not writable")


def open_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name`` in the store, created once; a clear error if unreachable."""
    check_reachable(tracking_uri)
    try:
        return ensure_experiment(tracking_uri, name)
    except Exception as err:
        raise _unreachable(tracking_uri, f"{type(err).__name__}: {err}") from err
