"""Typed schemas of the top-level and ``train.*`` keys.

``config.validate`` merges each composed node into ``OmegaConf.structured(<schema>)``, so a
value of the wrong type (``G=abc``) or an option outside an enum (``train.scheduler=cos``) fails
before any compute, naming the key, the value and what is allowed. Ranges (``G >= 2``,
``0 < ref_sync_mix <= 1``) are ``config.RULES``. The algorithm's parts (``advantage``, ``kl``,
``surrogate``, ``aggregation``, ``correction``, ``loss``) are their own schemas: the dataclasses
of ``grpo_lab.grpo``, checked by ``config.part_errors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional  # OmegaConf's structured configs read Optional, not X | None


class RewardOnError(str, Enum):
    raise_ = "raise"
    zero = "zero"


class Scheduler(str, Enum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


@dataclass
class TopSchema:
    """The paper's symbols at the top level of conf/config.yaml."""

    G: int
    epsilon: float
    beta: float
    mu: int
    seed: int
    num_threads: Optional[int]  # noqa: UP045


@dataclass
class TrainSchema:
    """The keys of ``train.*`` and their types (their ranges: ``config.RULES``)."""

    rollouts: int
    prompts_per_step: int
    minibatch_size: Optional[int]  # noqa: UP045
    num_minibatches: Optional[int]  # noqa: UP045
    microbatch_size: Optional[int]  # noqa: UP045
    shared_prefix: Any  # auto | true | false (config.RULES checks it)
    compile: bool
    lr: float
    weight_decay: float
    warmup_steps: int
    scheduler: Scheduler
    max_grad_norm: Optional[float]  # noqa: UP045
    max_consecutive_skipped_steps: int
    eval_every: int
    eval_size: int
    eval_batch_size: int
    checkpoint_every: int
    log_samples_every: int
    num_samples_logged: int
    objective: str
    ref_sync_every: int
    ref_sync_mix: float
    dynamic_sampling: bool
    dynamic_sampling_max_tries: int


# config path -> (schema, strict). Strict: every key of the schema is required and no other key
# is allowed (a config group the schema owns); not strict: only the keys present are typed.
SCHEMAS: dict[str, tuple[type, bool]] = {
    "": (TopSchema, False),
    "train": (TrainSchema, False),
}
