"""Resume: which checkpoint ``resume=auto`` takes, and which config changes a resume refuses."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from mlflow import MlflowClient
from omegaconf import OmegaConf

from grpo_lab.config import ConfigError, validate
from grpo_lab.paths import config_dir
from grpo_lab.resume import (
    changed_params,
    checkpoint_to_resume,
    refused_changes,
    run_to_continue,
)
from grpo_lab.sweep import write_run_file
from grpo_lab.train import fixed_output_dir
from helpers import LEARNING, compose, points_of, wait_for


def _cfg(**top):
    return OmegaConf.create({"ckpt_path": None, "resume": None, **top})


def test_resume_auto_takes_last_ckpt_of_the_output_dir_when_there_is_one(tmp_path):
    cfg = _cfg(resume="auto")
    assert checkpoint_to_resume(cfg, tmp_path, fixed_output_dir=True) is None  # fresh start
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    (last.parent / "rollout-step=2.ckpt").write_bytes(b"x")
    assert checkpoint_to_resume(cfg, tmp_path, fixed_output_dir=True) is None  # only last.ckpt
    last.write_bytes(b"x")
    assert checkpoint_to_resume(cfg, tmp_path, fixed_output_dir=True) == last


def test_without_resume_the_checkpoint_is_ckpt_path_or_none(tmp_path):
    assert checkpoint_to_resume(_cfg(), tmp_path, fixed_output_dir=False) is None
    given = tmp_path / "x.ckpt"
    got = checkpoint_to_resume(_cfg(ckpt_path=str(given)), tmp_path, fixed_output_dir=False)
    assert got == given


def test_resume_auto_needs_an_output_dir_fixed_on_the_command_line(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"resume=auto needs a fixed output directory: set "
        r"paths.output_dir=DIR \(or hydra.run.dir=DIR\)",
    ):
        checkpoint_to_resume(_cfg(resume="auto"), tmp_path, fixed_output_dir=False)


def test_resume_auto_and_ckpt_path_together_are_refused(tmp_path):
    cfg = _cfg(resume="auto", ckpt_path="a.ckpt")
    with pytest.raises(ConfigError, match=r"resume=auto with ckpt_path=a.ckpt: give one of them"):
        checkpoint_to_resume(cfg, tmp_path, fixed_output_dir=True)


@pytest.mark.parametrize(
    ("overrides", "fixed"),
    [([], False), (["hydra.run.dir=runs/a"], True), (["paths.output_dir=runs/a"], True)],
)
def test_the_output_dir_is_fixed_only_when_given_on_the_command_line(overrides, fixed):
    """The default run dir has the time and a per-process token in it: never the same twice."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert fixed_output_dir(cfg) is fixed
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize(
    ("value", "shown"), [("yes", "'yes'"), ("last", "'last'"), ("true", "True")]
)
def test_resume_takes_null_or_auto(value, shown):
    with pytest.raises(ConfigError, match=rf"resume={shown} is invalid: expected null or auto"):
        validate(compose(f"resume={value}", check=False))
    compose("resume=auto")  # validates


def test_a_resume_may_change_how_long_the_run_goes_but_not_what_it_computes():
    run = {
        "G": "8",
        "train.rollouts": "4",
        "train.lr": "0.0001",
        "ckpt_path": "None",
        "logger.tracking_uri": "sqlite:///a.db",
        "reward.functions.x.k": "1",
    }
    now = {
        "G": "8",
        "train.rollouts": "8",
        "train.lr": "0.0003",
        "ckpt_path": "a/last.ckpt",
        "logger.tracking_uri": "sqlite:////abs/a.db",
        "resume": "None",
    }
    changed = changed_params(run, now)
    # "resume" is new (the run predates the key): no change. The others differ or are gone.
    assert changed == {
        "train.rollouts": ("4", "8"),
        "train.lr": ("0.0001", "0.0003"),
        "ckpt_path": ("None", "a/last.ckpt"),
        "logger.tracking_uri": ("sqlite:///a.db", "sqlite:////abs/a.db"),
        "reward.functions.x.k": ("1", None),
    }
    message = refused_changes("RUN1", changed)
    lines = message.splitlines()
    assert lines[0] == "invalid config:"
    # only the keys that change the computation, each with the value now and the run's
    assert lines[1].strip() == (
        "reward.functions.x.k=(no such key) is invalid on resume: the MLflow run this checkpoint "
        "continues (RUN1) has reward.functions.x.k=1"
    )
    assert lines[2].strip() == (
        "train.lr=0.0003 is invalid on resume: the MLflow run this checkpoint continues (RUN1) "
        "has train.lr=0.0001"
    )
    assert "may change only train.rollouts, trainer.max_steps" in lines[3]
    assert len(lines) == 4
    assert (
        refused_changes(
            "RUN1",
            {k: v for k, v in changed.items() if k != "train.lr" and not k.startswith("reward.")},
        )
        is None
    )


def test_the_run_to_continue_is_the_one_noted_beside_the_checkpoints(tmp_path, tracking_uri):
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.create_run(client.create_experiment("e"))
    run_id = run.info.run_id
    client.log_param(run_id, "G", "8")
    client.log_param(run_id, "train.rollouts", "4")
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    # no mlflow_run.json: a new run; and no checkpoint: a fresh start
    assert run_to_continue(ckpt, tracking_uri, {"G": "8"}) == (None, {})
    assert run_to_continue(None, tracking_uri, {"G": "8"}) == (None, {})

    write_run_file(tmp_path / "out", run_id, run.info.experiment_id, tracking_uri)
    found, changed = run_to_continue(ckpt, tracking_uri, {"G": "8", "train.rollouts": "8"})
    assert found.info.run_id == run_id and changed == {"train.rollouts": ("4", "8")}
    with pytest.raises(ConfigError, match=rf"G=16 is invalid on resume: .* \({run_id}\) has G=8"):
        run_to_continue(ckpt, tracking_uri, {"G": "16", "train.rollouts": "4"})

    other = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(
        ConfigError, match=rf"logger.tracking_uri={other} does not hold MLflow run {run_id}"
    ):
        run_to_continue(ckpt, other, {"G": "8"})


@pytest.mark.slow
def test_a_run_killed_midway_resumes_into_the_same_mlflow_run(
    run_cli,
    start_cli,
    tmp_path,
    tracking_uri,
):
    """8 rollouts, SIGTERM once rollout 3 is checkpointed, then the same command again
    (``resume=auto``, same output dir) to the end: every metric at every step equals a clean
    8-rollout run's (timings excepted), all in one MLflow run that ends FINISHED."""
    args = ["train", *LEARNING, "train.rollouts=8", "resume=auto"]
    # resume=auto in a dir with no checkpoint: a fresh start
    run_cli(*args, f"paths.output_dir={tmp_path / 'clean'}")
    out = tmp_path / "run"
    proc = start_cli(*args, f"paths.output_dir={out}")
    wait_for(proc, lambda: (out / "checkpoints" / "rollout-step=3.ckpt").is_file() or None)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, f"{stdout[-2000:]}\n{stderr[-4000:]}"
    assert "run the same command again to resume (resume=auto)" in stderr

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    clean_id = json.loads((tmp_path / "clean" / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    stopped_at = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    stopped_at = stopped_at["grpo_rollouts_done"]
    assert 3 <= stopped_at < 8  # killed midway: the resume has rollouts left to do
    assert [s for s, _ in points_of(client, run_id)["rollout"]] == list(range(1, stopped_at + 1))

    run_cli(*args, f"paths.output_dir={out}")
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id
    exp = client.get_experiment_by_name("grpo_lab")
    assert len(client.search_runs([exp.experiment_id])) == 2  # the clean run and this one
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.tags["grpo_lab.resumed_from"] == str(
        out / "checkpoints" / "last.ckpt"
    )

    def datasets(r: str) -> list[tuple]:
        inputs = client.get_run(r).inputs.dataset_inputs
        return sorted((d.dataset.name, d.dataset.digest, d.tags[0].value) for d in inputs)

    # logged at the first start, not again on resume: the clean run's two, the same digests
    assert datasets(run_id) == datasets(clean_id) and len(datasets(run_id)) == 2

    resumed, clean = points_of(client, run_id), points_of(client, clean_id)
    assert resumed.keys() == clean.keys()
    assert [s for s, _ in clean["rollout"]] == list(range(1, 9))
    # the policy moved over the run, so equal metrics below mean equal samples and updates
    assert len({v for _, v in clean["loss"]}) > 1 and len({v for _, v in clean["reward"]}) > 1
    for key in clean:
        # every point once, at the clean run's steps (eval/* repeats the last step: the final eval)
        assert [s for s, _ in resumed[key]] == [s for s, _ in clean[key]], key
        if not key.startswith("perf/"):
            assert [v for _, v in resumed[key]] == pytest.approx([v for _, v in clean[key]]), key
    tables = {
        r: {a.path for a in client.list_artifacts(r, "completions")} for r in (run_id, clean_id)
    }
    assert tables[run_id] == tables[clean_id] and len(tables[clean_id]) == 8
