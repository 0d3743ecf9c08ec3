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


class CompletionTable(L.Callback):
    """Logs a table of sampled completions (prompt, completion, reward, advantage) to MLflow.

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
                    "completion": rollout.texts[:k],
                    "answer": [ex.answer for ex in rollout.examples[:k]],
                    "reward": rollout.rewards[:k].tolist(),
                    "advantage": rollout.advantages[:k].tolist(),
                    "truncated": rollout.completions.truncated[:k].tolist(),
                }
                lg.experiment.log_table(
                    lg.run_id, data=data, artifact_file=f"completions/rollout_{n:05d}.json"
                )
