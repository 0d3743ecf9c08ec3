"""The ``grpo-lab`` command: train | sft | eval | report.

train, sft and eval are Hydra apps (overrides, ``-m`` sweeps, ``--cfg job``); report is plain
argparse over a finished sweep.
"""

from __future__ import annotations

import secrets
import signal
import sys

from omegaconf import OmegaConf

USAGE = """usage: grpo-lab <command> [overrides...]

commands:
  train    run a GRPO experiment (SFT warm start, then GRPO); Hydra overrides, -m to sweep
  sft      train and cache only the SFT warm start
  eval     score a checkpoint: greedy accuracy and pass@k
  report   tables and plots of a sweep: grpo-lab report <multirun dir | experiment name>

examples:
  grpo-lab train
  grpo-lab train G=16 beta=0 train.rollouts=100
  grpo-lab train -m G=4,8 epsilon=0.1,0.2
  grpo-lab train --cfg job          # print the composed config
"""


def user_error_message(err: BaseException) -> str | None:
    """The message alone for an error in the user's input found before compute, else None.

    ConfigError (``config.validate``), and a ValueError or FileNotFoundError with which a part
    (task, reward, sampler, policy) refused the values it was built with.
    """
    from hydra.errors import InstantiationException

    from grpo_lab.config import ConfigError

    if isinstance(err, ConfigError):
        return str(err)
    cause = err.__cause__
    if isinstance(err, InstantiationException) and isinstance(
        cause, ValueError | FileNotFoundError
    ):
        return f"invalid config:\n  {cause}"
    return None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _interrupted(err: BaseException) -> bool:
    """Whether ``err`` is a signal's stop (``faults.Interrupted``). Only a process that loaded
    ``faults`` (and with it torch and Lightning) can raise one: a config error exits without
    loading them."""
    faults = sys.modules.get("grpo_lab.faults")
    return faults is not None and isinstance(err, faults.Interrupted)


def _job_stopped_alone(stop: SystemExit) -> bool:
    """A signal stopped this sweep job in a launcher's worker process, and not because the
    sweep is stopping: that job alone was signalled (its run ended KILLED with its checkpoint).

    Raised on, the stop would break the worker pool and end every other job of the sweep.
    """
    if not _interrupted(stop) or not _in_multirun():
        return False
    from hydra.core.hydra_config import HydraConfig

    from grpo_lab.sweep.callback import runs_the_sweep
    from grpo_lab.sweep.run_files import sweep_stopping

    if runs_the_sweep() or sweep_stopping(HydraConfig.get().sweep.dir):
        return False
    print(
        "[grpo-lab] this job alone was stopped; the sweep goes on, and the same command with "
        "resume=auto resumes it",
        file=sys.stderr,
    )
    return True


def _run_id() -> str:
    """A token unique to this process: two runs started in the same second get their own dirs."""
    global _RUN_ID
    if _RUN_ID is None:
        _RUN_ID = secrets.token_hex(3)
    return _RUN_ID


_RUN_ID: str | None = None
# conf/hydra/default.yaml names run and sweep dirs <time>-${grpo_lab_run_id:}. Registered on
# import: a launcher's worker process imports this module to run the task function.
if not OmegaConf.has_resolver("grpo_lab_run_id"):
    OmegaConf.register_new_resolver("grpo_lab_run_id", _run_id, use_cache=True)


def _hydra_app(command: str, argv0: str, overrides: list[str]):
    import hydra

    from grpo_lab.paths import config_dir

    def task(cfg):
        # Hydra has parsed its arguments; give back an argv that re-runs this command. Lightning's
        # DDP launcher starts the other ranks with [python, argv[0] (or -m its module), *argv[1:]].
        sys.argv = [argv0, command, *overrides]
        try:
            return run(cfg)
        except SystemExit as stop:
            if _job_stopped_alone(stop):
                return float("nan")  # its run is KILLED; the sweep's other jobs go on
            raise
        except Exception as err:
            message = user_error_message(err)
            if message is None or _in_multirun():
                raise  # a bug keeps its traceback; a sweep records the failed job and goes on
            print(message, file=sys.stderr)
            raise SystemExit(2) from None

    def run(cfg):
        # Checked here, before torch, Lightning and transformers are imported (seconds), so
        # a bad value fails at once; train() checks again for callers that skip the CLI.
        from grpo_lab.config import ConfigError, validate

        validate(cfg)
        if command == "sft" and not (cfg.sft.enabled and cfg.sft.steps):
            enabled = str(cfg.sft.enabled).lower()
            raise ConfigError(
                f"invalid config:\n  sft.enabled={enabled}, sft.steps={cfg.sft.steps}: grpo-lab sft "
                "has no warm start to train (it needs sft.enabled=true and sft.steps >= 1)"
            )
        from grpo_lab.train import silence_noise

        silence_noise()
        if command == "train":
            from grpo_lab.train import train

            return train(cfg)
        if command == "sft":
            from grpo_lab.train import sft_only

            return sft_only(cfg)
        if command == "eval":
            from grpo_lab.evaluate import evaluate

            return evaluate(cfg)
        raise AssertionError(command)

    config_name = "eval" if command == "eval" else "config"
    return hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(
        task
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command in ("train", "sft", "eval"):
        from grpo_lab.renames import rewrite_overrides
        from grpo_lab.sweep import prepare_argv

        rest, renamed = rewrite_overrides(rest)  # names from before the GRPO step's parts
        for note in renamed:
            print(f"[grpo-lab] note: {note}", file=sys.stderr)
        rest = prepare_argv(rest)  # names a missing sweep plugin; seeds=N -> seed=S,...,S+N-1
        from grpo_lab.config import removed_override_errors

        removed = removed_override_errors(rest)
        if removed:
            print("invalid config:\n  " + "\n  ".join(removed), file=sys.stderr)
            raise SystemExit(2)
        argv0 = sys.argv[0]
        sys.argv = [f"grpo-lab-{command}", *rest]  # what Hydra parses (and names the job by)
        try:
            _hydra_app(command, argv0, rest)()
        except BaseException as err:
            if _interrupted(err):
                # stopped and saved: more signals while the interpreter shuts down (a scheduler
                # sends several) must not turn exit status 143 into death by signal
                for s in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(s, signal.SIG_IGN)
            elif not (isinstance(err, SystemExit) and err.code in (0, None)):
                # the launcher failed (joblib's pool broken by a killed worker): Hydra exits 1,
                # or re-raises with HYDRA_FULL_ERROR=1
                from grpo_lab.sweep.callback import end_abandoned_sweep

                end_abandoned_sweep(getattr(err, "code", type(err).__name__))
            raise
    elif command == "report":
        from grpo_lab.report import main as report_main

        report_main(rest)
    else:
        print(
            f"grpo-lab: unknown command {command!r}; allowed: train, sft, eval, report\n",
            file=sys.stderr,
        )
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
