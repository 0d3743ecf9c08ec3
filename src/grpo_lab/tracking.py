"""MLflow: the logger, the resolved config as params and artifact, completion tables, links."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
T = TypeVar("T")

# The MLflow 3.x UI opens experiments in its GenAI view unless tagged as model development.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")


def retry_locked(fn: Callable[[], T], attempts: int = 20, wait_s: float = 0.5) -> T:
    """Run fn, retrying while SQLite says the database is locked (parallel sweep jobs)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # MLflow wraps sqlite errors in several exception types
            if "locked" not in str(err).lower() or i == attempts - 1:
                raise
            time.sleep(wait_s * (1 + i))
    raise AssertionError("unreachable")


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created (and tagged for the runs view) if missing."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)

    def get_or_create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name, tags=dict([EXPERIMENT_KIND_TAG]))
        except Exception:
            exp = client.get_experiment_by_name(name)  # another job created it meanwhile
            if exp is None:
                raise
            return exp.experiment_id

    exp_id = retry_locked(get_or_create)
    retry_locked(lambda: client.set_experiment_tag(exp_id, *EXPERIMENT_KIND_TAG))
    return exp_id


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
    logger: MLFlowLogger, cfg: DictConfig, run_params: Mapping[str, str] | None = None
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
        retry_locked(lambda: logger.log_hyperparams(params))
    if run_params is not None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        retry_locked(lambda: logger.experiment.log_artifact(logger.run_id, str(path)))


def set_tags(logger: MLFlowLogger, tags: Mapping[str, str]) -> None:
    """Tag the logger's MLflow run (retrying while the store is locked)."""
    for key, value in tags.items():
        retry_locked(
            lambda key=key, value=value: logger.experiment.set_tag(logger.run_id, key, value)
        )


def note_resume(logger: MLFlowLogger, ckpt: Path, changes: Mapping[str, Any]) -> None:
    """Tag a resumed run with its checkpoint and the keys this start changed (its params keep
    the first start's values): ``grpo_lab.resumed_from``, ``grpo_lab.resume_changes``."""
    tags = {"grpo_lab.resumed_from": str(ckpt), "grpo_lab.resume_changes": json.dumps(changes)}
    for key, value in tags.items():
        retry_locked(
            lambda key=key, value=value: logger.experiment.set_tag(logger.run_id, key, value)
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
                retry_locked(
                    lambda lg=lg, data=data: lg.experiment.log_table(
                        lg.run_id, data=data, artifact_file=f"completions/rollout_{n:05d}.json"
                    )
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
    if retry_locked(lambda: client.get_run(run_id)).inputs.dataset_inputs:
        return False
    inputs = [
        # what mlflow.log_input(dataset, context=...) builds, for a run that is not the active one
        DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for ds, context in task_datasets(task, eval_size)
    ]
    retry_locked(lambda: client.log_inputs(run_id, datasets=inputs))
    return True


# Short names for keys researchers sweep, so a run reads "G=8 eps=0.2 beta=0.04".
_SHORT = {"epsilon": "eps", "learning_rate": "lr", "train.lr": "lr", "prompts_per_step": "B"}


def run_name_from_overrides(cfg: DictConfig | None = None) -> str:
    """A readable run name from the command-line overrides, or "default" when there are none."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "default"
    overrides = [
        o
        for o in HydraConfig.get().overrides.task
        if not o.startswith(("hydra.", "logger.", "ckpt_path", "resume"))
    ]
    parts = []
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        short = _SHORT.get(key) or _SHORT.get(key.split(".")[-1]) or key.split(".")[-1]
        parts.append(f"{short}={value}")
    return " ".join(parts) or "default"
