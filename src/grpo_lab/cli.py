"""The ``grpo-lab`` command: train | sft | eval | report.

train, sft and eval are Hydra apps (overrides, ``-m`` sweeps, ``--cfg job``); report is plain
argparse over a finished sweep.
"""

from __future__ import annotations

import sys

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


def _hydra_app(command: str):
    import hydra

    from grpo_lab.paths import config_dir

    def task(cfg):
        if command in ("train", "sft"):
            # Checked here, before torch, Lightning and transformers are imported (seconds), so
            # a bad value fails at once; train() checks again for callers that skip the CLI.
            from grpo_lab.config import validate

            validate(cfg)
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
        from grpo_lab.sweep import prepare_argv

        rest = prepare_argv(rest)  # names a missing sweep plugin; seeds=N -> seed=S,...,S+N-1
        sys.argv = [f"grpo-lab-{command}", *rest]
        _hydra_app(command)()
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
