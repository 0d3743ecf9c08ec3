"""Lightning callbacks of a GRPO run: checkpoints that resume exactly, and a progress bar in rollouts."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar


def rng_states() -> dict[str, Any]:
    """torch's (CPU and every CUDA device), numpy's and Python's global RNG states.

    Plain tensors, numbers and tuples only, so ``torch.load(weights_only=True)`` reads them.
    """
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np_state = states["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    random.setstate(states["python"])


class RNGStates(L.Callback):
    """Keeps the global RNG states in every checkpoint and restores them in a resumed run, so
    rollout N+1 draws the samples (and mini-batch orders) an uninterrupted run draws.

    Lightning restores the loop counters and the optimizer, not the RNG states. They are
    restored at the first training batch, not when the checkpoint loads, so nothing that runs in
    between (setup, the loaders starting) can move them.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._to_restore is not None:
            set_rng_states(self._to_restore)
            self._to_restore = None


class RolloutCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes ``last.ckpt`` when training ends.

    With ``every_n_train_steps`` Lightning saves only on multiples of it, so a run of 100 steps
    checkpointed every 40 would leave a ``last.ckpt`` of step 80: eval and resume would read a
    stale policy.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self.save_last or self.dirpath is None:
            return
        last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        if self._last_global_step_saved != trainer.global_step or not last.is_file():
            trainer.save_checkpoint(last)
            self.last_model_path = str(last)


class RolloutProgressBar(TQDMProgressBar):
    """The training bar counts rollouts out of ``train.rollouts`` and shows what the module logs
    with ``prog_bar=True`` (the mean reward).

    Lightning's own bars count the batches of an endless epoch ("Epoch 0/-2" with
    ``max_epochs=-1``) and show the logger's version, here a 32-character MLflow run id.
    """

    def __init__(self, total_rollouts: int) -> None:
        super().__init__()
        self.total_rollouts = total_rollouts

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        bar.reset(total=self.total_rollouts)
        bar.set_description("rollouts")
        self._show(bar, getattr(trainer.lightning_module, "rollouts_done", 0))  # resumed: goes on

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        self._show(bar, getattr(pl_module, "rollouts_done", bar.n + 1))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)  # what the module logs with prog_bar
        metrics.pop("v_num", None)  # the logger's version: a 32-character MLflow run id
        return metrics

    @staticmethod
    def _show(bar: Any, rollouts_done: int) -> None:
        if not bar.disable:
            bar.n = rollouts_done
            bar.refresh()
