"""Multi-process runs (``trainer=ddp`` and kin) that compute what one process computes.

Lightning launches the processes and wraps the model; this module holds the few things GRPO
needs on top, each a small function over ``torch.distributed`` that is the identity in a
single process:

- Each rank samples its own completions: ``rank_seed`` gives rank r > 0 a seed of its own,
  derived from (seed, rank); ``callbacks.RNGStates`` applies it at the first training batch, and
  keeps every rank's RNG states in the checkpoint (``gather_objects``), so a resume is exact on
  every rank. A prompt's G completions are sampled on one rank, so group advantages need no
  communication.
- ``loss=token_mean`` divides by the token count of the whole step, over all ranks
  (``token_mean_denominator``), not by each rank's own count.
- Per-rollout metrics are means over ranks (``mean_over_ranks``); eval counts are summed over
  ranks (``sum_over_ranks``) over disjoint shards of the eval prompts (``EvalShard``).
- ``launched_rank``: which process this is, before any process group exists, whatever launched
  it (torchrun, Lightning on several nodes, Slurm), so that only rank 0 creates the MLflow run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DistributedSampler


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_rank(env: Mapping[str, str] | None = None, devices_per_node: int = 1) -> int:
    """The global rank this process was launched as, from the variables its launcher set
    (``env``: ``os.environ`` by default): 0 for the one process of the job that creates the
    MLflow run. Known before any process group exists. The first launcher that left its mark
    decides:

    - torchrun: RANK (beside GROUP_RANK and LOCAL_RANK).
    - Lightning's own launcher: NODE_RANK (or GROUP_RANK, or Slurm's SLURM_NODEID) times
      ``devices_per_node``, plus LOCAL_RANK (or SLURM_LOCALID), each 0 where unset. On node n
      of a multi-node job the user starts the command with NODE_RANK=n and no LOCAL_RANK; the
      ranks Lightning starts beside it get LOCAL_RANK=1, 2, ... Lightning's vars come before
      Slurm's: Lightning's launcher also runs inside Slurm allocations that do not start its
      ranks, where SLURM_PROCID is the allocation's task, not the rank.
    - Slurm starting every rank (srun): SLURM_PROCID. LSF (jsrun): JSM_NAMESPACE_RANK.

    Whether the rank is 0 does not depend on ``devices_per_node``; only the number does.
    Lightning's ``rank_zero_only`` reads RANK, LOCAL_RANK, SLURM_PROCID and JSM_NAMESPACE_RANK
    only, so without ``adopt_launched_rank`` node 1's first process believes it is rank 0.
    """
    env = os.environ if env is None else env

    def first(*keys: str) -> int | None:
        return next((int(env[k]) for k in keys if env.get(k, "") != ""), None)

    rank = first("RANK")
    if rank is not None:
        return rank
    if first("NODE_RANK", "GROUP_RANK", "LOCAL_RANK") is not None:
        node = first("NODE_RANK", "GROUP_RANK", "SLURM_NODEID") or 0
        return node * devices_per_node + (first("LOCAL_RANK", "SLURM_LOCALID") or 0)
    return first("SLURM_PROCID", "JSM_NAMESPACE_RANK") or 0


def adopt_launched_rank() -> int:
    """Set Lightning's ``rank_zero_only.rank`` to ``launched_rank()`` and return it.

    MLFlowLogger creates its run, logs params and metrics only where ``rank_zero_only.rank`` is
    0, and Lightning sets that from the environment at import, without NODE_RANK: node 1's first
    process would make a second MLflow run before the process group exists. The strategy sets
    the rank again when the group starts; only the number of a rank > 0 may change then.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    rank = launched_rank()
    rank_zero_only.rank = utils_rank_zero_only.rank = rank  # as Lightning's DDP strategy does
    return rank


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The sampling seed of ``rank``: ``seed`` itself on rank 0 of a fresh start (a one-process
    run samples as before), otherwise a 32-bit seed mixed from (seed, rank, step), different for
    every rank. ``step``: the optimizer step a resumed run starts at (0 on a fresh start)."""
    if rank == 0 and step == 0:
        return seed
    entropy = [seed % 2**64, rank, step]  # SeedSequence takes non-negative integers
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` in one process). Every rank must call
    this at the same point; the values are pickled, so CPU tensors and plain objects only."""
    size = world()[1]
    if size == 1:
        return [value]
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered


def sum_over_ranks(values: Tensor) -> Tensor:
    """Element-wise sum of ``values`` over all ranks (a copy; ``values`` itself in one process)."""
    if world()[1] == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def token_mean_denominator(local_tokens: Tensor) -> float:
    """What each rank divides its token sum by, so that DDP's gradient average is the token mean
    over every rank's tokens: global tokens / world size.

    Rank r's loss is S_r / (T / W), with S_r its token sum and T the tokens of all W ranks; DDP
    averages gradients, (1/W) sum_r W S_r / T = sum_r S_r / T. Dividing by the local count T_r
    instead would give (1/W) sum_r S_r / T_r, which weighs a short completion on a rank with
    few tokens more than one on a busy rank. Every rank must call this once per mini-batch.
    """
    size = world()[1]
    total = sum_over_ranks(local_tokens.detach().to(torch.float64).reshape(1))
    return max(float(total.item()), 1.0) / size


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Per-step metrics of all ranks combined (``combine_rank_metrics``). Every rank must call
    this at the same point; one process gets its own metrics back."""
    if world()[1] == 1:
        return dict(metrics)
    return combine_rank_metrics(gather_objects(dict(metrics)))


def combine_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """The mean over ranks, except the max of ``*/max`` and ``*/max_*`` and the min of ``*/min``
    and ``*/min_*``. A key some rank lacks (a reward none of its completions applied to) is
    combined over the ranks that have it."""
    out: dict[str, float] = {}
    for key in sorted({k for m in per_rank for k in m}):
        values = [float(m[key]) for m in per_rank if key in m]
        leaf = key.rsplit("/", 1)[-1]
        if leaf == "max" or leaf.startswith("max_"):
            out[key] = max(values)
        elif leaf == "min" or leaf.startswith("min_"):
            out[key] = min(values)
        else:
            out[key] = math.fsum(values) / len(values)
    return out


class EvalShard(DistributedSampler):
    """Rank r of W evaluates prompts r, r + W, r + 2W, ...: every prompt exactly once over all
    ranks. torch's DistributedSampler pads shards to equal length with repeated prompts, which
    would count those twice in a summed accuracy. Being a DistributedSampler, Lightning keeps it
    instead of putting its own in. In one process it yields 0..n-1 in order."""

    def __init__(
        self, dataset: Sized, rank: int | None = None, world_size: int | None = None
    ) -> None:
        """rank, world_size: this process's by default (from the process group)."""
        if rank is None or world_size is None:
            rank, size = world()
        else:
            size = world_size
        super().__init__(dataset, num_replicas=size, rank=rank, shuffle=False)
        self.indices = range(rank, len(dataset), size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def check_launch(trainer: L.Trainer, multirun: bool, strategy: Any, devices: Any) -> None:
    """Refuse a strategy that starts its ranks by re-running the command line inside a ``-m``
    sweep: each rank would re-run the whole sweep (Lightning #11300, Hydra #2070).

    Lightning's subprocess launcher starts ranks 1..N-1 with ``[python, *sys.argv]`` unless a
    cluster environment (torchrun, SLURM with ``tasks_per_node`` = devices) has started them.
    strategy, devices: ``trainer.strategy`` and ``trainer.devices`` as configured (for the error).
    """
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )

    launcher = getattr(trainer.strategy, "launcher", None)
    if (
        multirun
        and trainer.num_devices * trainer.num_nodes > 1
        and isinstance(launcher, _SubprocessScriptLauncher)
        and not launcher.cluster_environment.creates_processes_externally
    ):
        from grpo_lab.config import ConfigError

        raise ConfigError(
            f"trainer.strategy={strategy!r} with trainer.devices={devices!r} "
            f"({trainer.num_devices} processes) is refused inside a -m sweep: Lightning would "
            "start the other ranks by re-running the command, that is the whole sweep. Use "
            "trainer=ddp_spawn, or one job per GPU (hydra/launcher=parallel_gpu), or "
            "hydra/launcher=slurm with tasks_per_node = trainer.devices"
        )
