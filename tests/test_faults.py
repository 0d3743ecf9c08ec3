"""Faults, with nothing lost: signals, an unreachable store, an unwritable output dir, a full disk.

Each run goes through the real CLI in a subprocess against a real SQLite MLflow store; the signal
is sent with ``os.kill`` once the run has written a few checkpoints.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from helpers import FAST, cpu_trainer, wait_for

LONG = [o for o in FAST if not o.startswith("train.rollouts=")] + ["train.rollouts=200"]


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    """The process's output once it has exited; a stop must take seconds, not a whole run."""
    out, err = proc.communicate(timeout=timeout)
    return out, err


def runs_by_role(tracking_uri: str):
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("grpo_lab.role") == "sweep"]
    jobs = [r for r in runs if r.data.tags.get("grpo_lab.role") != "sweep"]
    return client, parents, jobs


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_saves_last_ckpt_and_ends_the_run_killed(
    start_cli, tmp_path, tracking_uri, signum
):
    out = tmp_path / "run"
    proc = start_cli("train", *LONG, f"paths.output_dir={out}")
    wait_for(proc, lambda: (out / "checkpoints" / "rollout-step=3.ckpt").is_file() or None)
    # Training, after the start eval (a Lightning validate, whose end must not end the run).
    assert runs_by_role(tracking_uri)[2][0].info.status == "RUNNING"
    proc.send_signal(signum)
    stdout, stderr = finish(proc)

    assert proc.returncode == 128 + signum, f"{proc.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    assert f"stopped by {signum.name}" in stderr and "KILLED" in stderr
    client, _, (run,) = runs_by_role(tracking_uri)
    assert run.info.status == "KILLED"
    # last.ckpt holds the step the run stopped at: one optimizer step per rollout here (mu=1,
    # one mini-batch), and the run logged the metric `rollout` once per rollout it finished.
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    rollouts_logged = client.get_metric_history(run.info.run_id, "rollout")
    assert 3 <= ckpt["global_step"] < 200
    assert ckpt["global_step"] == len(rollouts_logged) == max(m.value for m in rollouts_logged)
    assert not list((out / "checkpoints").glob("*.tmp"))  # no half-written file left behind


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic"])
def test_sigterm_ends_a_sweep_with_its_parent_and_job_runs_killed(
    start_cli, tmp_path, tracking_uri, launcher
):
    """basic: jobs run in the sweep's process. (joblib workers, which the signal never reaches:
    the first kill of tests/test_preemption.py's sweep proof.)"""
    extra = [] if launcher == "basic" else ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    proc = start_cli("train", "-m", *extra, "num_threads=1", "seed=0,1", *LONG)
    # basic: job 0 is training, job 1 has not started; parallel: both are training
    expected = 1 if launcher == "basic" else 2

    def training():
        found = list((tmp_path / "multirun").rglob("rollout-step=2.ckpt"))
        return found if len(found) == expected else None

    wait_for(proc, training)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = finish(proc, timeout=120)

    assert proc.returncode == 143, f"{proc.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    _, (parent,), jobs = runs_by_role(tracking_uri)
    assert parent.info.status == "KILLED"
    assert [r.info.status for r in jobs] == ["KILLED"] * expected
    for r in jobs:
        job_dir = Path(r.data.tags["grpo_lab.job_dir"])
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()


# --------------------------------------------------------------------------- before any compute


@pytest.mark.slow
@pytest.mark.parametrize(
    "uri, why",
    [
        ("http://127.0.0.1:9", "no connection to 127.0.0.1:9"),
        ("sqlite:///{tmp}/a_file/mlflow.db", "cannot create the directory"),
    ],
    ids=["server-down", "sqlite-dir-under-a-file"],
)
def test_unreachable_store_is_a_clear_error_before_any_compute(
    run_cli, tmp_path, cache_dir, uri, why
):
    uri = uri.format(tmp=tmp_path)
    (tmp_path / "a_file").write_text("not a directory\n")
    cache = tmp_path / "cache"
    # MLflow's client retries a server that does not answer for minutes: the timeout is the test.
    proc = run_cli(
        "train",
        *FAST,
        f"logger.tracking_uri={uri}",
        f"paths.cache_dir={cache}",
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"logger.tracking_uri={uri} cannot be reached" in proc.stderr and why in proc.stderr
    assert not cache.exists()  # no warm start was trained
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_unwritable_output_dir_is_a_clear_error_before_any_compute(run_cli, tmp_path):
    """A directory under a regular file cannot be made (by root either: chmod would not stop it)."""
    (tmp_path / "a_file").write_text("not a directory\n")
    cache = tmp_path / "cache"
    proc = run_cli(
        "train",
        *FAST,
        f"paths.output_dir={tmp_path / 'a_file' / 'run'}",
        f"paths.cache_dir={cache}",
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"paths.output_dir={tmp_path / 'a_file' / 'run'} is not usable" in proc.stderr
    assert "Not a directory" in proc.stderr
    assert not cache.exists()
    # the MLflow store was not touched either: no run was created
    exp = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name(
        "grpo_lab"
    )
    assert exp is None


# --------------------------------------------------------------------------- a full disk


def _save_twice_script(ckpt_dir: Path, fill_mb: float) -> str:
    """Save a 1 MB checkpoint, fill the disk but ``fill_mb``, save a 2 MB one with the same name."""
    return f"""
import os, sys, torch
from pathlib import Path
import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel
from grpo_lab.faults import AtomicCheckpointIO

d = Path({str(ckpt_dir)!r})
trainer = L.Trainer(
    plugins=[AtomicCheckpointIO()], logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(d),
)
module = BoringModel()
trainer.strategy.connect(module)
module.first = torch.nn.Parameter(torch.ones(256 * 1024))   # 1 MB of float32 ones
trainer.save_checkpoint(d / "last.ckpt")
stat = os.statvfs(d)
free = stat.f_bavail * stat.f_frsize
(d / "filler").write_bytes(b"x" * int(free - {fill_mb} * 2**20))  # the disk is almost full now
module.first = torch.nn.Parameter(torch.full((512 * 1024,), 2.0))  # a bigger one: 2 MB
try:
    trainer.save_checkpoint(d / "last.ckpt")
except Exception as err:
    print("save failed:", type(err).__name__, err)
    sys.exit(0)
print("save succeeded")
"""


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_the_earlier_last_ckpt_intact(tmp_path):
    """A 4 MB tmpfs holds the checkpoint dir; the second save finds 0.5 MB free for 2 MB (1.5 MB
    once the old 1 MB file is truncated).

    Lightning's own save stages the file in the system temp dir and then copies it over the old
    one when that dir is on another filesystem: truncated, then cut off by the full disk.
    """
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode()}")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _save_twice_script(mnt, fill_mb=0.5)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "TMPDIR": str(tmp_path)},  # the system temp dir: another disk
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "save failed: OSError" in proc.stdout, proc.stdout + proc.stderr
        ckpt = torch.load(mnt / "last.ckpt", map_location="cpu", weights_only=False)
        assert torch.equal(ckpt["state_dict"]["first"], torch.ones(256 * 1024))
        assert sorted(p.name for p in mnt.iterdir()) == ["filler", "last.ckpt"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def test_a_checkpoint_gets_the_mode_any_new_file_gets(tmp_path):
    """mkstemp makes its file 0600; the renamed checkpoint must be readable as a file written
    the ordinary way is (0666 less the umask): another user's eval, a shared results dir."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from grpo_lab.faults import AtomicCheckpointIO

    trainer = cpu_trainer(plugins=[AtomicCheckpointIO()], default_root_dir=str(tmp_path))
    trainer.strategy.connect(BoringModel())
    old = os.umask(0o027)
    try:
        trainer.save_checkpoint(tmp_path / "last.ckpt")
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old)
    mode = (tmp_path / "last.ckpt").stat().st_mode & 0o777
    assert mode == 0o640 == (tmp_path / "plain").stat().st_mode & 0o777, oct(mode)
