"""LightningDataModule over a task: B prompts per training batch, held-out prompts for eval."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from grpo_lab.distributed import EvalShard
from grpo_lab.tasks.base import Example, Task


def _as_list(batch: list[Example]) -> list[Example]:
    return batch


class TaskDataModule(L.LightningDataModule):
    """prompts_per_step: B, the prompts of one rollout; eval_size: held-out prompts scored
    greedily at each eval (the first eval_size of the task's eval split)."""

    def __init__(
        self,
        task: Task,
        prompts_per_step: int,
        eval_size: int,
        eval_batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.task = task
        self.prompts_per_step = prompts_per_step
        self.eval_size = eval_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch  # a batch is a list of text examples; the module tokenizes on its device

    def train_dataloader(self) -> DataLoader:
        train = self.task.train()
        if len(train) < self.prompts_per_step:
            raise ValueError(
                f"train.prompts_per_step={self.prompts_per_step} exceeds the task's "
                f"{len(train)} training prompts"
            )
        return DataLoader(
            train,
            batch_size=self.prompts_per_step,
            shuffle=True,
            drop_last=True,
            collate_fn=_as_list,
        )

    def val_dataloader(self) -> DataLoader:
        examples = self.task.eval()[: self.eval_size]
        # Under DDP each rank scores a disjoint shard; the module sums the counts over ranks.
        return DataLoader(
            examples,
            batch_size=self.eval_batch_size,
            sampler=EvalShard(examples),
            collate_fn=_as_list,
        )
