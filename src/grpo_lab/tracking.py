"""MLflow: the resolved config as params and artifact, run tags, completion tables, links.

Every call goes through ``store``'s retrying client: ``logger`` here is a ``store.RunLogger``,
whose ``experiment`` (the MLflow client) retries while the store is locked.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from grpo_lab.store import RunLogger

log = logging.getLogger(__name__)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as the params MLFlowLogger logs: flattened, values as cut strings."""
    from lightning.fabric.utilities.logger import _flatten_dict

    container = OmegaConf.to_container(cfg, resolve=True)
    # MLFlowLogger.log_hyperparams: _flatten_dict, then str(value)[:250]
    return {k: str(v)[:PARAM_LENGTH] for k, v in _flatten_dict(flatten(container)).items()}


PARAM_LENGTH = 250


def log_config(
    logger: RunLogger, cfg: DictConfig, run_params: Mapping[str, str] | None = None
) -> None:
    """The resolved config as flattened params and as ``config.yaml`` (params may be cut).

    run_params: the params a resumed run's MLflow run already has. Only the keys it lacks are
    logged (MLflow refuses to change a param; ``resume.refused_changes`` has vetted the rest),
    and ``config.yaml`` stays the first start's.
    """
    params = config_params(cfg)
    if run_params is not None:
        params = {k: v for k, v in params.items() if k not in run_params}
    if params:
        logger.log_hyperparams(params)
    if run_params is not None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        logger.experiment.log_artifact(logger.run_id, str(path))


def set_tags(logger: RunLogger, tags: Mapping[str, str]) -> None:
    """Tag the logger's MLflow run (retrying while the store is locked)."""
    for key, value in tags.items():
        logger.experiment.set_tag(logger.run_id, key, value)


def note_resume(logger: RunLogger, ckpt: Path, changes: Mapping[str, Any]) -> None:
    """Tag a resumed run with its checkpoint and the keys this start changed (its params keep
    the first start's values): ``grpo_lab.resumed_from``, ``grpo_lab.resume_changes``."""
    set_tags(
        logger,
        {"grpo_lab.resumed_from": str(ckpt), "grpo_lab.resume_changes": json.dumps(changes)},
    )


def runs_url(
    tracking_uri: str, experiment_id: str, host: str = "127.0.0.1", port: int = 5000
) -> str:
    """Direct link to the runs table of an experiment in ``mlflow ui``."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_command(tracking_uri: str) -> str:
    """The ``mlflow ui`` command line for a store, bound to this machine only (the UI has no login)."""
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def rendered_prompts(tokenizer: Any, completions: Any, k: int) -> list[str]:
    """The first ``k`` rows' prompts decoded from the tokens the policy was given (padding
    dropped, special tokens kept): the task's prompt after ``render_prompts``."""
    ids, mask = completions.prompt_ids[:k], completions.prompt_mask[:k].bool()  # (k, P)
    return [
        tokenizer.decode(row[m].tolist(), skip_special_tokens=False) for row, m in zip(ids, mask)
    ]


class CompletionTable(L.Callback):
    """Logs a table of sampled completions (prompt, the prompt as rendered for the policy,
    completion, reward, advantage) to MLflow.

    every: rollouts between tables; rows: completions per table (whole groups first).
    Each table is an artifact ``completions/rollout_<n>.json`` readable in the MLflow UI.
    """

    def __init__(self, every: int = 25, rows: int = 16) -> None:
        self.every = every
        self.rows = rows

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        rollout = getattr(pl_module, "last_rollout", None)
        n = pl_module.rollouts_done
        if rollout is None or (n % self.every and n != 1):
            return
        for lg in trainer.loggers:
            if isinstance(lg, MLFlowLogger):
                k = min(self.rows, len(rollout.texts))
                data = {
                    "rollout": [n] * k,
                    "prompt": [ex.prompt for ex in rollout.examples[:k]],
                    # what the policy saw: chat template and system prompt applied
                    "rendered_prompt": rendered_prompts(
                        pl_module.tokenizer, rollout.completions, k
                    ),
                    "completion": rollout.texts[:k],
                    "answer": [ex.answer for ex in rollout.examples[:k]],
                    "reward": rollout.rewards[:k].tolist(),
                    "advantage": rollout.advantages[:k].tolist(),
                    "truncated": rollout.completions.truncated[:k].tolist(),
                }
                lg.experiment.log_table(
                    lg.run_id, data=data, artifact_file=f"completions/rollout_{n:05d}.json"
                )


# --------------------------------------------------------------------------- datasets

TRAINING, EVALUATION = "training", "evaluation"  # MLflow's dataset contexts (the UI shows them)


def examples_frame(examples: list[Any]):
    """prompt, answer and demonstration (the SFT target) of each example, as a DataFrame:
    what a built-in or file task's dataset digest covers."""
    import pandas as pd

    return pd.DataFrame(
        {
            "prompt": [ex.prompt for ex in examples],
            "answer": [ex.answer for ex in examples],
            "demonstration": [ex.target for ex in examples],
        }
    )


def task_datasets(task: Any, eval_size: int) -> list[tuple[Any, str]]:
    """(MLflow dataset, context) for the task's train split and the eval prompts a run scores
    (the first ``eval_size``).

    A ``datasets`` task (task=hf: ``train_dataset``/``eval_dataset``) logs its rows through
    ``mlflow.data.from_huggingface``: a hub or builder source that ``load_dataset`` can read
    again, or the ``save_to_disk`` directory. Any other task logs a DataFrame of its examples
    (``examples_frame``) through ``from_pandas``, sourced from its file (``task.data_source``)
    or ``grpo_lab:<task name>``. MLflow digests the first 10,000 rows.
    """
    import warnings

    import mlflow.data

    hf_train = getattr(task, "train_dataset", None)
    if type(hf_train).__module__.partition(".")[0] != "datasets":
        hf_train = None  # a task of the user's own may name something else train_dataset
    with warnings.catch_warnings():
        # MLflow registers LocalArtifactDatasetSource twice, so every local source "can be
        # interpreted in multiple ways" (both are the same class).
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        if hf_train is not None:
            src = task.source
            evals = task.eval_dataset
            evals = evals.select(range(min(eval_size, len(evals))))
            base = task.dataset_name
            eval_name = task.eval_split or f"{task.split}-heldout"
            if Path(src["path"]).is_dir():
                where = {"source": str(Path(src["path"]).resolve())}
            else:
                where = {
                    "path": src["path"],
                    "data_files": src.get("data_files"),
                    "revision": src.get("revision"),
                }
            return [
                (
                    mlflow.data.from_huggingface(hf_train, name=f"{base}/{task.split}", **where),
                    TRAINING,
                ),
                (
                    mlflow.data.from_huggingface(evals, name=f"{base}/{eval_name}", **where),
                    EVALUATION,
                ),
            ]
        train_source = getattr(task, "data_source", None) or f"grpo_lab:{task.name}"
        eval_source = getattr(task, "eval_source", None) or train_source
        return [
            (
                mlflow.data.from_pandas(
                    examples_frame(task.train()), source=train_source, name=f"{task.name}/train"
                ),
                TRAINING,
            ),
            (
                mlflow.data.from_pandas(
                    examples_frame(task.eval()[:eval_size]),
                    source=eval_source,
                    name=f"{task.name}/eval",
                ),
                EVALUATION,
            ),
        ]


def log_datasets(logger: MLFlowLogger, task: Any, eval_size: int) -> bool:
    """Log the task's train and eval data as the run's dataset inputs (``mlflow.log_input`` on
    the logger's run), unless the run has dataset inputs already (a resumed run logged them at
    its first start). Returns whether it logged. Call it on rank 0 only.
    """
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client, run_id = logger.experiment, logger.run_id
    if client.get_run(run_id).inputs.dataset_inputs:
        return False
    inputs = [
        # what mlflow.log_input(dataset, context=...) builds, for a run that is not the active one
        DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for ds, context in task_datasets(task, eval_size)
    ]
    client.log_inputs(run_id, datasets=inputs)
    return True
