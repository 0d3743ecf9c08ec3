"""Preemption through the real CLI: kill a run or a sweep at any moment, run the same command
again, get what an undisturbed run gives. Real subprocesses, real signals, a real SQLite store.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import ViewType

from helpers import FAST, fast_without, points_of, runs_of, wait_for

LONG = [o for o in FAST if not o.startswith("train.rollouts=")] + ["train.rollouts=200"]


def run_of(out: Path) -> str:
    return json.loads((out / "mlflow_run.json").read_text())["run_id"]


@pytest.mark.slow
def test_a_second_run_on_one_output_dir_is_refused_while_the_first_runs(
    run_cli, start_cli, tmp_path, tracking_uri
):
    out = tmp_path / "run"
    first = start_cli("train", *LONG, f"paths.output_dir={out}")
    wait_for(first, lambda: (out / "checkpoints" / "rollout-step=2.ckpt").is_file() or None)
    second = run_cli("train", *LONG, f"paths.output_dir={out}", check=False)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"paths.output_dir={out}: another process is writing this output dir" in second.stderr
    assert f"pid {first.pid} on " in second.stderr
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr[-3000:]
    _, _, runs = runs_of(tracking_uri)
    assert [r.info.status for r in runs] == ["KILLED"]  # the refused run made none


@pytest.mark.slow
def test_a_second_sweep_on_one_sweep_dir_is_refused_while_the_first_runs(
    run_cli, start_cli, tmp_path, tracking_uri
):
    args = ["train", "-m", "seed=0,1", *LONG, f"hydra.sweep.dir={tmp_path / 'abl'}"]
    first = start_cli(*args, "resume=auto")
    wait_for(first, lambda: next((tmp_path / "abl").rglob("rollout-step=2.ckpt"), None))
    second = run_cli(*args, "resume=auto", check=False)
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"hydra.sweep.dir={tmp_path / 'abl'}: another process is writing this sweep dir" in (
        second.stderr
    )
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert first.returncode == 143
    client, _, runs = runs_of(tracking_uri)
    assert len([r for r in runs if r.data.tags.get("grpo_lab.role") == "sweep"]) == 1


@pytest.mark.slow
def test_repeated_signals_do_not_cut_the_final_save_short(start_cli, tmp_path, tracking_uri):
    """SIGTERM, then SIGTERM and SIGINT every 10 ms until the process is gone: the step ends,
    last.ckpt is written whole, the run ends KILLED."""
    out = tmp_path / "run"
    proc = start_cli("train", *LONG, f"paths.output_dir={out}")
    wait_for(proc, lambda: (out / "checkpoints" / "rollout-step=3.ckpt").is_file() or None)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    sent = 1
    while proc.poll() is None:
        proc.send_signal(signal.SIGTERM if sent % 2 else signal.SIGINT)
        sent += 1
        time.sleep(0.01)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 143, f"{stdout[-2000:]}\n{stderr[-4000:]}"
    assert sent > 20  # the repeats kept coming through the step and the save
    client, _, (run,) = runs_of(tracking_uri)
    assert run.info.status == "KILLED"
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    logged = client.get_metric_history(run.info.run_id, "rollout")
    assert ckpt["global_step"] == len(logged) == max(m.value for m in logged) >= 3


# A stand-in for submitit: its job process installs a SIGUSR2 handler (requeue, then exit)
# before the task runs. grpo_lab must stop cleanly first, then call it.
SUBMITIT_LIKE = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from mlflow import MlflowClient

    out = Path(sys.argv[1])  # the CLI rewrites sys.argv

    def requeue(signum, frame):
        run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
        status = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).info.status
        seen = {"status": status, "last_ckpt": (out / "checkpoints" / "last.ckpt").is_file()}
        (out / "requeued.json").write_text(json.dumps(seen))
        sys.exit(3)

    signal.signal(signal.SIGUSR2, requeue)
    from grpo_lab.cli import main
    main(sys.argv[2:])
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2], ids=["SIGUSR1", "SIGUSR2"])
def test_a_preemption_notice_saves_ends_killed_requeues_and_resumes(
    run_cli, start_cli, tmp_path, tracking_uri, signum
):
    """SIGUSR1 (Lightning's SLURM requeue signal) and SIGUSR2 (submitit's) stop after the step
    like SIGTERM; a handler that was there before (submitit's requeue) runs after the run is
    KILLED with its checkpoint; the same command then continues the run to FINISHED."""
    out = tmp_path / "run"
    args = ["train", *fast_without("train.rollouts"), "train.rollouts=60", "resume=auto"]
    args.append(f"paths.output_dir={out}")
    proc = start_cli(command=[sys.executable, "-c", SUBMITIT_LIKE, str(out), *args])
    wait_for(proc, lambda: (out / "checkpoints" / "rollout-step=3.ckpt").is_file() or None)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    client = MlflowClient(tracking_uri)
    run_id = run_of(out)
    assert client.get_run(run_id).info.status == "KILLED"
    assert f"stopped by {signal.Signals(signum).name}" in stderr
    if signum == signal.SIGUSR2:  # the earlier handler ran, after the stop was recorded
        assert proc.returncode == 3, stderr[-3000:]
        assert json.loads((out / "requeued.json").read_text()) == {
            "status": "KILLED",
            "last_ckpt": True,
        }
    else:  # no handler before it (and no SLURM_JOB_ID here): nothing to requeue
        assert proc.returncode == 128 + signum, stderr[-3000:]
        assert not (out / "requeued.json").exists()
    stopped_at = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 3 <= stopped_at < 60
    run_cli(*args)  # the requeued job: the same command
    assert run_of(out) == run_id and client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "rollout")]
    assert steps == list(range(1, 61))


@pytest.mark.slow
def test_resume_auto_replaces_a_run_killed_before_its_first_checkpoint(
    run_cli, start_cli, tmp_path, tracking_uri
):
    out = tmp_path / "run"
    args = ["train", *fast_without("train.checkpoint_every"), "resume=auto"]
    args += ["train.checkpoint_every=1000", f"paths.output_dir={out}"]
    proc = start_cli(*[a.replace("train.rollouts=2", "train.rollouts=200") for a in args])
    client = MlflowClient(tracking_uri)

    def two_rollouts_logged():
        if not (out / "mlflow_run.json").is_file():
            return None
        return len(client.get_metric_history(run_of(out), "rollout")) >= 2 or None

    wait_for(proc, two_rollouts_logged)
    proc.kill()  # SIGKILL: the run stays RUNNING, no checkpoint was written
    proc.wait()
    first = run_of(out)
    assert client.get_run(first).info.status == "RUNNING"
    assert not (out / "checkpoints" / "last.ckpt").exists()

    run_cli(*args)  # 2 rollouts this time: train.rollouts may change on resume
    second = run_of(out)
    assert second != first and client.get_run(second).info.status == "FINISHED"
    deleted = client.get_run(first)
    assert deleted.info.lifecycle_stage == "deleted"  # restorable; its points are kept
    assert "no checkpoint to resume" in deleted.data.tags["grpo_lab.replaced"]
    active = client.search_runs([deleted.info.experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
    assert [r.info.run_id for r in active] == [second]  # one run for the job


# --------------------------------------------------------------------------- the proof

SWEEP_VALUES = ["G=2,4", "beta=0,0.04", "seed=0,1"]  # 8 jobs
SWEEP_FAST = [
    *fast_without("G", "beta", "seed", "train.rollouts", "train.eval_every"),
    "train.rollouts=8",
    "train.eval_every=4",
    "hydra/launcher=parallel",
    "hydra.launcher.n_jobs=2",
    "num_threads=1",
    "resume=auto",
]


def sweep_runs(client: MlflowClient, sweep_dir: Path):
    """(parents, job runs) of the sweep in ``sweep_dir``, deleted runs left out."""
    exp = client.get_experiment_by_name("grpo_lab")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    mine = [r for r in runs if r.data.tags.get("grpo_lab.sweep_dir") == str(sweep_dir.resolve())]
    parents = [r for r in mine if r.data.tags.get("grpo_lab.role") == "sweep"]
    return parents, [r for r in mine if r.data.tags.get("grpo_lab.role") != "sweep"]


def running_job(client: MlflowClient, sweep_dir: Path):
    """A job run that is RUNNING in a live process, has written a checkpoint and has rollouts
    left to run (a signal sent now lands mid-job), or None."""
    for r in sweep_runs(client, sweep_dir)[1]:
        pid = int(r.data.tags.get("grpo_lab.pid", "0"))
        ckpts = Path(r.data.tags["grpo_lab.job_dir"]) / "checkpoints"
        midway = (ckpts / "rollout-step=1.ckpt").is_file() and not (
            ckpts / "rollout-step=5.ckpt"
        ).is_file()
        if r.info.status == "RUNNING" and pid and midway:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return r
    return None


@pytest.mark.slow
def test_a_sweep_killed_three_times_ends_as_the_undisturbed_sweep(
    run_cli, start_cli, tmp_path, tracking_uri
):
    """8 jobs on 2 joblib workers, killed at seeded random moments: SIGTERM to the sweep,
    SIGKILL to one worker, SIGTERM to one job; the same command run again after each kill until
    the sweep completes. One parent, 8 FINISHED job runs, every metric at every step equal to
    the same sweep run without interruption."""
    rng = random.Random(20261206)
    clean_dir, dir_ = tmp_path / "clean", tmp_path / "abl"
    run_cli("train", "-m", *SWEEP_VALUES, *SWEEP_FAST, f"hydra.sweep.dir={clean_dir}")
    args = ["train", "-m", *SWEEP_VALUES, *SWEEP_FAST, f"hydra.sweep.dir={dir_}"]
    client = MlflowClient(tracking_uri)
    resumed_from_checkpoint = 0

    for attempt, kill in enumerate(("sweep SIGTERM", "worker SIGKILL", "job SIGTERM")):
        log = tmp_path / f"start-{attempt}.log"
        proc = start_cli(*args, output=log)  # a sweep prints more than a pipe holds
        # a seeded random moment: some jobs done, others mid-step, mid-save or not started
        time.sleep(rng.uniform(0.0, 4.0))
        job = wait_for(proc, lambda: running_job(client, dir_), timeout=240)
        if kill == "sweep SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            pid = int(job.data.tags["grpo_lab.pid"])
            os.kill(pid, signal.SIGKILL if kill == "worker SIGKILL" else signal.SIGTERM)
        proc.wait(timeout=300)
        stdout = stderr = log.read_text()
        (parent,) = sweep_runs(client, dir_)[0]
        if kill == "sweep SIGTERM":
            assert proc.returncode == 143, f"{kill}\n{stdout[-2000:]}\n{stderr[-4000:]}"
            assert parent.info.status == "KILLED"
            assert "RUNNING" not in {r.info.status for r in sweep_runs(client, dir_)[1]}
        elif kill == "worker SIGKILL":  # loky's pool breaks: the sweep ends FAILED, saying why
            assert proc.returncode == 1, f"{kill}\n{stdout[-2000:]}\n{stderr[-4000:]}"
            assert parent.info.status == "FAILED"
            assert "resume=auto" in parent.data.tags["grpo_lab.error"]
        else:  # that job alone stops, KILLED; the sweep goes on without it
            assert proc.returncode == 0, f"{kill}\n{stdout[-2000:]}\n{stderr[-4000:]}"
            assert "this job alone was stopped" in stderr
            assert parent.info.status == "KILLED"
        resumed_from_checkpoint += stdout.count("resuming from") + stderr.count("resuming from")

    for _ in range(3):  # run it again until it completes
        proc = run_cli(*args)
        (parent,) = sweep_runs(client, dir_)[0]
        if parent.info.status == "FINISHED":
            break
    parents, jobs = sweep_runs(client, dir_)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert int(parents[0].data.tags["grpo_lab.sweep_starts"]) >= 4
    assert parents[0].data.metrics["sweep/jobs"] == 8
    assert sorted(r.info.status for r in jobs) == ["FINISHED"] * 8
    names = [r.info.run_name for r in jobs]
    assert len(set(names)) == 8  # no job has two runs
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in jobs)
    resumed = [r for r in jobs if "grpo_lab.resumed_from" in r.data.tags]
    assert resumed, "no job was resumed from a checkpoint: the kills missed every job"

    clean = {r.info.run_name: r for r in sweep_runs(client, clean_dir)[1]}
    assert sorted(clean) == sorted(names)
    for run in jobs:
        got, want = (
            points_of(client, run.info.run_id),
            points_of(client, clean[run.info.run_name].info.run_id),
        )
        assert got.keys() == want.keys(), run.info.run_name
        for key, points in want.items():
            if key.startswith("perf/"):
                continue
            expected = dict(points)
            # a job SIGKILLed after its last checkpoint logs those steps again on resume:
            # every value at a step must still be the undisturbed one
            assert {s for s, _ in got[key]} == set(expected), (run.info.run_name, key)
            for step, value in got[key]:
                assert value == pytest.approx(expected[step], rel=1e-6, abs=1e-9), (
                    run.info.run_name,
                    key,
                    step,
                )

    # and once more: a finished sweep run again changes nothing
    again = run_cli(*args)
    assert again.stdout.count("already FINISHED (resume=auto)") == 8
    parents2, jobs2 = sweep_runs(client, dir_)
    assert [p.info.run_id for p in parents2] == [parents[0].info.run_id]
    assert sorted(r.info.run_id for r in jobs2) == sorted(r.info.run_id for r in jobs)


@pytest.mark.slow
def test_a_sweep_of_two_process_jobs_killed_once_ends_as_the_undisturbed_sweep(
    run_cli, start_cli, tmp_path, tracking_uri
):
    """2 jobs of trainer.strategy=ddp_spawn with 2 gloo processes each, the sweep SIGTERMed
    once mid-job and run again: every rank resumes its own RNG states, so every metric (means
    over both ranks' samples) at every step equals the undisturbed sweep's."""
    values = ["seed=0,1"]
    ddp = [
        *fast_without("seed", "train.rollouts", "train.eval_every"),
        "train.rollouts=5",
        "train.eval_every=5",
        "trainer.strategy=ddp_spawn",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "num_threads=1",
        "resume=auto",
    ]
    clean_dir, dir_ = tmp_path / "clean", tmp_path / "abl"
    run_cli("train", "-m", *values, *ddp, f"hydra.sweep.dir={clean_dir}", timeout=600)
    args = ["train", "-m", *values, *ddp, f"hydra.sweep.dir={dir_}"]
    log = tmp_path / "start-0.log"
    proc = start_cli(*args, output=log)
    wait_for(proc, lambda: next(dir_.glob("seed-0/checkpoints/rollout-step=2.ckpt"), None), 400)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    assert proc.returncode == 143, log.read_text()[-4000:]
    client = MlflowClient(tracking_uri)
    (parent,), jobs = sweep_runs(client, dir_)
    assert parent.info.status == "KILLED" and [r.info.status for r in jobs] == ["KILLED"]

    run_cli(*args, timeout=600)
    parents, jobs = sweep_runs(client, dir_)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted((r.info.run_name, r.info.status) for r in jobs) == [
        ("seed=0", "FINISHED"),
        ("seed=1", "FINISHED"),
    ]
    clean = {r.info.run_name: r for r in sweep_runs(client, clean_dir)[1]}
    for run in jobs:
        got = points_of(client, run.info.run_id)
        want = points_of(client, clean[run.info.run_name].info.run_id)
        assert got.keys() == want.keys()
        for key in want:
            if key.startswith("perf/"):
                continue
            # (step, value) pairs: pytest.approx takes no nested sequences, so steps and values
            # are compared apart
            assert [s for s, _ in got[key]] == [s for s, _ in want[key]], (run.info.run_name, key)
            assert [v for _, v in got[key]] == pytest.approx(
                [v for _, v in want[key]], rel=1e-6, abs=1e-9
            ), (run.info.run_name, key)
    resumed = next(r for r in jobs if r.info.run_name == "seed=0")
    assert "grpo_lab.resumed_from" in resumed.data.tags


@pytest.mark.slow
def test_a_refused_rerun_of_a_sweep_leaves_the_finished_run_as_it_was(
    run_cli, tmp_path, tracking_uri
):
    """A sweep run again with a key a resume may not change: each job is refused and recorded
    FAILED on a run of its own; the FINISHED run in the job's folder keeps its status, and the
    command as it was finishes the sweep again with one run per job."""
    args = ["train", "-m", "seed=0", *FAST, "resume=auto", f"hydra.sweep.dir={tmp_path / 'abl'}"]
    run_cli(*args)
    client = MlflowClient(tracking_uri)
    (parent,), (job,) = sweep_runs(client, tmp_path / "abl")
    changed = [a.replace("task.eval_size=20", "task.eval_size=10") for a in args]
    assert changed != args
    refused = run_cli(*changed)
    assert "task.eval_size=10 is invalid on resume" in refused.stdout + refused.stderr
    kept = client.get_run(job.info.run_id)
    assert kept.info.status == "FINISHED" and "grpo_lab.error" not in kept.data.tags
    (parent,), jobs = sweep_runs(client, tmp_path / "abl")
    assert parent.info.status == "FAILED"
    (record,) = [r for r in jobs if r.info.run_id != job.info.run_id]
    assert (
        record.info.status == "FAILED" and "task.eval_size=10" in record.data.tags["grpo_lab.error"]
    )

    run_cli(*args)
    (parent,), jobs = sweep_runs(client, tmp_path / "abl")
    assert parent.info.status == "FINISHED"
    assert [(r.info.run_id, r.info.status) for r in jobs] == [(job.info.run_id, "FINISHED")]


@pytest.mark.slow
def test_a_key_swept_in_a_later_start_keeps_the_earlier_jobs_and_splits_the_report(
    run_cli, tmp_path, tracking_uri
):
    """``G=2,4`` (beta fixed at 0.04), then ``G=2,4 beta=0.04,0``: the two jobs that ran are
    found FINISHED in their folders, not run again under new names; the report compares the four
    configurations along G and beta, not two along G with beta=0 and 0.04 mixed."""
    from grpo_lab.report.load import load
    from grpo_lab.report.stats import groups

    dir_ = tmp_path / "abl"
    args = ["train", "-m", *fast_without("G"), "resume=auto", f"hydra.sweep.dir={dir_}"]
    run_cli(*args, "G=2,4")
    again = run_cli(*[a for a in args if a != "beta=0.04"], "G=2,4", "beta=0.04,0")
    assert again.stdout.count("already FINISHED (resume=auto)") == 2
    client = MlflowClient(tracking_uri)
    (parent,), jobs = sweep_runs(client, dir_)
    assert len(jobs) == 4 and {r.info.status for r in jobs} == {"FINISHED"}
    assert json.loads(parent.data.tags["grpo_lab.swept_keys"]) == ["G", "beta"]
    sweep, _, _ = load(str(dir_), tracking_uri)
    assert sorted(groups(sweep)) == [("2", "0"), ("2", "0.04"), ("4", "0"), ("4", "0.04")]


@pytest.mark.slow
def test_a_sweep_without_resume_auto_in_an_earlier_sweeps_dir_is_refused(
    run_cli, tmp_path, tracking_uri
):
    """Started anew there, the jobs would save beside the earlier jobs' checkpoints and the sweep
    file would name a new parent, hiding the earlier jobs from resume=auto and the report."""
    dir_ = tmp_path / "abl"
    args = ["train", "-m", "seed=0", *FAST, f"hydra.sweep.dir={dir_}"]
    run_cli(*args)
    client = MlflowClient(tracking_uri)
    (parent,), (job,) = sweep_runs(client, dir_)
    again = run_cli(*args, check=False)
    assert again.returncode == 1, again.stderr[-3000:]
    assert f"hydra.sweep.dir={dir_}: an earlier sweep ran there" in again.stderr
    assert "resume=auto" in again.stderr
    (parent2,), jobs = sweep_runs(client, dir_)
    assert parent2.info.run_id == parent.info.run_id and [r.info.run_id for r in jobs] == [
        job.info.run_id
    ]
    # a plain run in a job's folder: refused too, naming the run there
    plain = run_cli("train", *FAST, f"paths.output_dir={dir_ / '0'}", check=False)
    assert plain.returncode == 2, plain.stderr[-3000:]
    assert f"holds the checkpoints of an earlier run (MLflow run {job.info.run_id})" in (
        plain.stderr
    )
