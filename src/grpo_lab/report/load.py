"""Reading a sweep back from MLflow (and its Hydra folder) into ``Sweep``/``Job`` records."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grpo_lab import renames
from grpo_lab.sweep.run_files import SWEEP_FILE

METRICS = ("eval/accuracy", "reward", "kl", "completions/mean_length", "rollout")


@dataclass
class Job:
    """One run of the sweep: its swept values, summary numbers and curves."""

    num: int
    run_id: str
    name: str
    status: str
    swept: dict[str, str]
    values: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    seed: str | None = None  # the run's seed (swept, else its logged param): pairs replicates
    # MLflow dataset inputs: context ("training", "evaluation") -> (dataset name, digest)
    data: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Sweep:
    parent_run_id: str | None
    experiment_id: str
    sweep_id: str
    swept_keys: list[str]
    objective_name: str
    jobs: list[Job]


def _renamed(swept: dict[str, str]) -> dict[str, str]:
    """Swept key -> value under today's names (``loss=token_mean`` -> ``aggregation=token_mean``)."""
    out = {}
    for key, value in swept.items():
        new = renames.rewrite_override(f"{key}={value}")[0]
        new_key, _, new_value = new.lstrip("+~").partition("=")
        out[new_key] = new_value
    return out


def _abs_sqlite(uri: str, base: Path) -> str:
    """A relative ``sqlite:///mlflow.db`` as seen from ``base`` (where the sweep was started)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((base / uri[len(prefix) :]).resolve())
    return uri


def _job_from_run(client: Any, run: Any, swept: dict[str, str]) -> Job:
    hist = {
        k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
        for k in METRICS
    }
    m = run.data.metrics
    acc = [v for _, v in hist["eval/accuracy"]]
    last = {k: (h[-1][1] if h else math.nan) for k, h in hist.items()}
    final_acc = m.get("eval/accuracy_final", last["eval/accuracy"])
    failed = run.info.status == "FAILED"
    end = run.info.end_time or run.info.start_time
    values = {
        "objective": math.nan if failed else m.get("objective", final_acc),
        "eval_acc_final": math.nan if failed else final_acc,
        "eval_acc_best": max(acc) if acc else math.nan,
        "reward_final": last["reward"],
        "kl": last["kl"],
        "mean_length": last["completions/mean_length"],
        "steps": last["rollout"],
        "wall_s": (end - run.info.start_time) / 1000,
    }
    return Job(
        num=int(run.data.tags.get("grpo_lab.job_num", "-1")),
        run_id=run.info.run_id,
        name=run.info.run_name,
        status=run.info.status,
        swept=swept,
        values=values,
        curves={"reward": hist["reward"], "eval/accuracy": hist["eval/accuracy"]},
        seed=swept.get("seed") or run.data.params.get("seed"),
        data=dataset_inputs(run),
    )


def dataset_inputs(run: Any) -> dict[str, tuple[str, str]]:
    """context -> (name, digest) of the datasets a run logged (``tracking.log_datasets``)."""
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    out = {}
    for di in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in di.tags if t.key == MLFLOW_DATASET_CONTEXT), "")
        out[context] = (di.dataset.name, di.dataset.digest)
    return out


def load(source: str, tracking_uri: str | None = None) -> tuple[Sweep, Path | None, str]:
    """The sweep in folder ``source`` (a multirun dir) or the latest sweep of experiment ``source``.

    Returns (sweep, sweep dir or None, tracking URI used).
    """
    from grpo_lab import store

    path = Path(source)
    sweep_dir: Path | None = None
    if path.is_dir():
        info_file = path / SWEEP_FILE
        if not info_file.is_file():
            raise SystemExit(
                f"grpo-lab report: {source} has no {SWEEP_FILE}: give a folder made by "
                "`grpo-lab train -m ...` (multirun/<date>/<time>-<id>) or an MLflow experiment name"
            )
        info = json.loads(info_file.read_text())
        sweep_dir = path.resolve()
        uri = (
            tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or _abs_sqlite(info["tracking_uri"], sweep_dir.parents[2])
        )
        parent_id, exp_id = info["parent_run_id"], info["experiment_id"]
    else:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        exp = store.client(uri).get_experiment_by_name(source)
        if exp is None:
            raise SystemExit(
                f"grpo-lab report: {source!r} is neither a sweep folder nor an experiment in {uri} "
                "(give multirun/<date>/<time>-<id>, or an experiment name with --tracking-uri)"
            )
        exp_id = exp.experiment_id
        parents = store.client(uri).search_runs(
            [exp_id],
            filter_string="tags.`grpo_lab.role` = 'sweep'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not parents:
            raise SystemExit(
                f"grpo-lab report: experiment {source!r} in {uri} has no sweep (run grpo-lab train -m ...)"
            )
        parent_id = parents[0].info.run_id
    client = store.client(uri)
    parent = client.get_run(parent_id)
    # a sweep made before the GRPO step's parts names some keys the old way (loss=...)
    keys = [
        renames.new_key(k) for k in json.loads(parent.data.tags.get("grpo_lab.swept_keys", "[]"))
    ]
    if sweep_dir is None and parent.data.tags.get("grpo_lab.sweep_dir"):
        sweep_dir = Path(parent.data.tags["grpo_lab.sweep_dir"])
        sweep_dir = sweep_dir if sweep_dir.is_dir() else None
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000
    )
    jobs = []
    for run in runs:
        swept = _renamed(json.loads(run.data.tags.get("grpo_lab.swept", "{}")))
        overrides_file = None
        if "grpo_lab.job_dir" in run.data.tags:
            overrides_file = Path(run.data.tags["grpo_lab.job_dir"]) / ".hydra" / "overrides.yaml"
        elif sweep_dir is not None and "grpo_lab.job_num" in run.data.tags:  # before job_dir
            overrides_file = (
                sweep_dir / run.data.tags["grpo_lab.job_num"] / ".hydra" / "overrides.yaml"
            )
        if (
            overrides_file is not None and overrides_file.is_file()
        ):  # what Hydra ran, as the job saw it
            given = _renamed(
                dict(
                    o.lstrip("+~").split("=", 1) for o in yaml.safe_load(overrides_file.read_text())
                )
            )
            swept = {k: str(given[k]) for k in keys if k in given}
        jobs.append(_job_from_run(client, run, swept))
    jobs.sort(key=lambda j: j.num)
    sweep = Sweep(
        parent_id,
        exp_id,
        parent.data.tags.get("grpo_lab.sweep_id", parent_id),
        keys,
        parent.data.tags.get("grpo_lab.objective") or "eval/accuracy",
        jobs,
    )
    return sweep, sweep_dir, uri
