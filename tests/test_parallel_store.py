"""One MLflow SQLite store shared by parallel jobs: no run and no metric lost.

SQLite lets one writer in at a time; the others wait up to its busy timeout (5 s), then fail with
"database is locked". These tests hold the lock longer than that, or run four jobs at once.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import compose, fast_without

# MLflow sets SQLite's busy timeout to 20 s (PRAGMA busy_timeout in mlflow/store/db/utils.py);
# a write that waits longer for the lock fails with "database is locked" unless retried.
LOCK_HELD_S = 22.0


def hold_write_lock(db: Path, seconds: float) -> None:
    """Take SQLite's write lock on ``db`` for ``seconds``, as a busy parallel job can."""
    taken = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(db, timeout=60, check_same_thread=False)
        conn.execute("BEGIN EXCLUSIVE")
        taken.set()
        threading.Event().wait(seconds)
        conn.rollback()
        conn.close()

    threading.Thread(target=hold, daemon=True).start()
    assert taken.wait(60)


@pytest.mark.slow  # waits out a 22 s lock; no compute
def test_run_creation_and_per_step_metrics_wait_out_a_locked_store(tmp_path, tracking_uri):
    """While another writer holds the store's lock past MLflow's busy timeout, the logger train()
    builds creates its run (one job starting) and logs a step's metrics (another job running)."""
    from grpo_lab.train import make_logger

    def cfg_for(name: str):
        return compose(f"logger.tracking_uri={tracking_uri}", f"paths.output_dir={tmp_path / name}")

    running = make_logger(cfg_for("running"))
    _ = running.run_id  # the run exists before the lock
    hold_write_lock(Path(tracking_uri.removeprefix("sqlite:///")), LOCK_HELD_S)
    started: dict = {}

    def start_job() -> None:
        try:
            started["run_id"] = make_logger(cfg_for("starting")).run_id
        except Exception as err:  # reported by the assertion below
            started["error"] = err

    starting = threading.Thread(target=start_job)
    starting.start()
    running.log_metrics({"reward": 0.25, "kl": 0.5}, step=1)
    starting.join()
    assert "error" not in started, started.get("error")
    running.finalize("FINISHED")

    client = MlflowClient(tracking_uri=tracking_uri)
    assert [(m.step, m.value) for m in client.get_metric_history(running.run_id, "reward")] == [
        (1, 0.25)
    ]
    assert client.get_run(running.run_id).info.status == "FINISHED"
    assert client.get_run(started["run_id"]).info.status == "RUNNING"


@pytest.mark.slow
def test_four_parallel_jobs_share_one_store_without_losing_a_run_or_a_metric(
    run_cli, tmp_path, tracking_uri
):
    """Four joblib workers write every step to one fresh SQLite store at the same time."""
    rollouts = 4
    run_cli(
        "train",
        "-m",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=4",
        "num_threads=1",
        "seed=0,1,2,3",
        f"train.rollouts={rollouts}",
        "train.eval_every=100",  # evals at the start and the end only: the writes are the point
        *fast_without("train.rollouts", "train.eval_every"),
        timeout=600,
    )
    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = client.search_experiments()
    assert [e.name for e in experiments if e.name != "Default"] == ["grpo_lab"]
    runs = client.search_runs(
        [e.experiment_id for e in experiments if e.name == "grpo_lab"], max_results=100
    )
    jobs = [r for r in runs if r.data.tags.get("grpo_lab.role") != "sweep"]
    assert sorted(r.data.params["seed"] for r in jobs) == ["0", "1", "2", "3"]
    assert {r.info.status for r in jobs} == {"FINISHED"}
    for r in jobs:
        # one point per rollout, stepped 1..rollouts (README: metrics are stepped by rollout)
        for key in ("reward", "loss", "kl", "rollout"):
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, key))
            assert len(steps) == rollouts, (r.info.run_name, key, steps)
        assert "eval/accuracy_final" in r.data.metrics
    parent = next(r for r in runs if r.data.tags.get("grpo_lab.role") == "sweep")
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/failed"] == 0


def test_the_retrying_client_survives_pickling(tracking_uri):
    # ddp_spawn pickles the trainer, its logger and so this client to each rank: unpickling
    # used to recurse in __getattr__ before __init__ had set the wrapped client.
    import pickle

    from grpo_lab.store import client

    copy = pickle.loads(pickle.dumps(client(tracking_uri)))
    assert [e.name for e in copy.search_experiments()] == ["Default"]
