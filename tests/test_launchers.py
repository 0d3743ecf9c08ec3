"""Launchers: one GPU per joblib worker (``parallel_gpu``), multi-process jobs inside ``-m``.

No GPU is needed: CUDA_VISIBLE_DEVICES is only read, by CUDA, when a job touches a GPU, so a CPU
sweep (``trainer.accelerator=cpu``: jobs that ask for no GPU) shows which device each job would
have had. Jobs that want a GPU are refused on a machine without enough of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FAST


def child_runs(tracking_uri: str):
    """(parent sweep run, its job runs) from the store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("grpo_lab.role") == "sweep"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) + 1 == len(runs), "a run outside the sweep (a rank > 0 made its own?)"
    return parent, children


# --------------------------------------------------------------------------- parallel_gpu

# A stand-in for one joblib worker: resolves CUDA_VISIBLE_DEVICES as Hydra does for its first
# job (env_set of the composed parallel_gpu config), prints it, and holds it until stdin closes.
WORKER = """
import sys
from hydra import compose, initialize_config_dir
from grpo_lab.paths import config_dir
import grpo_lab.sweep  # registers the grpo_lab_device resolver

job_num, sweep_dir = sys.argv[1], sys.argv[2]
with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
    cfg = compose(
        "config",
        overrides=[
            "hydra/launcher=parallel_gpu",
            "hydra.launcher.n_jobs=2",
            f"hydra.job.num={job_num}",
            # As in conf/hydra/default.yaml, a timestamp (here to the microsecond): a job's env_set
            # is resolved on a copy of the config without the resolver cache, so each process
            # gets its own time. Hydra's run_job sets the output dir from the cached one.
            "hydra.sweep.dir=" + sweep_dir + "/${now:%H-%M-%S-%f}",
            f"hydra.runtime.output_dir={sweep_dir}/sweep/{job_num}",
        ],
        return_hydra_config=True,
    )
print(cfg.hydra.job.env_set.CUDA_VISIBLE_DEVICES, flush=True)
sys.stdin.read()
"""


def start_worker(job_num: int, sweep_dir: Path, env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(job_num), str(sweep_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise AssertionError(f"worker for job {job_num} printed no device:\n{proc.stderr.read()}")
    return proc, line


def stop_worker(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()


def test_live_workers_get_distinct_gpus_whatever_their_first_job_numbers(tmp_path):
    """Two workers whose first jobs are 0 and 2 (joblib batches of 2, or a replaced worker),
    starting at different times.

    With 2 GPUs, job number modulo 2 would give both GPU 0, and so would slots kept in
    ``${hydra.sweep.dir}`` (a new timestamp, so a new folder, per worker). Slots in the job's
    sweep folder give them 0 and 1; a worker that starts after one exits takes the freed slot.
    """
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    first, first_device = start_worker(0, tmp_path, env)
    second, second_device = start_worker(2, tmp_path, env)
    try:
        assert {first_device, second_device} == {"0", "1"}
        stop_worker(first)
        third, third_device = start_worker(4, tmp_path, env)
        stop_worker(third)
        assert third_device == first_device  # the slot the first worker gave back
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    slots = tmp_path / "sweep" / ".gpu-slots"
    assert sorted(p.name for p in slots.iterdir()) == ["0.lock", "1.lock"]


def test_gpu_slots_map_onto_the_visible_devices_the_sweep_started_with(tmp_path, monkeypatch):
    from grpo_lab.sweep import gpu_slots as sweep

    monkeypatch.setattr(sweep, "_GPU_SLOT", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    # Another worker holds slot 0 (flock locks of two open files conflict within one process too).
    slot, held = sweep.claim_gpu_slot(tmp_path / sweep.GPU_SLOTS_DIR, 2)
    try:
        assert slot == 0
        assert (
            sweep._device_for_worker(str(tmp_path / "1"), "1", "2") == "7"
        )  # slot 1 -> 2nd visible GPU
        assert (
            sweep._device_for_worker(str(tmp_path / "1"), "1", "2") == "7"
        )  # kept for the process's life
        with pytest.raises(RuntimeError, match=r"all 2 GPU slots .* are held by other workers"):
            sweep.claim_gpu_slot(tmp_path / sweep.GPU_SLOTS_DIR, 2, wait_s=0)
    finally:
        held.close()
        sweep._GPU_SLOT["lock"].close()


def test_sweep_dir_is_the_job_output_dir_less_its_subdir():
    from grpo_lab.sweep import sweep_dir_of_job

    assert sweep_dir_of_job("/r/multirun/d/t/3", "3") == Path("/r/multirun/d/t")
    assert sweep_dir_of_job("/r/multirun/d/t/G=2/3", "G=2/3") == Path("/r/multirun/d/t")
    assert sweep_dir_of_job("/r/elsewhere/7", "3") == Path("/r/elsewhere")  # a moved job dir


def test_bad_gpu_worker_counts_are_refused_with_what_is_allowed(tmp_path, monkeypatch):
    from grpo_lab import sweep
    from grpo_lab.sweep import gpu_slots

    monkeypatch.setattr(gpu_slots, "_GPU_SLOT", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    with pytest.raises(
        ValueError, match=r"n_jobs=3 is invalid with CUDA_VISIBLE_DEVICES=5,7: expected at most 2"
    ):
        gpu_slots._device_for_worker(str(tmp_path / "1"), "1", "3")
    with pytest.raises(ValueError, match=r"n_jobs=-1 is invalid .*an integer >= 1"):
        gpu_slots._device_for_worker(str(tmp_path / "1"), "1", "-1")
    with pytest.raises(
        SystemExit, match=r"hydra.launcher.n_jobs=-1 is invalid with hydra/launcher"
    ):
        sweep.prepare_argv(["-m", "hydra/launcher=parallel_gpu", "hydra.launcher.n_jobs=-1"])
    assert not (tmp_path / sweep.GPU_SLOTS_DIR).exists()  # refused before claiming anything


def test_more_gpu_workers_than_gpus_are_refused_with_the_count_and_what_to_set(monkeypatch):
    from grpo_lab.sweep import gpu_workers_error

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_workers_error(2, 0) == (
        "hydra.launcher.n_jobs=2 is invalid with hydra/launcher=parallel_gpu: "
        "torch.cuda.device_count() sees 0 GPUs here, and each worker holds one GPU; "
        "use hydra/launcher=parallel for jobs on the CPU"
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4")
    assert gpu_workers_error(3, 1) == (
        "hydra.launcher.n_jobs=3 is invalid with hydra/launcher=parallel_gpu: "
        "torch.cuda.device_count() sees 1 GPU here (CUDA_VISIBLE_DEVICES=4), and each worker "
        "holds one GPU; set hydra.launcher.n_jobs=1 (the other jobs wait for a free GPU)"
    )
    assert gpu_workers_error(2, 2) is None and gpu_workers_error(1, 8) is None


def test_a_parallel_gpu_job_that_sees_no_gpu_refuses_to_train_on_the_cpu():
    from grpo_lab.sweep import job_gpu_error

    for accelerator in ("auto", "gpu", "cuda"):
        error = job_gpu_error(accelerator, 0, "3")
        assert error.startswith(f"trainer.accelerator={accelerator} is invalid here: ")
        assert "given CUDA_VISIBLE_DEVICES=3 and torch sees no GPU there" in error
    assert job_gpu_error("auto", 1, "3") is None  # its GPU is there
    assert job_gpu_error("cpu", 0, "3") is None  # it asked for none


def test_a_job_s_gpu_check_reads_the_launcher_and_accelerator_of_its_config(monkeypatch):
    """``check_job_gpu`` in a job composed as Hydra composes a parallel_gpu job: GPU 99 is not
    there (on any machine), so the job refuses to train unless it runs on the CPU."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from grpo_lab.config import ConfigError
    from grpo_lab.paths import config_dir
    from grpo_lab.sweep import check_job_gpu

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "99")

    def job(*overrides: str):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    try:
        with pytest.raises(ConfigError, match=r"trainer.accelerator=auto is invalid here"):
            check_job_gpu(job("hydra/launcher=parallel_gpu"))
        check_job_gpu(job("hydra/launcher=parallel_gpu", "trainer.accelerator=cpu"))
        check_job_gpu(job("hydra/launcher=parallel"))  # no GPU was promised
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.slow
@pytest.mark.parametrize("n_jobs_given", [True, False], ids=["n_jobs", "default_n_jobs"])
def test_a_parallel_gpu_sweep_with_more_workers_than_gpus_is_refused_before_any_job(
    run_cli, tmp_path, tracking_uri, n_jobs_given
):
    import torch

    n_gpus = torch.cuda.device_count()  # 0 here; the test holds on a GPU machine too
    n_jobs = n_gpus + 1 if n_jobs_given else 2  # parallel.yaml's default
    if not n_jobs_given and n_gpus >= 2:
        pytest.skip("the default of 2 workers fits the GPUs of this machine")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc = run_cli(
        "train",
        "-m",
        "hydra/launcher=parallel_gpu",
        *([f"hydra.launcher.n_jobs={n_jobs}"] if n_jobs_given else []),
        "seed=0,1,2",
        *FAST,
        env=env,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    gpus = f"{n_gpus} GPU" + ("" if n_gpus == 1 else "s")
    assert proc.stderr.startswith(
        f"grpo-lab: hydra.launcher.n_jobs={n_jobs} is invalid with hydra/launcher=parallel_gpu: "
        f"torch.cuda.device_count() sees {gpus} here, and each worker holds one GPU; "
    ), proc.stderr[-3000:]
    # refused before the sweep: no sweep folder, no MLflow experiment, nothing trained
    assert not (tmp_path / "multirun").exists()
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name("grpo_lab") is None


@pytest.mark.slow
def test_parallel_gpu_sweep_never_runs_two_jobs_on_one_gpu(run_cli, tracking_uri):
    """A real joblib sweep: 2 workers, 4 jobs dispatched in batches of 2 (first jobs 0 and 2)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    run_cli(
        "train",
        "-m",
        "hydra/launcher=parallel_gpu",
        "hydra.launcher.n_jobs=2",
        "hydra.launcher.batch_size=2",
        "seed=0,1,2,3",
        "trainer.accelerator=cpu",  # on this machine's CPU: the slots still spread the jobs
        "num_threads=1",
        *FAST,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    parent, jobs = child_runs(tracking_uri)
    assert len(jobs) == 4 and {r.info.status for r in jobs} == {"FINISHED"}
    device = {r.info.run_id: r.data.tags["grpo_lab.cuda_visible_devices"] for r in jobs}
    assert set(device.values()) <= {"0", "1"}
    for a in jobs:
        for b in jobs:
            overlap = a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time
            if a is not b and overlap:
                assert device[a.info.run_id] != device[b.info.run_id], (
                    f"jobs {a.data.tags['grpo_lab.job_num']} and {b.data.tags['grpo_lab.job_num']} "
                    f"ran at the same time on GPU {device[a.info.run_id]}"
                )


# --------------------------------------------------------------------------- DDP inside -m


@pytest.mark.slow
@pytest.mark.xdist_group("processes")  # DDP ranks: see pyproject's addopts
@pytest.mark.parametrize(
    "launcher",
    [
        ["hydra/launcher=serial"],
        pytest.param(
            ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"],
            # Passes run alone (-n0); beside the suite's other worker its two concurrent jobs of
            # two spawned ranks each failed once in three runs (cause not found yet).
            marks=pytest.mark.skipif(
                "PYTEST_XDIST_WORKER" in os.environ,
                reason="flaky beside other tests: run it alone with -n0",
            ),
        ),
    ],
    ids=["serial", "parallel"],
)
def test_ddp_spawn_jobs_inside_a_sweep_each_log_one_run(run_cli, tracking_uri, launcher):
    """What the README documents: ``trainer.strategy=ddp_spawn`` with 2 processes per job, in a
    ``-m`` sweep of 2 jobs (CPU, gloo), with the jobs one after another in the sweep's process or
    in joblib workers. Each job finishes and logs one run with its eval metrics."""
    proc = run_cli(
        "train",
        "-m",
        *launcher,
        "seed=0,1",
        "trainer.strategy=ddp_spawn",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "num_threads=1",
        *FAST,
        env={"OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert "sweep: 2 jobs, 0 failed" in proc.stdout
    parent, jobs = child_runs(tracking_uri)
    assert parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in jobs) == ["seed=0", "seed=1"]
    for r in jobs:
        assert r.info.status == "FINISHED"
        assert r.data.params["trainer.strategy"] == "ddp_spawn"
        for key in (
            "eval/accuracy_start",
            "eval/accuracy",
            "eval/accuracy_final",
            "loss",
            "reward",
        ):
            assert key in r.data.metrics, (r.info.run_name, sorted(r.data.metrics))
        assert r.data.metrics["objective"] == pytest.approx(r.data.metrics["eval/accuracy_final"])
        out = Path(r.data.tags["grpo_lab.job_dir"])
        assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == r.info.run_id
        assert (out / "checkpoints" / "last.ckpt").is_file()
