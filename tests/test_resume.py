"""Resume: which checkpoint ``resume=auto`` takes, and which config changes a resume refuses."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from grpo_lab.config import ConfigError, validate
from grpo_lab.resume import changed_params, checkpoint_to_resume, refused_changes
from test_train_cli import compose_default


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
    ("value", "shown"), [("yes", "'yes'"), ("last", "'last'"), ("true", "True")]
)
def test_resume_takes_null_or_auto(value, shown):
    with pytest.raises(ConfigError, match=rf"resume={shown} is invalid: expected null or auto"):
        validate(compose_default(f"resume={value}"))
    validate(compose_default("resume=auto"))


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
