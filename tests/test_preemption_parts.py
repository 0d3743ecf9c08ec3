"""The parts a preemptible sweep stands on, each alone: job folders named by their values, lock
files that name their owner and die with it, signals deferred around the final save, a stop
that waits for its jobs as long as the config says."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpo_lab import faults
from grpo_lab.config import ConfigError, validate
from grpo_lab.locks import Locked, OwnerLock, read_owner
from grpo_lab.sweep.job_dirs import MAX_NAME, _job_dir, earlier_job_dir, job_dir_name
from grpo_lab.sweep.run_files import SWEEP_FILE
from helpers import compose

# --------------------------------------------------------------------------- job folders


def test_a_job_folder_is_named_by_its_swept_values_whatever_their_order():
    swept = ["beta", "G", "seed"]
    a = job_dir_name(["G=4", "beta=0.04", "seed=1", "train.rollouts=8"], swept)
    b = job_dir_name(["train.rollouts=8", "seed=1", "beta=0.04", "G=4"], list(reversed(swept)))
    assert a == b == "G-4+beta-0.04+seed-1"  # sorted keys; unswept keys left out
    assert job_dir_name(["G=8", "beta=0.04", "seed=1"], swept) != a
    assert job_dir_name(["train.rollouts=8"], swept) is None  # nothing swept: the job number


def test_a_value_a_folder_cannot_hold_or_a_long_name_gets_a_digest():
    odd = job_dir_name(["task.path=/data/a b.jsonl"], ["task.path"])
    odd2 = job_dir_name(["task.path=/data/a_b.jsonl"], ["task.path"])
    assert "/" not in odd and " " not in odd and odd != odd2  # "_" alone would merge them
    assert odd.startswith("task.path-_data_a_b.jsonl-")
    listed = job_dir_name(["train.milestones=[1,2]"], ["train.milestones"])
    assert "," not in listed and "=" not in listed  # unquoted in ckpt=... on the command line
    long = job_dir_name([f"k{i}=value{i}" for i in range(20)], [f"k{i}" for i in range(20)])
    assert len(long) <= MAX_NAME
    other = job_dir_name(
        [f"k{i}=value{i}" for i in range(19)] + ["k19=x"], [f"k{i}" for i in range(20)]
    )
    assert long != other  # same prefix, another last value: another folder


def test_the_resolver_names_grid_jobs_by_value_and_other_sweepers_by_number(tmp_path):
    overrides = ["G=4", "beta=0"]
    assert _job_dir(tmp_path, 3, overrides) == "3"  # no sweep file: no MLflow callback
    sweep = {
        "swept_keys": ["G"],
        "sweeper": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    }
    (tmp_path / SWEEP_FILE).write_text(json.dumps(sweep))
    assert _job_dir(tmp_path, 3, overrides) == "G-4"
    sweep["sweeper"] = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    (tmp_path / SWEEP_FILE).write_text(json.dumps(sweep))
    assert _job_dir(tmp_path, 3, overrides) == "3"  # Optuna may pick the same values twice


def _job_folder(sweep_dir: Path, name: str, overrides: list[str], **config) -> None:
    hydra = sweep_dir / name / ".hydra"
    hydra.mkdir(parents=True)
    (hydra / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (hydra / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in config.items()))


def test_a_job_keeps_its_folder_when_a_later_start_sweeps_another_key(tmp_path):
    """``G=4,8 beta=0`` then ``G=4,8 beta=0,0.04 seeds=2``: G=4 beta=0 seed=0 is the job of
    folder G-4 (beta given, seed left at its default 0), not a new one that runs it again."""
    common = ["task.max_operand=9", "resume=auto"]
    _job_folder(tmp_path, "G-4", ["G=4", "beta=0", *common], seed=0, beta=0.0)
    _job_folder(tmp_path, "G-8", ["G=8", "beta=0", *common], seed=0, beta=0.0)
    sweep = {
        "swept_keys": ["G", "beta", "seed"],
        "sweeper": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    }
    (tmp_path / SWEEP_FILE).write_text(json.dumps(sweep))
    job = ["G=4", "beta=0", "task.max_operand=9", "seed=0"]
    assert _job_dir(tmp_path, 0, job) == "G-4"
    assert _job_dir(tmp_path, 1, ["G=4", "beta=0.0", "task.max_operand=9", "seed=0"]) == "G-4"
    assert _job_dir(tmp_path, 2, ["G=4", "beta=0", "task.max_operand=9", "seed=1"]) == (
        "G-4+beta-0+seed-1"
    )
    assert _job_dir(tmp_path, 3, ["G=4", "beta=0.04", "task.max_operand=9", "seed=0"]) == (
        "G-4+beta-0.04+seed-0"
    )
    # another value of a key the sweep holds fixed: another job
    assert _job_dir(tmp_path, 4, ["G=4", "beta=0", "task.max_operand=19", "seed=0"]) == (
        "G-4+beta-0+seed-0"
    )
    # a key the earlier job gave that this one leaves at its default: not known to be the same
    assert _job_dir(tmp_path, 5, ["G=4", "seed=0"]) == "G-4+seed-0"
    # its own folder, once there, is its folder
    (tmp_path / "G-4+beta-0+seed-0").mkdir()
    assert _job_dir(tmp_path, 0, job) == "G-4+beta-0+seed-0"


def test_a_longer_run_keeps_its_folder_unless_two_folders_differ_only_in_length(tmp_path):
    swept = ["G"]
    _job_folder(tmp_path, "seed-0", ["seed=0", "train.rollouts=2"])
    assert earlier_job_dir(tmp_path, ["G=4", "seed=0", "train.rollouts=4"], swept) is None
    assert earlier_job_dir(tmp_path, ["seed=0", "train.rollouts=4"], swept) == "seed-0"
    _job_folder(tmp_path, "seed-0+train.rollouts-8", ["seed=0", "train.rollouts=8"])
    assert earlier_job_dir(tmp_path, ["seed=0", "train.rollouts=8"], swept) == (
        "seed-0+train.rollouts-8"
    )
    assert earlier_job_dir(tmp_path, ["seed=0", "train.rollouts=4"], swept) is None  # which?
    # swept, the length is part of what the job is
    assert earlier_job_dir(tmp_path, ["seed=0", "train.rollouts=4"], ["train.rollouts"]) is None


# --------------------------------------------------------------------------- lock files

HOLDER = """
import sys, time
from pathlib import Path
from grpo_lab.locks import OwnerLock
lock = OwnerLock(Path(sys.argv[1]), "output dir", "paths.output_dir", sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def start_holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_refuses_naming_its_owner_and_dies_with_it(tmp_path):
    path = tmp_path / "out" / "grpo_lab.lock"
    holder = start_holder(path)
    try:
        owner = read_owner(path)
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
        with pytest.raises(Locked) as refused:
            OwnerLock(path, "output dir", "paths.output_dir", tmp_path / "out").acquire()
        message = str(refused.value)
        assert f"paths.output_dir={tmp_path / 'out'}" in message
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and "-c" in message
        assert isinstance(refused.value, ConfigError)  # the CLI prints it as a config error
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the file still names it
        holder.wait()
    assert read_owner(path)["pid"] == holder.pid
    with OwnerLock(path, "output dir", "paths.output_dir", tmp_path / "out"):
        assert read_owner(path)["pid"] == os.getpid()  # the OS dropped the dead owner's lock
    assert read_owner(path) is None  # released: the file names nobody


# --------------------------------------------------------------------------- signals


def test_a_signal_inside_deferred_signals_waits_for_the_block_and_is_reported():
    finished = []
    with faults.signal_handlers(faults.raise_interrupted):
        with faults.deferred_signals() as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler would have run by now
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            finished.append(True)
        assert caught == [signal.SIGTERM, signal.SIGUSR2]
        assert signal.getsignal(signal.SIGTERM) is faults.raise_interrupted  # restored
    assert finished == [True]


def _fake_trainer(batches_done: int, validating: bool = False):
    from types import SimpleNamespace

    epoch_loop = SimpleNamespace(total_batch_idx=batches_done - 1)
    return SimpleNamespace(
        should_stop=False,
        validating=validating,
        val_check_batch=4,  # train.eval_every=4
        limit_val_batches=1.0,
        world_size=1,
        fit_loop=SimpleNamespace(epoch_loop=epoch_loop),
        _signal_connector=SimpleNamespace(_original_handlers={}),
    )


@pytest.mark.parametrize(
    ("batches_done", "validating", "eval_runs"),
    [(3, False, False), (4, False, True), (3, True, True)],
    ids=["unscheduled", "scheduled", "under-way"],
)
def test_a_stop_skips_the_eval_lightning_would_add_and_keeps_the_scheduled_one(
    batches_done, validating, eval_runs
):
    """A stop sets should_stop, and Lightning validates after a step when should_stop is set.
    At step 3 of eval_every=4 that eval is skipped, whether the signal comes during the step or
    after its on_train_batch_end; at step 4 the scheduled eval runs (the resumed run starts
    after it and would not make up for it); an eval under way ends as it is."""
    for after_batch_end in (False, True):
        trainer = _fake_trainer(batches_done, validating)
        stop = faults.StopOnSignal()
        stop.on_train_start(trainer, None)
        try:
            if after_batch_end:
                stop.on_train_batch_end(trainer)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert stop.signum == signal.SIGTERM and trainer.should_stop
            if not after_batch_end:
                stop.on_train_batch_end(trainer)
            assert (trainer.limit_val_batches != 0) == eval_runs
        finally:
            stop.release()


def test_a_second_ctrl_c_seconds_later_stops_a_long_eval_but_not_the_save():
    trainer = _fake_trainer(4)
    stop = faults.StopOnSignal()
    stop.on_train_start(trainer, None)

    def send(signum):
        os.kill(os.getpid(), signum)
        time.sleep(0.05)

    try:
        send(signal.SIGINT)
        stop.on_train_batch_end(trainer)  # the step ended; the eval it has runs
        trainer.validating = True
        send(signal.SIGINT)  # within seconds: the same request (the terminal and the sweep)
        stop._first_at -= 10
        send(signal.SIGTERM)  # a scheduler's repeat: never cuts anything short
        trainer.validating = False
        send(signal.SIGINT)  # the step and its eval are done: the saves run on
        trainer.validating = True
        with pytest.raises(faults.Interrupted) as stopped:
            send(signal.SIGINT)
        assert stopped.value.detail == "second signal while stopping"
    finally:
        stop.release()


def test_the_previous_handler_of_a_preemption_signal_runs_after_the_stop():
    calls = []
    faults.after_preemption(signal.SIGUSR2, lambda signum, frame: calls.append(signum), True)
    assert calls == [signal.SIGUSR2]
    faults.after_preemption(signal.SIGTERM, lambda signum, frame: calls.append(signum), True)
    assert calls == [signal.SIGUSR2]  # a plain stop requeues nothing


def test_the_handler_chained_after_a_preemption_is_the_one_from_before_lightnings():
    """Under SLURM Lightning's signal connector sets its own SIGUSR1 handler for the fit (it saves
    an hpc_ckpt, then requeues); the handler run after the stop is the one that was there before
    (submitit's, or none: grpo_lab requeues itself)."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

    def before(signum, frame):
        pass

    trainer = SimpleNamespace(_signal_connector=SimpleNamespace(_original_handlers={}))
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        for original in (before, signal.SIG_DFL):
            trainer._signal_connector._original_handlers = {signal.SIGUSR1: original}
            signal.signal(signal.SIGUSR1, _HandlersCompose([lambda signum, frame: None]))
            stop = faults.StopOnSignal()
            stop.on_train_start(trainer, None)
            stop.teardown(trainer, None, "fit")
            assert stop._previous[signal.SIGUSR1] is original
        signal.signal(signal.SIGUSR1, before)  # no Lightning handler: the one there is kept
        stop = faults.StopOnSignal()
        stop.on_train_start(trainer, None)
        stop.teardown(trainer, None, "fit")
        assert stop._previous[signal.SIGUSR1] is before
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_stop_waits_while_jobs_run_and_says_when_they_did_not_stop(tmp_path):
    ignoring = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    stopping = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for p in (ignoring, stopping):
            assert p.stdout.readline().strip() == "up"
        start = time.monotonic()
        stopped = faults.stop_processes(
            signal.SIGTERM, [stopping.pid], lambda: stopping.poll() is None, timeout_s=30
        )
        assert stopped and time.monotonic() - start < 10
        start = time.monotonic()
        stopped = faults.stop_processes(
            signal.SIGTERM, [ignoring.pid], lambda: ignoring.poll() is None, timeout_s=1.5
        )
        assert not stopped and 1.5 <= time.monotonic() - start < 5  # the bound, not 60 s
    finally:
        ignoring.kill()
        stopping.kill()


def start_sleepers(n: int) -> list[subprocess.Popen]:
    """n processes that sleep a minute (stand-ins for job processes); each prints 'up' first."""
    return [
        subprocess.Popen(
            [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]


def test_a_stop_signals_a_job_whose_run_starts_while_the_sweep_waits():
    """A job past the sweep's stop file when the signal came, whose MLflow run appears only
    later, gets the signal too: it does not run on unsignalled until the timeout."""
    sleepers = start_sleepers(2)
    try:
        for p in sleepers:
            assert p.stdout.readline().strip() == "up"
        first, late = sleepers
        asked = []

        def job_pids() -> list[int]:  # the late job's run shows up at the third look
            asked.append(1)
            return [p.pid for p in sleepers if p.poll() is None][: 1 if len(asked) < 3 else 2]

        start = time.monotonic()
        stopped = faults.stop_processes(
            signal.SIGTERM, job_pids, lambda: any(p.poll() is None for p in sleepers), 30
        )
        assert stopped and time.monotonic() - start < 10
        assert first.returncode == late.returncode == -signal.SIGTERM
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


def test_the_stop_timeout_is_a_positive_number_of_seconds():
    assert compose().sweep.stop_timeout_s == 600
    with pytest.raises(ConfigError, match=r"sweep.stop_timeout_s=0 .*> 0"):
        validate(compose("sweep.stop_timeout_s=0", check=False))


# --------------------------------------------------------------------------- finished runs


def test_a_run_extended_to_more_rollouts_counts_as_finished_at_its_new_length(
    tmp_path, tracking_uri
):
    """A FINISHED run resumed with train.rollouts=4 keeps train.rollouts=2 in its params (MLflow
    cannot change them); the same command again finds it FINISHED, not one to extend again."""
    from mlflow import MlflowClient

    from grpo_lab.resume import finished_run
    from grpo_lab.sweep.run_files import write_run_file

    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("grpo_lab")
    run = client.create_run(exp)
    client.log_param(run.info.run_id, "train.rollouts", "2")
    client.log_param(run.info.run_id, "G", "4")
    client.set_tag(run.info.run_id, "grpo_lab.resume_changes", json.dumps({"train.rollouts": "4"}))
    client.set_terminated(run.info.run_id, "FINISHED")
    write_run_file(tmp_path, run.info.run_id, exp, tracking_uri)

    def found(**params):
        return finished_run(tmp_path, tracking_uri, {"train.rollouts": "4", "G": "4", **params})

    assert found().info.run_id == run.info.run_id
    assert found(**{"train.rollouts": "6"}) is None  # longer again: extended
    assert found(G="8") is None  # refused with its reason on resume
    assert found(**{"train.rollouts": "2"}) is None  # the first start's length is not the run's


def test_a_new_run_in_a_dir_that_holds_an_earlier_runs_checkpoints_is_refused(tmp_path):
    """Lightning would save the new run's checkpoints as -v1 copies beside the earlier run's and
    leave last.ckpt the earlier run's, while mlflow_run.json named the new run."""
    from grpo_lab.resume import refuse_other_run_in

    out = tmp_path / "run"
    refuse_other_run_in(out, None, "paths.output_dir", out)  # nothing there: a fresh start
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"")
    (out / "mlflow_run.json").write_text(json.dumps({"run_id": "abc", "experiment_id": "1"}))
    with pytest.raises(ConfigError, match=r"paths.output_dir=.*earlier run \(MLflow run abc\)"):
        refuse_other_run_in(out, None, "paths.output_dir", out)
    elsewhere = tmp_path / "other" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="resume=auto continues that run"):
        refuse_other_run_in(out, elsewhere, "paths.output_dir", out)
    # a checkpoint of the run in out, the last or an earlier one: that run goes on
    refuse_other_run_in(out, out / "checkpoints" / "last.ckpt", "paths.output_dir", out)
    refuse_other_run_in(out, out / "checkpoints" / "rollout-step=2.ckpt", "paths.output_dir", out)


def test_a_stopped_sweep_signals_its_own_jobs_not_the_pids_of_runs_an_earlier_start_left(
    tmp_path,
):
    """A run an earlier start left RUNNING (its process SIGKILLed) names a pid another process
    may hold now: the stop signals only the processes of this start's jobs."""
    from types import SimpleNamespace

    from grpo_lab.sweep import callback
    from grpo_lab.sweep.run_files import HOST_TAG, PID_TAG, START_TAG

    sleepers = start_sleepers(2)
    mine, stale = sleepers

    def run(proc, start):
        tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(proc.pid), START_TAG: str(start)}
        return SimpleNamespace(
            info=SimpleNamespace(run_id=f"run{proc.pid}"), data=SimpleNamespace(tags=tags)
        )

    class Client:
        def search_runs(self, *args, **kwargs):
            return [run(p, start) for p, start in ((mine, 2), (stale, 1)) if p.poll() is None]

        def set_tag(self, *args):
            pass

        def set_terminated(self, *args):
            pass

    try:
        for p in sleepers:
            assert p.stdout.readline().strip() == "up"
        with faults.signal_handlers(signal.SIG_DFL):  # restored after the test
            callback.MLflowSweepCallback()._watch_signals(Client(), "1", "parent", 20, tmp_path, 2)
            on_signal = signal.getsignal(signal.SIGTERM)
            try:
                with pytest.raises(faults.Interrupted):
                    on_signal(signal.SIGTERM, None)
            finally:
                callback._WATCH.pop("handlers").__exit__(None, None, None)
                faults.remove_cleanup(callback._WATCH.pop("cleanup"))
                callback._WATCH.clear()
        assert mine.wait(timeout=10) == -signal.SIGTERM
        assert stale.poll() is None  # not this start's: left alone
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
