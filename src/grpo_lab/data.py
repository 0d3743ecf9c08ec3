"""LightningDataModule over a task: B prompts per training batch, held-out prompts for eval."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from grpo_lab.distributed import EvalShard
from grpo_lab.tasks.base import Example, Task


def _as_list(batch: list[Example]) -> list[Example]:
    return batch


class PromptBatches(Sampler[list[int]]):
    """Endless batches of ``batch_size`` prompt indices out of ``n_prompts``, from batch ``start``.

    Pass e over the prompts is a permutation drawn from a generator seeded with (seed, e); a
    pass drops its last incomplete round of batches. Batch k is therefore a function of
    (seed, k) alone: a run resumed at batch k sees the prompts an uninterrupted run sees, and no
    global random state is read or advanced. Under DDP, rank r of world_size takes every
    world_size-th batch of the order, from the r-th on, so the ranks see different prompts.
    """

    def __init__(
        self,
        n_prompts: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.n_prompts = n_prompts
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size

    def order(self, epoch: int) -> list[int]:
        """The prompt order of pass ``epoch`` (distinct seeds for passes below 2**20)."""
        generator = torch.Generator().manual_seed(self.seed * 2**20 + epoch)
        return torch.randperm(self.n_prompts, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = self.n_prompts // (self.batch_size * self.world_size)  # batches of one rank
        epoch, first = divmod(self.start, per_epoch)
        while True:
            order = self.order(epoch)
            for k in range(first, per_epoch):
                at = (k * self.world_size + self.rank) * self.batch_size
                yield order[at : at + self.batch_size]
            epoch, first = epoch + 1, 0


class TaskDataModule(L.LightningDataModule):
    """prompts_per_step: B, the prompts of one rollout; eval_size: held-out prompts scored
    greedily at each eval (the first eval_size of the task's eval split).

    ``prompt_batches_done`` is the training batches consumed so far. It goes into each
    checkpoint (``state_dict``), and a resumed run's loader starts there.
    """

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
        self.prompt_batches_done = 0

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch  # a batch is a list of text examples; the module tokenizes on its device

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called once per batch, right before its step: counts batches used, not prefetched.
        if self.trainer is not None and self.trainer.training:
            self.prompt_batches_done += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"prompt_batches_done": self.prompt_batches_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.prompt_batches_done = int(state_dict["prompt_batches_done"])

    def train_dataloader(self) -> DataLoader:
        train = self.task.train()
        world = self.trainer.world_size
        if len(train) < self.prompts_per_step * world:
            devices = f" x {world} devices" if world > 1 else ""
            raise ValueError(
                f"train.prompts_per_step={self.prompts_per_step}{devices} exceeds the task's "
                f"{len(train)} training prompts"
            )
        batches = PromptBatches(
            len(train),
            self.prompts_per_step,
            self.seed,
            start=self.prompt_batches_done,
            rank=self.trainer.global_rank,
            world_size=world,
        )
        return DataLoader(
            train, batch_sampler=batches, collate_fn=_as_list, generator=self._generator()
        )

    def val_dataloader(self) -> DataLoader:
        examples = self.task.eval()[: self.eval_size]
        # Under DDP each rank scores a disjoint shard; the module sums the counts over ranks.
        return DataLoader(
            examples,
            batch_size=self.eval_batch_size,
            sampler=EvalShard(examples),
            collate_fn=_as_list,
            generator=self._generator(),
        )

    def _generator(self) -> torch.Generator:
        # A DataLoader draws a seed from its generator each time it starts iterating; with none
        # it draws from torch's global one, and every eval would shift the samples drawn after it.
        return torch.Generator().manual_seed(self.seed)
