"""Lightning callbacks of a GRPO run: checkpoints that resume exactly, and a progress bar in rollouts."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from grpo_lab import distributed


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


def saved_states_of_rank(saved: dict[str, Any], rank: int) -> dict[str, Any] | None:
    """Rank ``rank``'s RNG states in what ``RNGStates.state_dict`` saved, or None if it holds
    none for that rank (a checkpoint of fewer ranks, or of rank 0 only).

    Checkpoints written before per-rank states hold rank 0's states alone, at the top level.
    """
    if "ranks" not in saved:
        return saved if rank == 0 else None
    ranks = saved["ranks"]
    return ranks[rank] if rank < len(ranks) else None


class RNGStates(L.Callback):
    """The global RNG states (torch, CUDA, numpy, Python) each rank trains from, kept in every
    checkpoint for every rank, so rollout N+1 of a resumed run draws the samples (and mini-batch
    orders) of an uninterrupted run on every rank.

    - Fresh start: every rank comes from ``seed_everything(seed)``; ranks r > 0 reseed with
      ``rank_seed(seed, r)``, or all ranks would sample the same completions for a prompt. Rank 0
      keeps its stream, so a one-process run samples as it always did.
    - Checkpoint: each rank's states, gathered to every rank (``state_dict`` runs on all ranks;
      rank 0 writes the file).
    - Resume: each rank restores its own states.
    - A rank the checkpoint has no states for reseeds with ``rank_seed(seed, r, global_step)``
      so it does not replay its first samples. That is every rank r > 0 of a checkpoint written
      before per-rank states (which held rank 0's only): such a resume stays exact on rank 0
      only, as it was when it was written.

    Lightning restores the loop counters and the optimizer, not the RNG states. They are set at
    the first training batch, not when the checkpoint loads, so nothing that runs in between
    (setup, the loaders starting) can move them.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._saved: dict[str, Any] | None = None
        self._pending = True

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": distributed.gather_objects(rng_states())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._pending:
            return
        self._pending = False
        rank = trainer.global_rank
        own = saved_states_of_rank(self._saved, rank) if self._saved is not None else None
        self._saved = None
        if own is not None:
            set_rng_states(own)
        elif rank > 0:
            seed = distributed.rank_seed(self.seed, rank, trainer.global_step)
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)


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
        stale = self._last_global_step_saved != trainer.global_step or not last.is_file()
        # rank 0's view decides: every rank takes part in a save (RNGStates gathers each rank's
        # states), and another node may not see rank 0's file
        if trainer.strategy.broadcast(stale):
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
